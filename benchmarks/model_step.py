"""Training-step throughput: `neoxray.model` against transformers' `GPTNeoXForCausalLM`.

Both models get the same architecture, the same weights (ours are copied into the Hugging Face model through
the `neoxray.model.hf` name map), the same batch, the same dtype policy and the same thread count, and are
measured in one process, in alternating rounds so that machine noise hits both alike:

    round r:  [warm-up, N timed steps of model A]  [warm-up, N timed steps of model B]
              (A and B swap places every round; medians are reported)

A step is: forward on input[:, :-1], next-token cross-entropy against input[:, 1:] (one shared loss function,
fp32 logits), backward, gradients set to None. No optimizer. Attention is SDPA in both models.

Before timing, one checked step runs on each model and their losses (and gradient norms) must agree.

Imports only torch, transformers and neoxray.model.* (runs where Ray and DeepSpeed are absent).

    python benchmarks/model_step.py                                  # CPU: pythia-70m, small batch
    python benchmarks/model_step.py --preset pythia-1.4b --dtype bf16 --batch 8 --seq 2048 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from common import GIB, PEAK_FLOPS, agreement, build_hf, device_name, free_memory, loadavg, now, print_agreement, sync

from neoxray.model.config import get_preset
from neoxray.model.gptneox import build_model, cross_entropy


# -------------------------------------------------------------------------------------------------------
# the two models
# -------------------------------------------------------------------------------------------------------
def build_ours(cfg, device, seed):
    torch.manual_seed(seed)
    model = build_model(cfg, device=device, dtype=torch.float32, seed=seed)
    return model.train()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Runner:
    """One model's training step on the shared batch."""

    def __init__(self, name, kind, model, inp, tgt, amp_dtype, compile_model, compile_scope="model"):
        self.name, self.kind, self.model = name, kind, model
        self.inp, self.tgt = inp, tgt
        self.device = inp.device
        self.amp_dtype = amp_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fn = model
        if compile_model and compile_scope == "model":
            self.fn = torch.compile(model)
        elif compile_model:  # regional: each transformer layer compiled alone (identical layers share one graph)
            layers = model.gpt_neox.layers if kind == "hf" else model.layers
            for layer in layers:
                layer.compile()
        self.compiled = compile_model
        self.times: list[float] = []
        self.round_medians: list[float] = []
        self.first_step_s = None
        self.peak_gib = None

    def _amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, check: bool = False):
        with self._amp():
            if self.kind == "hf":
                logits = self.fn(input_ids=self.inp, use_cache=False).logits
            else:
                logits = self.fn(self.inp)
            loss = cross_entropy(logits, self.tgt)
        loss.backward()
        out = None
        if check:
            grads = [p.grad.float().norm() for p in self.params if p.grad is not None]
            out = (loss.item(), torch.stack(grads).norm().item(), len(grads))
        for p in self.params:
            p.grad = None
        return out

    def timed(self, n: int) -> list[float]:
        ts = []
        for _ in range(n):
            sync(self.device)
            t0 = time.perf_counter()
            self.step()
            sync(self.device)
            ts.append(time.perf_counter() - t0)
        return ts

    def block(self, warmup: int, steps: int, other_resident_bytes: int = 0) -> None:
        """Warm-up then `steps` timed steps; peak memory measured over this block only."""
        cuda = self.device.type == "cuda"
        if cuda:
            free_memory(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(warmup):
            self.step()
        ts = self.timed(steps)
        self.times += ts
        self.round_medians.append(statistics.median(ts))
        if cuda:
            peak = (torch.cuda.max_memory_allocated(self.device) - other_resident_bytes) / GIB
            self.peak_gib = max(self.peak_gib or 0.0, peak)

    def check_step(self):
        """The very first step (compilation happens here): loss and grad norm for the check, wall time kept."""
        sync(self.device)
        t0 = time.perf_counter()
        out = self.step(check=True)
        self.first_step_s = time.perf_counter() - t0
        return out

    def first_steps(self, n: int) -> None:
        """Untimed warm-up before round 1."""
        for _ in range(n):
            self.step()


# -------------------------------------------------------------------------------------------------------
# the measurement
# -------------------------------------------------------------------------------------------------------
def make_batch(cfg, args, device):
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def run_interleaved(cfg, args, device, amp_dtype, rtol, grad_rtol):
    inp, tgt = make_batch(cfg, args, device)
    ours_model = build_ours(cfg, device, args.seed)
    hf_model = build_hf(cfg, device, ours_model.state_dict())
    ours = Runner("neoxray", "ours", ours_model, inp, tgt, amp_dtype, args.compile, args.compile_scope)
    hf = Runner("transformers", "hf", hf_model, inp, tgt, amp_dtype, args.compile_hf, args.compile_scope)
    chk = agreement(ours.check_step(), hf.check_step(), rtol, grad_rtol)
    print_agreement(chk)
    for r in (ours, hf):
        r.first_steps(args.warmup)
    sizes = {id(ours): param_bytes(ours_model), id(hf): param_bytes(hf_model)}
    for rnd in range(args.rounds):
        order = (ours, hf) if rnd % 2 == 0 else (hf, ours)
        for r in order:
            other = hf if r is ours else ours
            r.block(args.round_warmup, args.steps, other_resident_bytes=sizes[id(other)])
        print(
            f"round {rnd + 1}/{args.rounds}: "
            + "  ".join(f"{r.name} {1e3 * r.round_medians[-1]:.1f} ms" for r in (ours, hf)),
            flush=True,
        )
    return ours, hf, chk


def run_sequential(cfg, args, device, amp_dtype, rtol, grad_rtol):
    """One model on the device at a time: ours (all rounds), then HF (all rounds), weights kept on the CPU."""
    inp, tgt = make_batch(cfg, args, device)
    ours_model = build_ours(cfg, device, args.seed)
    sd_cpu = {k: v.detach().to("cpu", copy=True) for k, v in ours_model.state_dict().items()}
    ours = Runner("neoxray", "ours", ours_model, inp, tgt, amp_dtype, args.compile, args.compile_scope)
    ours_chk = ours.check_step()
    ours.first_steps(args.warmup)
    for rnd in range(args.rounds):
        ours.block(args.round_warmup, args.steps)
        print(f"ours round {rnd + 1}/{args.rounds}: {1e3 * ours.round_medians[-1]:.1f} ms", flush=True)
    ours.model = ours.fn = ours.params = None
    del ours_model
    free_memory(device, reset_compiled=True)
    hf_model = build_hf(cfg, device, sd_cpu)
    del sd_cpu
    hf = Runner("transformers", "hf", hf_model, inp, tgt, amp_dtype, args.compile_hf, args.compile_scope)
    chk = agreement(ours_chk, hf.check_step(), rtol, grad_rtol)
    print_agreement(chk)
    hf.first_steps(args.warmup)
    for rnd in range(args.rounds):
        hf.block(args.round_warmup, args.steps)
        print(f"HF round {rnd + 1}/{args.rounds}: {1e3 * hf.round_medians[-1]:.1f} ms", flush=True)
    return ours, hf, chk


def summarize(r: Runner, cfg, args, device) -> dict:
    med = statistics.median(r.times)
    tok_s = args.batch * args.seq / med
    tflops = tok_s * cfg.train_flops_per_token(args.seq) / 1e12
    out = dict(
        model=r.name,
        compiled=r.compiled,
        ms_per_step=1e3 * med,
        tokens_per_s=tok_s,
        tflops=tflops,
        ms_per_step_min=1e3 * min(r.times),
        ms_per_step_max=1e3 * max(r.times),
        round_medians_ms=[1e3 * t for t in r.round_medians],
        timed_steps=len(r.times),
        first_step_s=r.first_step_s,
    )
    if device.type == "cuda":
        out["mfu"] = tflops * 1e12 / PEAK_FLOPS
        out["peak_gib"] = r.peak_gib
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-70m", help="model preset (default pythia-70m)")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (e.g. 4 layers of neox-20b)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: 2 on CPU, 8 on CUDA)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence trained on (default: 256 CPU, 2048 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model per round (default 2 CPU, 10 CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 4 CPU, 3 CUDA)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per model before round 1 (default 1 CPU, 2 CUDA)"
    )
    p.add_argument(
        "--round-warmup", type=int, default=1, help="untimed steps per model at the start of each round (default 1)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="fp32 (default) or bf16 = fp32 weights under torch.autocast(bfloat16), both models",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--compile-hf", action="store_true", help="torch.compile the HF model too")
    p.add_argument(
        "--compile-scope",
        default="model",
        choices=["model", "layers"],
        help="model: torch.compile the whole model; layers: compile each layer alone (much faster to "
        "compile); default model",
    )
    p.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "interleaved", "sequential"],
        help="interleaved keeps both models on the device; sequential measures one after the other; "
        "auto (default) is interleaved, falling back to sequential on CUDA out-of-memory",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="weights and batch seed (default 0)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    cuda = device.type == "cuda"
    for key, cpu_default, cuda_default in (
        ("batch", 2, 8),
        ("seq", 256, 2048),
        ("steps", 2, 10),
        ("rounds", 4, 3),
        ("warmup", 1, 2),
    ):
        if getattr(args, key) is None:
            setattr(args, key, cuda_default if cuda else cpu_default)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"max_seq_len": max(args.seq, 1)}
    if args.layers:
        overrides["n_layers"] = args.layers
    cfg = get_preset(args.preset, **overrides)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    rtol, grad_rtol = (1e-4, 1e-3) if amp_dtype is None else (2e-2, 5e-2)
    if args.compile or args.compile_hf:  # compiled numerics drift a little from eager
        rtol, grad_rtol = max(rtol, 1e-3), max(grad_rtol, 1e-2)

    import transformers

    env = dict(
        date=now(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        device=str(device),
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        cuda=torch.version.cuda if cuda else None,
        loadavg_start=loadavg(),
    )
    setup = dict(
        preset=args.preset,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        vocab_size=cfg.vocab_size,
        params=cfg.num_parameters(),
        batch=args.batch,
        seq=args.seq,
        tokens_per_step=args.batch * args.seq,
        dtype=args.dtype,
        compile_ours=args.compile,
        compile_hf=args.compile_hf,
        compile_scope=args.compile_scope,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        round_warmup=args.round_warmup,
        train_flops_per_token=cfg.train_flops_per_token(args.seq),
    )
    print(
        f"# model_step  {env['date']}  torch {env['torch']}  transformers {env['transformers']}  "
        f"python {env['python']}" + (f"  CUDA {env['cuda']}" if cuda else "")
    )
    print(
        f"# device {env['device']}: {env['device_name']}  threads {env['threads']} "
        f"(interop {env['interop_threads']})" + (f"  load average {env['loadavg_start']}" if not cuda else "")
    )
    print(
        f"# {args.preset}"
        + (f" with {cfg.n_layers} layers" if args.layers else "")
        + f": L {cfg.n_layers}, d {cfg.d_model}, heads {cfg.n_heads}, V {cfg.vocab_size}, "
        f"{cfg.num_parameters() / 1e6:.1f}M params;  batch {args.batch} x seq {args.seq};  {args.dtype}"
        + ("  (fp32 weights, bf16 autocast)" if amp_dtype else "")
        + f";  compile ours {args.compile}, HF {args.compile_hf}"
        + (f" (scope {args.compile_scope})" if args.compile or args.compile_hf else "")
        + ";  SDPA both;  "
        f"{args.rounds} rounds x {args.steps} timed steps (+{args.round_warmup} warm-up) per model",
        flush=True,
    )

    mode = args.mode
    if mode == "auto":
        mode = "interleaved"
        if cuda:
            oom = False
            try:
                ours, hf, chk = run_interleaved(cfg, args, device, amp_dtype, rtol, grad_rtol)
            except torch.OutOfMemoryError:
                oom = True
            if oom:  # out of the except block so the traceback (and the tensors it pins) is gone
                free_memory(device, reset_compiled=True)
                print("# both models do not fit on the device together: measuring sequentially", flush=True)
                mode = "sequential"
                ours, hf, chk = run_sequential(cfg, args, device, amp_dtype, rtol, grad_rtol)
        else:
            ours, hf, chk = run_interleaved(cfg, args, device, amp_dtype, rtol, grad_rtol)
    elif mode == "interleaved":
        ours, hf, chk = run_interleaved(cfg, args, device, amp_dtype, rtol, grad_rtol)
    else:
        ours, hf, chk = run_sequential(cfg, args, device, amp_dtype, rtol, grad_rtol)

    env["loadavg_end"] = loadavg()
    rows = [summarize(r, cfg, args, device) for r in (ours, hf)]
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    how = (
        "interleaved rounds (order swapped each round), both models resident"
        if mode == "interleaved"
        else "SEQUENTIAL (one model on the device at a time: all rounds of ours, then all of HF)"
    )
    print(f"\n# measurement: {how}; medians over {rows[0]['timed_steps']} timed steps per model")
    hdr = f"{'model':<14}{'compiled':>9}{'tokens/s':>12}{'ms/step':>10}{'min..max ms':>16}{'TFLOP/s':>9}"
    if cuda:
        hdr += f"{'MFU':>7}{'peak GiB':>10}"
    print(hdr)
    for r in rows:
        line = (
            f"{r['model']:<14}{str(r['compiled']):>9}{r['tokens_per_s']:>12,.0f}{r['ms_per_step']:>10.1f}"
            f"{r['ms_per_step_min']:>8.1f}..{r['ms_per_step_max']:<6.1f}{r['tflops']:>9.2f}"
        )
        if cuda:
            line += f"{r['mfu']:>7.3f}{r['peak_gib']:>10.1f}"
        print(line)
    print(f"ratio ours/HF (tokens/s): {ratio:.3f}")
    if not cuda:
        print(
            f"# load average at start {env['loadavg_start']}, at end {env['loadavg_end']} "
            f"({os.cpu_count()} CPUs): other processes on the machine add noise to both models alike"
        )
    if cuda:
        print(
            "# MFU vs 989e12 FLOP/s; peak GiB = torch.cuda.max_memory_allocated over that model's blocks"
            + (", minus the other model's resident weights" if mode == "interleaved" else "")
        )
    if any(r["first_step_s"] is not None and (args.compile or args.compile_hf) for r in rows):
        print(
            "# first step (includes compilation): " + ", ".join(f"{r['model']} {r['first_step_s']:.1f} s" for r in rows)
        )

    result = dict(env=env, setup=setup, mode=mode, check=chk, results=rows, ratio_ours_over_hf=ratio)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"# wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
