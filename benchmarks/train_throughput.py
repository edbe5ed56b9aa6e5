"""Full training-step throughput: the platform's `TrainEngine` (without Ray) against transformers'
`GPTNeoXForCausalLM` + `torch.optim.AdamW`, same architecture, same weights, same data, one process.

    ours : `neoxray.platform.train.engine.TrainEngine` in a world of one (dp = tp = pp = 1): DeepSpeed's pipeline
           engine, ZeRO-1, gradient accumulation = global_batch / micro_batch, gradient clipping, our AdamW.
           On CUDA `train.precision=bf16` (DeepSpeed bf16: bf16 weights and activations, fp32 master weights
           and fp32 gradient accumulation); on CPU fp32.
    HF   : `GPTNeoXForCausalLM` (SDPA attention) with `torch.optim.AdamW` (fused on CUDA). On CUDA fp32 weights
           under `torch.autocast(bfloat16)` (what `hf_baseline.py` in ../shared/gpu measures, and what the HF
           Trainer does with bf16=True); on CPU fp32. Gradients clipped to the same norm as ours (as the HF
           Trainer does by default; `--no-hf-clip` to leave it out, as `hf_baseline.py` does).

One step = `--grad-accum` micro-batches of `--micro-batch` x `--seq` tokens, forward and backward, then one
optimizer step, for both. The loss is the same function for both (next-token cross-entropy, fp32 logits).
Data: a pool of random token ids made on the device (rows of seq + 1 tokens: input_ids = row[:-1],
labels = row[1:]), cycled by an infinite iterator; both models see the same micro-batches in the same order.

Both models start from the same weights: one initialisation (GPT-NeoX's rules, as `neoxray.model.init` applies
them, drawn on the device) is loaded into the engine (through its `loader` hook, as a checkpoint would be) and
into the HF model (through the `neoxray.model.hf` name map). The first step's loss and gradient norm are
compared before ours is timed.

Memory: on CUDA the two models are built and measured one after the other (HF first, freed, then ours), since
both may not fit; peak memory is `torch.cuda.max_memory_allocated` from that model's build to the end of its
measurement. On CPU (`--mode auto`) both stay resident and are measured in alternating rounds.

Imports torch, transformers, deepspeed and neoxray (never Ray; checked and reported at the end).

    python benchmarks/train_throughput.py --steps 3                         # CPU: tiny, fp32
    python benchmarks/train_throughput.py --preset pythia-1.4b --micro-batch 8 --seq 2048 --steps 8
    python benchmarks/train_throughput.py --preset neox-20b --layers 4 --micro-batch 4 --seq 2048 --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():  # DeepSpeed picks its accelerator at import time
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import common
from common import GIB, PEAK_FLOPS, StepRunner, agreement, build_hf, free_memory

from neoxray.model.gptneox import build_model, cross_entropy

DEFAULTS = (
    ("preset", "tiny", "pythia-1.4b"),
    ("micro_batch", 2, 8),
    ("seq", 128, 2048),
    ("steps", 3, 8),
    ("warmup", 1, 2),
)
"""(flag, CPU default, CUDA default) of the flags left unset."""


# -------------------------------------------------------------------------------------------------------
# data: random token ids on the device
# -------------------------------------------------------------------------------------------------------
def make_pool(vocab: int, micro: int, seq: int, n: int, device: torch.device, seed: int):
    """`n` (input_ids, labels) micro-batches [micro, seq], made on the device from one seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    pool = []
    for _ in range(n):
        row = torch.randint(0, vocab, (micro, seq + 1), device=device, generator=g)
        pool.append((row[:, :-1].contiguous(), row[:, 1:].contiguous()))
    return pool


def batches(pool):
    """The infinite micro-batch iterator: the pool, over and over (each model gets its own, from the start)."""
    return itertools.cycle(pool)


# -------------------------------------------------------------------------------------------------------
# the two training steps
# -------------------------------------------------------------------------------------------------------
class Runner(StepRunner):
    resident_gib = None  # allocated after the build (CUDA)

    def measure_peak(self):
        if self.device.type == "cuda":
            self.peak_gib = max(self.peak_gib or 0.0, torch.cuda.max_memory_allocated(self.device) / GIB)


