"""Serving layouts: one model replica's engine as one process or split over tensor-parallel workers, with
weights as stored or weight-only int8 (torchao), in one run on the same saved weights.

Each layout runs in a fresh process (so no layout's memory counts against another's): it loads the model with
`InferenceEngine.from_path` (tensor-parallel workers: local processes, each reading only its shard of the
safetensors files), then serves `--clients` concurrent greedy requests of `--prompt-len` prompt tokens and
`--max-tokens` new tokens (ignore_eos) twice (a warm-up, then the timed run). Reported per layout: output
tokens/s, the weight bytes each worker holds, and the peak resident memory (VmHWM) of every process that holds
weights (the engine process itself for tp=1; each worker for tp>1, plus the driver, which holds none).

    python benchmarks/serve_layouts.py --preset pythia-160m --layouts 1,2,1:int8,2:int8
    # GPU (the 20B shape, 4 layers): bf16, int8, int4
    python benchmarks/serve_layouts.py --preset neox-20b --layers 4 --device cuda --layouts 1,1:int8,1:int4

Random weights (throughput and memory do not depend on them); quality is `benchmarks/quantization_quality.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_tokenizer, log, machine, now, write_json

SCHEMES = {"int8": "int8_weight_only", "int4": "int4_weight_only"}


def peak_rss(pid: int) -> int:
    """The peak resident memory of process `pid` in bytes (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> dict:
    """One layout, in this process: load, warm up, time; print one JSON line."""
    from neoxray.model.decoding import SamplingParams
    from neoxray.platform.inference.engine import InferenceEngine
    from neoxray.platform.inference.request import EngineConfig, Request

    tp, scheme = args.child_tp, args.child_quant or None
    config = EngineConfig(
        max_num_seqs=args.clients, kv_cache_tokens=args.clients * (args.prompt_len + args.max_tokens + 16)
    )
    t0 = time.perf_counter()
    engine = InferenceEngine.from_path(
        args.model_dir, device=args.device, config=config, tensor_parallel_size=tp, quantization=scheme
    )
    load_s = time.perf_counter() - t0
    greedy = SamplingParams(greedy=True, stop_at_eod=False)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 64)[: args.prompt_len]

    def run() -> float:
        reqs = [
            Request(list(ids[i:] + ids[:i]), max_tokens=args.max_tokens, sampling=greedy) for i in range(args.clients)
        ]
        t = time.perf_counter()
        outs = engine.run_until_done(reqs)
        assert all(len(o.token_ids) == args.max_tokens for o in outs)
        return time.perf_counter() - t

    run()  # warm-up
    wall = run()
    pids = [w.proc.pid for w in engine.executor.workers] if tp > 1 else [os.getpid()]
    result = {
        "tensor_parallel_size": tp,
        "quantization": scheme,
        "load_s": round(load_s, 2),
        "tokens_per_s": round(args.clients * args.max_tokens / wall, 1),
        "weight_bytes_per_worker": engine.describe()["weight_bytes_per_worker"],
        "peak_rss_per_worker": [peak_rss(p) for p in pids],
        "driver_peak_rss": peak_rss(os.getpid()),
    }
    engine.stop(timeout=10, drain=False)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-160m")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPUs, fp32 on CPUs")
    p.add_argument("--layouts", default="1,2,1:int8,2:int8", help="TP[:int8|int4], comma-separated")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--child-tp", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-quant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def save_model(args, tmp: Path) -> Path:
    """Random weights of the preset's shape, saved as a Hugging Face directory with the tokenizer."""
    import torch

    from neoxray.model.config import get_preset
    from neoxray.model.gptneox import build_model
    from neoxray.model.hf import save_pretrained
    from neoxray.model.precision import inference_dtype, to_dtype

    tok = load_tokenizer(tmp)
    overrides = {"n_layers": args.layers} if args.layers else {}
    cfg = get_preset(args.preset, eos_token_id=tok.eod_id, bos_token_id=tok.eod_id, **overrides)
    dtype = inference_dtype(args.device, to_dtype(args.dtype))
    model = build_model(cfg, seed=0).to(dtype)
    out = save_pretrained(model, tmp / "model", tokenizer=tok)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_tp is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(args, Path(tmp))
        rows = []
        for layout in args.layouts.split(","):
            tp, _, q = layout.partition(":")
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--model-dir", str(model_dir), "--child-tp", tp]
            if q:
                cmd += ["--child-quant", SCHEMES[q]]
            log(f"layout tp={tp} {q or 'as stored'}")
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                log(f"  failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
                continue
            rows.append(json.loads(line[7:]))
    base = next((r for r in rows if r["tensor_parallel_size"] == 1 and not r["quantization"]), None)
    print(f"{'layout':<16}{'tokens/s':>10}{'vs tp1':>8}{'weights/worker':>16}{'peak RSS/worker':>18}{'driver RSS':>12}")
    for r in rows:
        name = f"tp={r['tensor_parallel_size']} {r['quantization'] or 'as stored'}"
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        rss = "/".join(f"{b / 2**20:.0f}" for b in r["peak_rss_per_worker"])
        print(
            f"{name:<16}{r['tokens_per_s']:>10.1f}{ratio:>8}{r['weight_bytes_per_worker'] / 2**20:>13.1f} MiB"
            f"{rss:>14} MiB{r['driver_peak_rss'] / 2**20:>8.0f} MiB"
        )
    if args.json:
        write_json(
            args.json, {"benchmark": "serve_layouts", "date": now(), "machine": machine(), **vars(args), "rows": rows}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
