"""Weight-only quantization (`neoxray.platform.inference.quantization`): held-out perplexity, weight bytes and
decode speed, quantized against unquantized, one process.

Models:
  trained   a small GPT-NeoX (default 4 layers, d 128, 4096-token BPE trained on the bundled sample) trained in
            this process for `--steps` AdamW steps on nine tenths of the bundled sample's documents; perplexity
            on the held-out tenth. Trained weights have the structure (outliers, per-row scale differences)
            that quantization error depends on; a random-init model's output is near uniform over the
            vocabulary, so its perplexity is about the vocabulary size whatever the weights' rounding.
  pythia    the Pythia-160M shape (GPT-NeoX-20B tokenizer when ../shared has it, else the sample BPE), random
            init (GPT-NeoX's rules): too big to train meaningfully on 2 CPU cores in minutes, so its perplexity
            row only shows that the quantized model computes the same near-uniform distribution; its weight
            bytes and decode speed are the real point.

Variants: fp32; int8_weight_only (every linear, the head included, as `quantize_weights` does by default); int8
with the head `embed_out` left in fp32 (`head=False`: what quantizing the head costs). int4_weight_only needs
CUDA (torchao 0.18 has no CPU int4 weight-only kernel): on CPU its rows say so.

Decode speed: the inference engine (`InferenceEngine.run_until_done`), `--requests` greedy requests of a
16-token prompt and `--new-tokens` new tokens each, batched; tokens/s = generated tokens / wall (prefill
included, small here): the best of 3 timed runs after a warm-up. Denormals are flushed to zero in the whole
process (training on the CPU makes them, and they slowed it several times over).

    python benchmarks/quantization_quality.py                       # CPU, both models
    python benchmarks/quantization_quality.py --device cuda         # adds int4 (bf16 model for int4)
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import SAMPLE, SHARED_TOKENIZER, loadavg, log, machine, now, sync

from neoxray.model.config import get_preset
from neoxray.model.decoding import SamplingParams
from neoxray.model.gptneox import build_model, cross_entropy
from neoxray.model.tokenizer import Tokenizer
from neoxray.pipelines.pile import iter_documents
from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.quantization import check_scheme, quantize_weights, weight_bytes
from neoxray.platform.inference.request import EngineConfig, Request


def token_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    eod = tok.backend.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc)
        if eod is not None:
            ids.append(eod)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq: int, count: int | None = None) -> torch.Tensor:
    """[n, seq + 1] windows of `stream`: all of them, or `count` spread evenly over it (not the first `count`,
    which would score only the first few documents)."""
    n = (stream.numel() - 1) // seq
    starts = range(n) if count is None or count >= n else torch.linspace(0, n - 1, count).long().tolist()
    return torch.stack([stream[i * seq : i * seq + seq + 1] for i in starts])


def train(model, rows: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random windows of `rows`; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    model.train()
    losses = []
    for _ in range(steps):
        x = rows[torch.randint(0, rows.shape[0], (batch,), generator=g)]
        loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, rows.shape[0], batch):
        x = rows[i : i + batch]
        logits = model(x[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    return math.exp(total / n)


def decode_tps(model, tok, requests: int, new_tokens: int, repeats: int = 3) -> float:
    """Generated tokens per second, the best of `repeats` timed runs after a warm-up."""
    greedy = SamplingParams(greedy=True, stop_at_eod=False)
    prompts = [[(7 * r + 3 * i) % 1000 + 10 for i in range(16)] for r in range(requests)]
    eng = InferenceEngine(model, tok, EngineConfig(max_num_seqs=requests, prefix_caching=False))
    try:
        eng.run_until_done([Request(prompts[0], max_tokens=4, sampling=greedy)])  # warm-up
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = eng.run_until_done([Request(p, max_tokens=new_tokens, sampling=greedy) for p in prompts])
            best = max(best, sum(len(c.token_ids) for c in out) / (time.perf_counter() - t0))
    finally:
        eng.stop(timeout=1.0, drain=False)
    return best


def variants(device: torch.device):
    """(label, scheme, quantize the head?, dtype) of each variant that runs on `device`."""
    yield "fp32", None, None, torch.float32
    yield "int8_weight_only", "int8_weight_only", True, torch.float32
    yield "int8_weight_only, head in fp32", "int8_weight_only", False, torch.float32
    if device.type == "cuda":
        yield "bf16", None, None, torch.bfloat16
        yield "int4_weight_only (bf16)", "int4_weight_only", False, torch.bfloat16


def quantized_copy(model, scheme, head: bool, dtype, device):
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    if scheme is None:
        return m
    check_scheme(scheme, device, dtype)
    quantize_weights(m, scheme, head=head)
    return m


def measure(name, model, tok, held, device, args) -> list[dict]:
    rows = []
    ref_logits = None
    probe = held[: min(8, held.shape[0]), :-1].to(device)
    for label, scheme, head, dtype in variants(device):
        m = quantized_copy(model, scheme, head, dtype, device)
        ppl = perplexity(m, held.to(device))
        with torch.no_grad():
            logits = m(probe).float()
        if ref_logits is None:
            ref_logits = logits
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        tps = decode_tps(m, tok, args.requests, args.new_tokens) if args.new_tokens else None
        sync(device)
        row = dict(model=name, variant=label, ppl=ppl, weight_bytes=weight_bytes(m), top1_agree=top1, tps=tps)
        log(
            f"{name:8s} {label:32s} ppl {ppl:10.3f}  {row['weight_bytes'] / 2**20:8.2f} MiB  top1 {top1:.4f}  "
            f"{'' if tps is None else f'{tps:7.1f} tok/s'}"
        )
        rows.append(row)
        del m
    if device.type != "cuda":
        rows.append(dict(model=name, variant="int4_weight_only", skipped="needs CUDA (no CPU kernel in torchao 0.18)"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--held-windows", type=int, default=64, help="held-out windows of seq tokens scored")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--models", nargs="+", default=["trained", "pythia"], choices=["trained", "pythia"])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    # before any torch op, so that every worker thread inherits it: training makes denormal gradients (the
    # softmax of tokens a window never has), which slowed the CPU's steps 5x to 30x; flushed for every variant
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    docs = [text for text, _ in iter_documents(SAMPLE)]
    train_docs = [d for i, d in enumerate(docs) if i % 10]
    held_docs = [d for i, d in enumerate(docs) if i % 10 == 0]
    result = dict(
        date=now(),
        machine=machine(),
        loadavg_start=loadavg(),
        torch=torch.__version__,
        args=vars(args) | {"json": None},
        rows=[],
    )
    result["torchao"] = importlib.metadata.version("torchao")
    with tempfile.TemporaryDirectory() as tmp:
        if "trained" in args.models:
            t0 = time.perf_counter()
            tok = train_tokenizer_from_files([str(SAMPLE)], 4096, str(Path(tmp) / "tok"))
            cfg = get_preset("tiny", n_layers=4, d_model=128, n_heads=4, vocab_size=4096, max_seq_len=args.seq)
            model = build_model(cfg, seed=0)
            train_rows = windows(token_stream(tok, train_docs), args.seq)
            held = windows(token_stream(tok, held_docs), args.seq, args.held_windows)
            losses = train(model, train_rows, args.steps, batch=16, lr=3e-3, seed=0)
            log(
                f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s: loss {losses[0]:.2f} -> "
                f"{sum(losses[-20:]) / 20:.2f}"
            )
            result["trained"] = dict(
                params=sum(q.numel() for q in model.parameters()), final_loss=sum(losses[-20:]) / 20
            )
            result["rows"] += measure("trained", model, tok, held, device, args)
        if "pythia" in args.models:
            tok = (
                Tokenizer.load(SHARED_TOKENIZER)
                if (SHARED_TOKENIZER / "tokenizer.json").exists()
                else train_tokenizer_from_files([str(SAMPLE)], 4096, str(Path(tmp) / "tok"))
            )
            cfg = get_preset("pythia-160m", max_seq_len=max(args.seq, 256))
            if len(tok) > cfg.vocab_size:
                raise SystemExit(f"tokenizer has {len(tok)} tokens, more than pythia-160m's {cfg.vocab_size}")
            model = build_model(cfg, seed=0)
            held = windows(token_stream(tok, held_docs), args.seq, args.held_windows // 4)
            result["rows"] += measure("pythia", model, tok, held, device, args)
    result["loadavg_end"] = loadavg()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