class HFRunner(Runner):
    name = "transformers"

    def __init__(self, cfg, mc, state_dict, pool, args, device):
        super().__init__(device)
        self.model = build_hf(mc, device, state_dict)
        if args.activation_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # the newer transformers 5 name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if args.compile_hf:
            for layer in self.model.gpt_neox.layers:
                layer.compile()
        from neoxray.platform.train.pipe import no_decay  # the engine's weight-decay groups (no Ray, no DeepSpeed)

        o = cfg.optimizer
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not no_decay(n)], "weight_decay": o.weight_decay},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda"
        )
        self.clip = o.clip_grad if args.hf_clip else 0.0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.it = batches(pool)
        self.accum = args.grad_accum
        self.amp = torch.bfloat16 if device.type == "cuda" else None
        self.resident_gib = (torch.cuda.memory_allocated(device) / GIB) if device.type == "cuda" else None

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def step(self, check: bool = False):
        total = None
        for _ in range(self.accum):
            ids, labels = next(self.it)
            with self._autocast():
                logits = self.model(input_ids=ids, use_cache=False).logits
                loss = cross_entropy(logits, labels)
            (loss / self.accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        norm = None
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        elif check:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params], foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if check:
            return (total / self.accum).item(), float(norm)
        return None

    def close(self):
        self.model = self.opt = self.params = self.it = None


class OursRunner(Runner):
    name = "neoxray"

    def __init__(self, cfg, state_dict, pool, args, device):
        super().__init__(device)
        from neoxray.platform.train.engine import TrainEngine, micro_batch
        from neoxray.platform.train.pipe import LayerPipe

        @torch.no_grad()
        def loader(piece):  # fill each freshly built piece from the shared initial weights (tp = 1: no shards)
            for name, p in piece.canonical_parameters():
                p.copy_(state_dict[name])

        self.engine = TrainEngine(cfg, loader=loader)
        if self.engine.device != device:
            raise RuntimeError(f"engine runs on {self.engine.device}, the benchmark on {device}")
        if args.compile:  # regional compilation: each transformer layer alone (identical layers share a graph)
            for piece in self.engine.pieces:
                if isinstance(piece, LayerPipe):
                    piece.compile()
        self.it = batches([micro_batch(ids, labels) for ids, labels in pool])  # the same micro-batches, weight 1
        self.resident_gib = (torch.cuda.memory_allocated(device) / GIB) if device.type == "cuda" else None
        # the engine's weights are the shared initial ones (cast to its dtype)
        with torch.no_grad():
            diffs = [
                (p.detach() - state_dict[n].to(p.device, p.dtype)).abs().max().float()
                for n, p in self.engine.named_parameters()
            ]
            self.weights_max_diff = torch.stack(diffs).max().item()
        if len(diffs) != len(state_dict):
            raise RuntimeError(f"engine has {len(diffs)} parameters, the plain model {len(state_dict)}")

    def step(self, check: bool = False):
        m = self.engine.train_step(self.it)
        self.inner_time = m["step_time_s"]
        if check:
            return m["loss"], m["grad_norm"]
        return None

    def close(self):
        self.engine = self.it = None


# -------------------------------------------------------------------------------------------------------
# the measurement
# -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def initial_weights(mc, seed, device):
    """The shared initial weights, fp32, kept on the CPU: GPT-NeoX's initialisation rules as
    `neoxray.model.init` applies them, but drawn on the device from one seeded generator (`neox_init_`): the
    engine's own per-parameter CPU generators take about a minute for a billion parameters, which this benchmark
    does not need to spend twice."""
    model = build_model(mc, device=device, dtype=torch.float32, seed=None)  # materialised, not initialised
    common.neox_init_(model.named_parameters(), mc, torch.Generator(device=device).manual_seed(seed))
    sd = {
        n: p.detach().to("cpu", copy=True) if device.type != "cpu" else p.detach() for n, p in model.named_parameters()
    }
    if len(sd) != len(model.state_dict()):
        raise RuntimeError("the plain model has buffers in its state_dict: the copy would miss them")
    del model
    free_memory(device)
    return sd


def run_sequential(cfg, mc, sd, pool, args, device, rtol, grad_rtol):
    """HF: build, check step, warm-up, timed steps, free; then ours the same. One model on the device at a time."""
    cuda = device.type == "cuda"
    if cuda:
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    hf = HFRunner(cfg, mc, sd, pool, args, device)
    hf_check = hf.check_step()
    print(f"HF first step: loss {hf_check[0]:.6f}, grad norm {hf_check[1]:.6f} ({hf.first_step_s:.2f} s)", flush=True)
    hf.block(args.warmup, args.steps)
    hf.measure_peak()
    print(f"HF: {1e3 * hf.round_medians[-1]:.1f} ms/step (median of {args.steps})", flush=True)
    hf.close()
    free_memory(device, reset_compiled=True)

    if cuda:
        leftover = torch.cuda.memory_allocated(device) / GIB
        if leftover > 0.5:
            print(f"# note: {leftover:.1f} GiB still allocated after freeing the HF model", flush=True)
        torch.cuda.reset_peak_memory_stats(device)
    ours = OursRunner(cfg, sd, pool, args, device)
    ours_check = ours.check_step()
    chk = agreement(ours_check, hf_check, rtol, grad_rtol)
    chk["weights_max_abs_diff"] = ours.weights_max_diff
    common.print_agreement(chk, args.strict, " (first step, same weights and micro-batches)")
    ours.block(args.warmup, args.steps)
    ours.measure_peak()
    print(f"ours: {1e3 * ours.round_medians[-1]:.1f} ms/step (median of {args.steps})", flush=True)
    return ours, hf, chk


