"""Memory of one training step: full fine-tuning against LoRA, on the Pythia-1.4B shape, layout (1, 1, 1).

Each (mode, depth) runs in its own fresh Python process (`--worker`), so each peak is that mode's alone:
the platform's `TrainEngine` without Ray (DeepSpeed pipeline engine, ZeRO-1, dp = tp = pp = 1), built, then
one optimizer step of one micro-batch (global batch = micro-batch, no accumulation) of random token ids.

    full : every weight trains (AdamW over all of them).
    lora : `lora.rank` R (default 8) on `lora.targets` (default all four: query_key_value, dense,
           dense_h_to_4h, dense_4h_to_h), alpha 16, no dropout: the base is frozen in the training precision,
           the optimizer (and ZeRO-1) gets only the adapters. The base is random (no `model.init_from`; only
           the shapes matter for memory), so the config is built with `dataclasses.replace(cfg, lora=...)`,
           which skips the validation that asks for a base checkpoint.

Weights are filled by a `loader` (GPT-NeoX's initialisation rules drawn from one generator on the device), which
is quicker than the engine's per-parameter CPU generators; the memory is the same.

Measured per process:
  held bytes   the distinct tensor storages the step holds, as tests/platform/train/test_plan.py's
               `held_bytes` counts them: weights (all parameters, frozen ones too), gradients (the parameters'
               .grad and DeepSpeed's gradient buffers at their largest: before the all-reduce, before the
               step and inside the torch optimizer's step) and optimizer states (ZeRO's fp32 partitions and
               Adam's m and v). The planner's `stage_memory` models exactly these three.
  CPU          peak RSS growth: `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end minus the same before
               the engine is built (after torch, DeepSpeed and neoxray are imported), i.e. everything the
               build and the step added at their peak (activations, temporaries, allocator slack included);
               and the step's own peak: the RSS high-water mark is reset after the build (/proc/self/clear_refs)
               and the growth read again after the step.
  CUDA         `torch.cuda.max_memory_allocated` over build + step (the build's peak and the step's, reset in
               between; the larger is reported), and the allocation before the build (about 0).

On CPU the 24 layers of full fine-tuning (1.4 B parameters x 24 bytes in fp32 with ZeRO-1) do not fit a small
machine, so the CPU run measures reduced depths (`--layers 2 4`, via model.overrides.n_layers) and
EXTRAPOLATES LINEARLY to the preset's depth (24): every per-layer figure grows by the same amount per layer,
and the embedding and head are the intercept. On CUDA (`--device cuda`) the full 24 layers run in bf16.

The planner's estimate (`neoxray.platform.train.plan.stage_memory`, same shape, layout, precision, micro-batch,
sequence length and LoRA rank) is printed beside the measurements: weights + gradients + optimizer states,
activations (no checkpointing), and on CUDA its per-GPU overhead allowance too.

    python benchmarks/lora_memory.py                                   # CPU: layers 2 and 4, seq 256, fp32
    python benchmarks/lora_memory.py --device cuda --json out.json     # GPU: 24 layers, seq 2048, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GIB, ROOT, device_name, engine_run_config, loadavg, machine, neox_init_, now, pick, write_json

MODES = ("full", "lora")
HELD = ("weights", "gradients", "optimizer")


# -------------------------------------------------------------------------------------------------------
# the run config
# -------------------------------------------------------------------------------------------------------
def run_config(args, mode: str, layers: int):
    import dataclasses

    cfg = engine_run_config(
        "lora_memory",
        args.preset,
        layers=layers,
        global_batch=args.micro_batch,
        steps=1,
        **pick(args, "seq", "micro_batch", "precision", "device", "seed"),
    )
    if mode == "lora":  # after validation: a random base is fine for memory (no model.init_from)
        lora = dataclasses.replace(cfg.lora, rank=args.lora_rank, targets=list(args.lora_targets), dropout=0.0)
        cfg = dataclasses.replace(cfg, lora=lora)
    return cfg


# -------------------------------------------------------------------------------------------------------
# the worker: one mode, one depth, this process
# -------------------------------------------------------------------------------------------------------
def fast_loader(mc, device, seed: int):
    """Fill each freshly built piece with GPT-NeoX's initialisation rules, from one generator on the device."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return lambda piece: neox_init_(piece.canonical_parameters(), mc, g)


