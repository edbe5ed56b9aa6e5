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
import os

import common
import torch
from common import GIB, PEAK_FLOPS, StepRunner, agreement, build_hf, free_memory

from neoxray.model.config import get_preset
from neoxray.model.gptneox import build_model, cross_entropy

DEFAULTS = (("batch", 2, 8), ("seq", 256, 2048), ("steps", 2, 10), ("rounds", 4, 3), ("warmup", 1, 2))
"""(flag, CPU default, CUDA default) of the flags left unset."""


# -------------------------------------------------------------------------------------------------------
# the two models
# -------------------------------------------------------------------------------------------------------
def build_ours(cfg, device, seed):
    torch.manual_seed(seed)
    model = build_model(cfg, device=device, dtype=torch.float32, seed=seed)
    return model.train()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Runner(StepRunner):
    """One model's training step on the shared batch."""

    def __init__(self, name, kind, model, inp, tgt, amp_dtype, compile_model, compile_scope="model"):
        super().__init__(inp.device)
        self.name, self.kind, self.model = name, kind, model
        self.inp, self.tgt = inp, tgt
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

    def block(self, warmup: int, steps: int, other_resident_bytes: int = 0) -> None:
        """Warm-up then `steps` timed steps; peak memory measured over this block only."""
        cuda = self.device.type == "cuda"
        if cuda:
            free_memory(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        super().block(warmup, steps)
        if cuda:
            peak = (torch.cuda.max_memory_allocated(self.device) - other_resident_bytes) / GIB
            self.peak_gib = max(self.peak_gib or 0.0, peak)


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
    common.print_agreement(chk)
    for r in (ours, hf):
        r.run(args.warmup)
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
    ours.run(args.warmup)
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
    common.print_agreement(chk)
    hf.run(args.warmup)
    for rnd in range(args.rounds):
        hf.block(args.round_warmup, args.steps)
        print(f"HF round {rnd + 1}/{args.rounds}: {1e3 * hf.round_medians[-1]:.1f} ms", flush=True)
    return ours, hf, chk


def measure(cfg, args, device, amp_dtype, rtol, grad_rtol):
    """Both models measured as `--mode` says (auto: interleaved, sequential after a CUDA out-of-memory); returns
    (ours, hf, check, the mode used)."""
    run = (cfg, args, device, amp_dtype, rtol, grad_rtol)
    if args.mode == "sequential":
        return (*run_sequential(*run), "sequential")
    if args.mode == "interleaved" or device.type != "cuda":
        return (*run_interleaved(*run), "interleaved")
    try:
        return (*run_interleaved(*run), "interleaved")
    except torch.OutOfMemoryError:
        pass  # freed below, out of the except block, so the traceback (and the tensors it pins) is gone
    free_memory(device, reset_compiled=True)
    print("# both models do not fit on the device together: measuring sequentially", flush=True)
    return (*run_sequential(*run), "sequential")


def summarize(r: Runner, cfg, args, device) -> dict:
    out = common.step_summary(r, args.batch * args.seq, cfg.train_flops_per_token(args.seq), compiled=r.compiled)
    if device.type == "cuda":
        out["mfu"] = out["tflops"] * 1e12 / PEAK_FLOPS
        out["peak_gib"] = r.peak_gib
    return out


# -------------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
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
    return p.parse_args(argv)


def run_setup(args, cfg) -> dict:
    return dict(
        preset=args.preset,
        **common.model_shape(cfg),
        batch=args.batch,
        seq=args.seq,
        tokens_per_step=args.batch * args.seq,
        dtype=args.dtype,
        compile_ours=args.compile,
        compile_hf=args.compile_hf,
        **common.pick(args, "compile_scope", "steps", "rounds", "warmup", "round_warmup"),
        train_flops_per_token=cfg.train_flops_per_token(args.seq),
    )


def print_setup(args, cfg, amp_dtype) -> None:
    print(
        common.shape_line(args.preset, cfg, bool(args.layers))
        + f";  batch {args.batch} x seq {args.seq};  {args.dtype}"
        + ("  (fp32 weights, bf16 autocast)" if amp_dtype else "")
        + f";  compile ours {args.compile}, HF {args.compile_hf}"
        + (f" (scope {args.compile_scope})" if args.compile or args.compile_hf else "")
        + ";  SDPA both;  "
        f"{args.rounds} rounds x {args.steps} timed steps (+{args.round_warmup} warm-up) per model",
        flush=True,
    )


def print_results(rows, env, args, mode, cuda) -> float:
    """The table and its notes; returns the ratio ours/HF."""
    how = (
        "interleaved rounds (order swapped each round), both models resident"
        if mode == "interleaved"
        else "SEQUENTIAL (one model on the device at a time: all rounds of ours, then all of HF)"
    )
    print(f"\n# measurement: {how}; medians over {rows[0]['timed_steps']} timed steps per model")
    ratio = common.print_step_table(rows, cuda, range_width=16, compiled=True)
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
    if args.compile or args.compile_hf:
        common.print_first_steps(rows)
    return ratio


def main(argv=None) -> dict:
    args = parse_args(argv)
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = auto if args.device == "auto" else torch.device(args.device)
    cuda = device.type == "cuda"
    common.fill_defaults(args, cuda, DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"max_seq_len": max(args.seq, 1), **({"n_layers": args.layers} if args.layers else {})}
    cfg = get_preset(args.preset, **overrides)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    rtol, grad_rtol = common.tolerances(amp_dtype is not None, args.compile or args.compile_hf)

    import transformers

    env = common.run_env(device, {"transformers": transformers.__version__}, interop_threads=True)
    setup = run_setup(args, cfg)
    common.print_run_header("model_step", env, ("transformers",))
    print_setup(args, cfg, amp_dtype)
    ours, hf, chk, mode = measure(cfg, args, device, amp_dtype, rtol, grad_rtol)
    env["loadavg_end"] = common.loadavg()
    rows = [summarize(r, cfg, args, device) for r in (ours, hf)]
    ratio = print_results(rows, env, args, mode, cuda)
    result = dict(env=env, setup=setup, mode=mode, check=chk, results=rows, ratio_ours_over_hf=ratio)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
