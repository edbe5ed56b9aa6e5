"""Structured output's cost: decoding tokens/s of the inference engine with and without a grammar, same model,
same engine, same run.

Workloads (each request decodes exactly `--max-tokens` new tokens, seeded sampling, so every workload produces
the same number of tokens): `free` (no grammar), `json_schema` (a schema of objects with bounded strings,
integers, enums and a nested array, whose `minItems` makes every document longer than the budget: the mask is
computed at every step, never cut short by a finished document) and `regex` (letters and spaces, at least as many
characters as tokens). Per batch size in `--batches`, each workload runs `--rounds` times, interleaved (the best
round counts: the machine may be shared); the table gives tokens/s, the ratio to `free`, and the time per
decoding step spent on the masks (llguidance filling them, `apply_token_bitmask` applying them). The first
compile of the schema (cold, then cached) is timed too.

    python benchmarks/structured_output.py --preset pythia-160m --batches 1,8 --max-tokens 64
    python benchmarks/structured_output.py --preset pythia-1.4b --device cuda --dtype bf16 --batches 1,32

Random weights (throughput does not depend on them); the GPT-NeoX-20B tokenizer from ../shared when present.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import device_name, load_tokenizer, loadavg, log, machine, now, shape_line, sync, write_json

from neoxray.model.config import get_preset
from neoxray.model.decoding import SamplingParams
from neoxray.model.gptneox import build_model
from neoxray.model.precision import resolve_device, to_dtype
from neoxray.platform.inference import output_processor
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import EngineConfig, Request, StructuredOutput

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": ITEM, "minItems": 64}},
    "required": ["people"],
    "additionalProperties": False,
}


def workloads(max_tokens: int) -> dict[str, StructuredOutput | None]:
    return {
        "free": None,
        "json_schema": StructuredOutput.json_schema(SCHEMA),
        "regex": StructuredOutput.regex(f"[a-z ]{{{max_tokens},}}"),
    }


class MaskTimer:
    """Wall time spent filling and applying masks (wraps the engine's two calls)."""

    def __init__(self, eng: InferenceEngine):
        self.fill = self.apply = 0.0
        self.steps = 0
        grammars, apply = eng.output_processor.grammars, output_processor.apply_token_bitmask
        fill = grammars.fill_bitmask

        def timed_fill(gs):
            t = time.perf_counter()
            try:
                return fill(gs)
            finally:
                self.fill += time.perf_counter() - t
                self.steps += 1

        def timed_apply(*a):
            t = time.perf_counter()
            apply(*a)
            sync(eng.device)
            self.apply += time.perf_counter() - t

        grammars.fill_bitmask = timed_fill
        output_processor.apply_token_bitmask = timed_apply


def run(eng: InferenceEngine, spec, batch: int, args, seed: int) -> float:
    """tokens/s of `batch` requests decoded together, each exactly max_tokens new tokens."""
    g = torch.Generator().manual_seed(seed)
    reqs = [
        Request(
            torch.randint(100, 20000, (args.prompt_len,), generator=g).tolist(),
            max_tokens=args.max_tokens,
            sampling=SamplingParams(seed=seed * 1000 + i, stop_at_eod=False),
            structured=spec,
        )
        for i in range(batch)
    ]
    sync(eng.device)
    t = time.perf_counter()
    done = eng.run_until_done(reqs)
    sync(eng.device)
    wall = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for c in done)
    if tokens != batch * args.max_tokens or any(c.finish_reason != "length" for c in done):
        raise SystemExit(f"a request ended early ({[c.finish_reason for c in done]}): the workloads are not equal")
    return tokens / wall


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pythia-160m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (default: 1,8)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(resolve_device(args.device)), to_dtype(args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(Path(tmp))
    cfg = get_preset(args.preset, eos_token_id=tok.eod_id, bos_token_id=tok.eod_id)
    log(f"building {args.preset} (random weights) on {device}")
    model = build_model(cfg, seed=0).to(device=device, dtype=dtype)
    eng = InferenceEngine(model, tok, EngineConfig(max_num_seqs=max(batches), prefix_caching=False))
    kinds = workloads(args.max_tokens)
    t = time.perf_counter()
    eng.check(Request([1], structured=kinds["json_schema"]))  # the tokenizer read, the schema compiled
    first_compile = time.perf_counter() - t
    t = time.perf_counter()
    eng.check(Request([1], structured=kinds["json_schema"]))
    cached_compile = time.perf_counter() - t
    timer = MaskTimer(eng)
    run(eng, None, 1, args, seed=0)  # warm-up
    best: dict[tuple[str, int], float] = {}
    masks: dict[tuple[str, int], tuple[float, float]] = {}
    for r in range(args.rounds):
        for batch in batches:
            for name, spec in kinds.items():
                timer.fill = timer.apply = 0.0
                timer.steps = 0
                tps = run(eng, spec, batch, args, seed=r + 1)
                log(f"round {r + 1}: batch {batch} {name}: {tps:.1f} tokens/s")
                if tps > best.get((name, batch), 0.0):
                    best[name, batch] = tps
                    steps = max(timer.steps, 1)
                    masks[name, batch] = (timer.fill / steps * 1e3, timer.apply / steps * 1e3)
    print(f"# structured_output.py  {now()}  {machine()}  load average {loadavg()}")
    print(f"# device {device_name(device)}, {args.dtype}; llguidance masks over V={cfg.vocab_size}")
    print(shape_line(args.preset, cfg, False) + f"; prompt {args.prompt_len}, {args.max_tokens} new tokens each")
    print(
        f"# schema compile: first {first_compile * 1e3:.1f} ms (tokenizer read included), "
        f"cached {cached_compile * 1e3:.2f} ms"
    )
    print(f"{'batch':>5} {'workload':<12} {'tokens/s':>9} {'vs free':>8} {'fill ms/step':>13} {'apply ms/step':>14}")
    rows = []
    for batch in batches:
        for name in kinds:
            tps, ratio = best[name, batch], best[name, batch] / best["free", batch]
            fill, apply = masks[name, batch]
            print(f"{batch:>5} {name:<12} {tps:>9.1f} {ratio:>8.3f} {fill:>13.2f} {apply:>14.2f}")
            rows.append(dict(batch=batch, workload=name, tokens_per_s=tps, vs_free=ratio, fill_ms=fill, apply_ms=apply))
    write_json(
        args.json,
        dict(
            date=now(),
            machine=machine(),
            device=device_name(device),
            load=loadavg(),
            preset=args.preset,
            args=vars(args),
            compile_ms=dict(first=first_compile * 1e3, cached=cached_compile * 1e3),
            rows=rows,
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