def run_interleaved(cfg, mc, sd, pool, args, device, rtol, grad_rtol):
    """Both resident; rounds of [warm-up + timed steps] alternate between the models (order swapped each round)."""
    hf = HFRunner(cfg, mc, sd, pool, args, device)
    ours = OursRunner(cfg, sd, pool, args, device)
    chk = agreement(ours.check_step(), hf.check_step(), rtol, grad_rtol)
    chk["weights_max_abs_diff"] = ours.weights_max_diff
    common.print_agreement(chk, args.strict, " (first step, same weights and micro-batches)")
    for r in (ours, hf):
        r.run(args.warmup)
    for rnd in range(args.rounds):
        for r in (ours, hf) if rnd % 2 == 0 else (hf, ours):
            r.block(args.round_warmup, args.steps)
        print(
            f"round {rnd + 1}/{args.rounds}: "
            + "  ".join(f"{r.name} {1e3 * r.round_medians[-1]:.1f} ms" for r in (ours, hf)),
            flush=True,
        )
    return ours, hf, chk


def summarize(r: Runner, mc, args, device) -> dict:
    out = common.step_summary(r, args.micro_batch * args.grad_accum * args.seq, mc.train_flops_per_token(args.seq))
    if r.inner_times:
        # the engine's own step_time_s (around DeepSpeed's train_batch only); the row's figure is the whole
        # engine.train_step call (the data iterator, the metrics' host reads included)
        out["engine_step_time_ms_median"] = 1e3 * statistics.median(r.inner_times)
    if device.type == "cuda":
        out["mfu"] = out["tflops"] * 1e12 / PEAK_FLOPS
        out["peak_gib"] = r.peak_gib
        out["resident_after_build_gib"] = r.resident_gib
    return out