def _rss_kib() -> int:
    """The current resident set size, KiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hwm_kib() -> int | None:
    """The RSS high-water mark (VmHWM), KiB, which /proc/self/clear_refs can reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def worker(args) -> dict:
    import gc
    import logging
    import resource

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from neoxray.platform.train.engine import TrainEngine, micro_batch
    from neoxray.platform.train.memory_probe import held_step

    ds_logger.setLevel(logging.WARNING)
    cuda = args.device == "cuda"
    cfg = run_config(args, args.mode, args.layers[0])
    mc = cfg.model_config()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    out = dict(
        mode=args.mode,
        layers=mc.n_layers,
        params=mc.num_parameters(),
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        threads=torch.get_num_threads(),
        device_name=device_name(device),
    )
    gc.collect()
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["allocated_before_build"] = torch.cuda.memory_allocated(device)
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out.update(rss_before_build=_rss_kib() * 1024, maxrss_before_build=base_maxrss * 1024)

    t0 = time.perf_counter()
    engine = TrainEngine(cfg, loader=fast_loader(mc, device, args.seed))
    out["build_s"] = time.perf_counter() - t0
    out["trained_params"] = sum(p.numel() for _, p in engine.named_parameters())
    out["frozen_params"] = sum(p.numel() for _, p in engine.frozen_parameters())
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    ids = torch.randint(0, mc.vocab_size, (args.micro_batch, args.seq + 1), device=device, generator=g)

    def batches():
        while True:
            yield micro_batch(ids[:, :-1], ids[:, 1:])

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_build"] = torch.cuda.max_memory_allocated(device)
        out["allocated_after_build"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        out["rss_after_build"] = _rss_kib() * 1024
        out["maxrss_after_build"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:  # reset the high-water mark: the step's own peak
            Path("/proc/self/clear_refs").write_text("5")
            out["hwm_reset"] = True
        except OSError:
            out["hwm_reset"] = False
    out.update(held_step(engine, batches()))
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_step"] = torch.cuda.max_memory_allocated(device)
        out["peak"] = max(out["peak_build"], out["peak_step"])
        out["peak_growth"] = out["peak"] - out["allocated_before_build"]
        out["step_peak_growth"] = out["peak_step"] - out["allocated_before_build"]
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["maxrss_end"] = maxrss
        out["peak_growth"] = maxrss - out["maxrss_before_build"]
        if out["hwm_reset"]:
            out["step_peak_growth"] = _hwm_kib() * 1024 - out["rss_before_build"]
    out["ray_imported"] = "ray" in sys.modules
    return out


# -------------------------------------------------------------------------------------------------------
# the driver
# -------------------------------------------------------------------------------------------------------
def spawn(args, mode: str, layers: int) -> dict:
    """Run one (mode, depth) in a fresh process; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--layers", str(layers)]
        cmd += ["--device", args.device, "--preset", args.preset, "--seq", str(args.seq)]
        cmd += ["--micro-batch", str(args.micro_batch), "--precision", args.precision, "--seed", str(args.seed)]
        cmd += ["--lora-rank", str(args.lora_rank), "--lora-targets", *args.lora_targets, "--out", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.device == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.timeout, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(f"{mode} with {layers} layers failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
        result["process_s"] = time.perf_counter() - t0
        return result


def planned(args, mode: str, layers: int) -> dict:
    """The planner's bytes for the same run (the busiest, only, stage of layout (1, 1, 1))."""
    from neoxray.model.config import get_preset
    from neoxray.platform.train.plan import Training, stage_memory

    model = get_preset(args.preset, n_layers=layers, max_seq_len=max(args.seq, get_preset(args.preset).max_seq_len))
    t = Training(
        global_batch=args.micro_batch,
        micro_batch=args.micro_batch,
        seq_len=args.seq,
        precision=args.precision,
        activation_checkpointing=False,
        lora_rank=args.lora_rank if mode == "lora" else 0,
        lora_targets=tuple(args.lora_targets),
    )
    m = stage_memory(model, 1, 1, 1, 0, t)
    held = m.weights + m.gradients + m.optimizer
    return dict(
        weights=m.weights,
        gradients=m.gradients,
        optimizer=m.optimizer,
        held=held,
        activations=m.activations,
        overhead=m.overhead,
        total=held + m.activations + (m.overhead if args.device == "cuda" else 0),
        trainable=m.trainable,
    )


def extrapolate(points: dict[int, float], target: int) -> float:
    """Linear in the depth through the two deepest measured points (the value itself when measured)."""
    if target in points:
        return points[target]
    (a, va), (b, vb) = sorted(points.items())[-2:]
    return vb + (vb - va) / (b - a) * (target - b)


FIGURES = ("weights", "gradients", "optimizer", "held", "peak_growth", "step_peak_growth")


def gib(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f}"


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-1.4b", help="model preset (default pythia-1.4b)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument(
        "--layers", type=int, nargs="+", default=None, help="depths (default: 2 4 on CPU, the preset's on CUDA)"
    )
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256 CPU, 2048 CUDA)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per step (default 1; global batch the same)")
    p.add_argument("--precision", default=None, help="train.precision (default fp32 CPU, bf16 CUDA)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument(
        "--lora-targets",
        nargs="+",
        default=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        help="adapted linears (default: all four)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to each process (default 900)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p, p.parse_args(argv)


def measure_all(args) -> list[dict]:
    """Each depth, each mode, in a fresh process; the planner's figures beside each."""
    runs = []
    for layers in args.layers:
        for mode in MODES:
            r = spawn(args, mode, layers)
            r["held"] = sum(r[k] for k in HELD)
            r["planned"] = planned(args, mode, layers)
            runs.append(r)
            print(
                f"# {mode:<4} {layers:>2} layers: built in {r['build_s']:.1f} s, step {r['step_time_s']:.1f} s, "
                f"loss {r['loss']:.3f}, process {r['process_s']:.0f} s, {r['threads']} threads",
                flush=True,
            )
    return runs


def print_runs(runs: list[dict]) -> None:
    """A row per (mode, depth): measured bytes beside the planner's."""
    print(
        f"\n{'mode':<6}{'layers':>7}{'params':>8}{'trained':>10}{'weights':>9}{'grads':>8}{'optim':>8}{'held':>8}"
        f"{'peak':>8}{'step pk':>9}  | planner{'held':>7}{'act':>7}{'total':>7}"
    )
    for r in runs:
        pl = r["planned"]
        print(
            f"{r['mode']:<6}{r['layers']:>7}{r['params'] / 1e9:>7.2f}B{r['trained_params'] / 1e6:>9.1f}M"
            f"{gib(r['weights']):>9}{gib(r['gradients']):>8}{gib(r['optimizer']):>8}{gib(r['held']):>8}"
            f"{gib(r['peak_growth']):>8}{gib(r.get('step_peak_growth')):>9}  |        "
            f"{gib(pl['held']):>7}{gib(pl['activations']):>7}{gib(pl['total']):>7}"
        )


def at_depth(args, runs: list[dict], depth: int) -> dict:
    """Each mode's figures at `depth`: measured, or extrapolated linearly from the two deepest measured depths;
    and the planner's."""
    at = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        at[mode] = {}
        for key in FIGURES:
            pts = {r["layers"]: r[key] for r in rows if r.get(key) is not None}
            at[mode][key] = extrapolate(pts, depth) if len(pts) >= 2 or depth in pts else None
        at[mode]["planned"] = planned(args, mode, depth)
    return at


def print_at_depth(at: dict, args, depth: int, cuda: bool) -> dict:
    """Full against LoRA at the preset's depth, measured and planned; returns the ratios LoRA / full."""
    how = "measured" if depth in args.layers else f"EXTRAPOLATED linearly from {args.layers[-2:]} layers"
    print(f"\n# at {depth} layers ({how}); GiB; {'max_memory_allocated' if cuda else 'peak RSS growth'}")
    print(f"{'':<28}{'full':>10}{'LoRA':>10}{'LoRA/full':>11}")
    lines = [
        ("held: weights", "weights"),
        ("held: gradients", "gradients"),
        ("held: optimizer states", "optimizer"),
        ("held: total", "held"),
        (f"peak ({'build+step' if cuda else 'RSS growth'})", "peak_growth"),
        ("peak of the step alone", "step_peak_growth"),
    ]
    ratios = {}
    for label, key in lines:
        f, lo = at["full"][key], at["lora"][key]
        ratios[key] = lo / f if f and lo is not None else None
        ratio = "n/a" if ratios[key] is None else f"{ratios[key]:.3f}"
        print(f"{label:<28}{gib(f):>10}{gib(lo):>10}{ratio:>11}")
    for label, key in (
        ("planner: weights+grads+optim", "held"),
        ("planner: activations", "activations"),
        ("planner: total" + (" (+overhead)" if cuda else ""), "total"),
    ):
        f, lo = at["full"]["planned"][key], at["lora"]["planned"][key]
        ratios["planned_" + key] = lo / f
        print(f"{label:<28}{gib(f):>10}{gib(lo):>10}{lo / f:>11.3f}")
    return ratios


def print_notes(env: dict, runs: list[dict], cuda: bool) -> None:
    if cuda:
        print(
            "# peak = torch.cuda.max_memory_allocated from before the build to the end of the step (the build's "
            "peak and the step's, the larger); step = the step's alone"
        )
    else:
        print(
            "# peak RSS growth = ru_maxrss at the end of the step - ru_maxrss before the engine was built (torch, "
            "DeepSpeed, neoxray imported); step = RSS high-water mark reset after the build, minus the RSS before it"
        )
        print(f"# load average at start {env['loadavg_start']}, at end {env['loadavg_end']} ({os.cpu_count()} CPUs)")
    print(f"# ray imported: {any(r['ray_imported'] for r in runs)}")


def main(argv=None) -> dict:
    p, args = parse_args(argv)
    cuda = args.device == "cuda"
    from neoxray.model.config import get_preset

    full_depth = get_preset(args.preset).n_layers
    args.layers = sorted(set(args.layers or ([full_depth] if cuda else [2, 4])))
    args.seq = args.seq or (2048 if cuda else 256)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.worker:
        result = worker(args)
        Path(args.out).write_text(json.dumps(result))
        return result
    if len(args.layers) < 2 and full_depth not in args.layers:
        p.error(f"give two depths to extrapolate to {full_depth} layers, or measure {full_depth}")

    env = dict(date=now(), machine=machine(), python=platform.python_version(), loadavg_start=loadavg())
    print(f"# lora_memory  {env['date']}  {env['machine']}  python {env['python']}")
    print(
        f"# {args.preset} shape, layout (1,1,1), ZeRO-1, {args.precision}, micro-batch {args.micro_batch} x seq "
        f"{args.seq}, global batch {args.micro_batch}, no activation checkpointing; LoRA rank {args.lora_rank} on "
        f"{', '.join(args.lora_targets)}; depths {args.layers}; each (mode, depth) in a fresh process",
        flush=True,
    )
    runs = measure_all(args)
    env.update(loadavg_end=loadavg(), **{k: runs[0][k] for k in ("torch", "deepspeed", "device_name")})
    print(f"# device: {env['device_name']};  torch {env['torch']}, deepspeed {env['deepspeed']}")
    print_runs(runs)
    at = at_depth(args, runs, full_depth)
    ratios = print_at_depth(at, args, full_depth, cuda)
    print_notes(env, runs, cuda)
    setup = pick(args, "preset", "device", "layers")
    setup.update(full_depth=full_depth, **pick(args, "seq", "micro_batch", "precision", "lora_rank", "lora_targets"))
    setup["extrapolated"] = full_depth not in args.layers
    result = dict(env=env, setup=setup, runs=runs, at_full_depth=at, ratios_lora_over_full=ratios)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