# -------------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, pythia-1.4b on CUDA)")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (e.g. 4 layers of neox-20b)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default 2 CPU, 8 CUDA)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128 CPU, 2048 CUDA)")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (ours: global_batch = micro x accum; HF: the same loop)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed optimizer steps per model (per round) (default 3 CPU, 8 CUDA)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per model after the checked first step (default 1 CPU, 2 CUDA)",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds in interleaved mode (default 3)")
    p.add_argument(
        "--round-warmup", type=int, default=1, help="untimed steps per model per round, interleaved mode (default 1)"
    )
    p.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "interleaved", "sequential"],
        help="sequential: HF then ours, one on the device at a time; interleaved: both resident, "
        "alternating rounds; auto (default): sequential on CUDA, interleaved on CPU",
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layer activations (both)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer layer of ours")
    p.add_argument("--compile-hf", action="store_true", help="torch.compile each transformer layer of HF's")
    p.add_argument(
        "--no-hf-clip",
        dest="hf_clip",
        action="store_false",
        help="no gradient clipping on the HF side (ours always clips to optimizer.clip_grad)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1234, help="weights (train.seed) and data seed (default 1234)")
    p.add_argument("--strict", action="store_true", help="stop when the first-step check fails")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO logging")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def run_setup(args, cfg, mc, mode: str, cuda: bool, policy: dict) -> dict:
    return dict(
        preset=args.preset,
        **common.model_shape(mc),
        **common.pick(args, "micro_batch", "seq", "grad_accum"),
        global_batch=cfg.train.global_batch,
        tokens_per_step=args.micro_batch * args.grad_accum * args.seq,
        precision="bf16" if cuda else "fp32",
        precision_policy=policy,
        activation_checkpointing=args.activation_checkpointing,
        compile_ours=args.compile,
        compile_hf=args.compile_hf,
        hf_clip=args.hf_clip,
        clip_grad=cfg.optimizer.clip_grad,
        zero_stage=cfg.parallel.zero_stage,
        layout="dp=1 tp=1 pp=1",
        **common.pick(args, "steps", "warmup"),
        rounds=args.rounds if mode == "interleaved" else 1,
        seed=args.seed,
        train_flops_per_token=mc.train_flops_per_token(args.seq),
    )


def precision_policy(cuda: bool) -> dict:
    return {
        "ours": "DeepSpeed bf16 (bf16 weights/activations, fp32 master weights + fp32 grad accumulation)"
        if cuda
        else "fp32",
        "hf": "fp32 weights under torch.autocast(bfloat16), fused AdamW" if cuda else "fp32, AdamW",
    }


def print_setup(args, cfg, mc, policy: dict) -> None:
    print(
        common.shape_line(args.preset, mc, bool(args.layers))
        + f";  micro-batch {args.micro_batch} x seq {args.seq} x accum "
        f"{args.grad_accum} = {args.micro_batch * args.grad_accum * args.seq} tokens/step;  activation checkpointing "
        f"{args.activation_checkpointing};  compile ours {args.compile}, HF {args.compile_hf}"
    )
    print(
        f"# precision: ours {policy['ours']};  HF {policy['hf']};  grad clip ours {cfg.optimizer.clip_grad:g}, HF "
        f"{cfg.optimizer.clip_grad if args.hf_clip else 0:g};  ours = TrainEngine (DeepSpeed pipeline engine, "
        f"ZeRO-{cfg.parallel.zero_stage}, dp=tp=pp=1, no Ray);  SDPA both",
        flush=True,
    )


def measure(cfg, mc, args, device, mode: str):
    """The shared weights and micro-batches, then both models measured; returns (ours, hf, check)."""
    rtol, grad_rtol = common.tolerances(device.type == "cuda", args.compile or args.compile_hf)
    t0 = time.perf_counter()
    sd = initial_weights(mc, cfg.train.seed, device)
    pool = make_pool(mc.vocab_size, args.micro_batch, args.seq, args.grad_accum, device, args.seed + 1)
    print(f"# initial weights drawn in {time.perf_counter() - t0:.1f} s; mode {mode}", flush=True)
    if mode == "sequential":
        return run_sequential(cfg, mc, sd, pool, args, device, rtol, grad_rtol)
    ours, hf, chk = run_interleaved(cfg, mc, sd, pool, args, device, rtol, grad_rtol)
    ours.measure_peak()
    hf.measure_peak()
    return ours, hf, chk


def print_results(rows, env, args, mode: str, cuda: bool) -> float:
    """The table and its notes; returns the ratio ours/HF."""
    how = (
        "SEQUENTIAL (HF built, measured and freed; then ours)"
        if mode == "sequential"
        else "interleaved rounds (order swapped each round), both models resident"
    )
    print(f"\n# measurement: {how}; medians over {rows[0]['timed_steps']} timed optimizer steps per model")
    ratio = common.print_step_table(rows, cuda, range_width=18)
    if "engine_step_time_ms_median" in rows[0]:
        print(
            f"# ours' own step_time_s (around DeepSpeed train_batch): median "
            f"{rows[0]['engine_step_time_ms_median']:.1f} ms"
        )
    if cuda:
        print(
            "# MFU = tokens/s x train_flops_per_token(seq) / 989e12; peak GiB = torch.cuda.max_memory_allocated "
            "from that model's build to the end of its measurement (reset between models)"
        )
    else:
        print(f"# load average at start {env['loadavg_start']}, at end {env['loadavg_end']} ({os.cpu_count()} CPUs)")
    if args.compile or args.compile_hf:
        common.print_first_steps(rows)
    return ratio


def quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    common.fill_defaults(args, cuda, DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = args.mode if args.mode != "auto" else ("sequential" if cuda else "interleaved")
    if mode == "interleaved":
        total_steps = 2 + args.warmup + args.rounds * (args.round_warmup + args.steps)
    else:
        total_steps = 1 + args.warmup + args.steps

    import deepspeed
    import transformers

    if not args.verbose:
        quiet_deepspeed()
    cfg = common.engine_run_config(
        "train_throughput",
        args.preset,
        **common.pick(args, "seq", "micro_batch", "layers", "activation_checkpointing", "seed"),
        global_batch=args.micro_batch * args.grad_accum,
        precision="bf16" if cuda else "fp32",
        device="cuda" if cuda else "cpu",
        steps=max(total_steps, 1),
    )
    mc = cfg.model_config()
    env = common.run_env(device, {"transformers": transformers.__version__, "deepspeed": deepspeed.__version__})
    policy = precision_policy(cuda)
    setup = run_setup(args, cfg, mc, mode, cuda, policy)
    common.print_run_header("train_throughput", env, ("transformers", "deepspeed"))
    print_setup(args, cfg, mc, policy)
    ours, hf, chk = measure(cfg, mc, args, device, mode)
    env["loadavg_end"] = common.loadavg()
    rows = [summarize(r, mc, args, device) for r in (ours, hf)]
    ratio = print_results(rows, env, args, mode, cuda)
    ray_imported = "ray" in sys.modules
    print(f"# ray imported: {ray_imported}")
    result = dict(
        env=env, setup=setup, mode=mode, check=chk, results=rows, ratio_ours_over_hf=ratio, ray_imported=ray_imported
    )
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
