"""Throughput of the whole `neoxray prepare` pipeline against raw `tokenizers` `encode_batch`, on the same text,
with the same tokenizer, on the same machine, in one run.

    baseline : every document already in memory, one `Tokenizer.encode_batch(docs)` call in this process
               (the Rust backend spreads it over all cores); `encode_batch_fast` (no offsets) is timed too
    pipeline : `neoxray.pipelines.prepare.prepare(...)` end to end with --workers 1, 2, ... on a local Ray
               cluster that is already running: reading and decompressing the shards, JSON parsing, the
               tokenizer actor pool, packing, Parquet writing, the manifest

Tokens are counted the same way on both sides (the manifest's `tokens`: ids plus one end-of-document id per
document), and the pipeline's count must equal the baseline's. The ratio pipeline / baseline is the figure
that goes into docs/benchmarks.md.

The corpus is `--copies` copies of the bundled sample (so that the pipeline's fixed start-up cost, about as
long as tokenizing a few MB, does not dominate), each copy a separate .jsonl.zst shard.

    python benchmarks/prepare_throughput.py                      # GPT-NeoX-20B tokenizer from ../shared if present
    python benchmarks/prepare_throughput.py --copies 8 --workers 1 2 4 --tokenizer path/to/tokenizer.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import SAMPLE, SHARED_TOKENIZER, machine

from neoxray.model.tokenizer import Tokenizer
from neoxray.pipelines.pile import iter_documents
from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: GPT-NeoX-20B's if present)")
    ap.add_argument("--copies", type=int, default=4, help="copies of the bundled sample in the corpus")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    return ap.parse_args(argv)


def tokenizer_source(given: str | None, work: Path) -> str:
    """--tokenizer, else GPT-NeoX-20B's from ../shared, else a 4096-token BPE trained on the sample."""
    shared = SHARED_TOKENIZER / "tokenizer.json"
    if given or shared.exists():
        return given or str(shared)
    print("training a 4096-token BPE on the sample (no GPT-NeoX-20B tokenizer found)", file=sys.stderr)
    train_tokenizer_from_files([str(SAMPLE)], 4096, str(work / "tok"))
    return str(work / "tok")


def make_corpus(work: Path, copies: int) -> Path:
    """`copies` copies of the bundled sample, each its own .jsonl.zst shard."""
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(copies):
        shutil.copyfile(SAMPLE, corpus / f"shard-{i:02d}.jsonl.zst")
    return corpus


def baseline(tok, docs: list[str]) -> tuple[int, float, float | None]:
    """Tokens (ids plus one end-of-document id per document) and seconds of raw `encode_batch` over every document
    in memory, and seconds of `encode_batch_fast` if there is one."""
    t = time.perf_counter()
    ids = tok.encode_batch(docs)
    base_s = time.perf_counter() - t
    tokens = sum(map(len, ids)) + len(docs)
    del ids
    fast_s = None
    if hasattr(tok.backend, "encode_batch_fast"):
        t = time.perf_counter()
        tok.backend.encode_batch_fast(docs, add_special_tokens=False)
        fast_s = time.perf_counter() - t
    return tokens, base_s, fast_s


def pipeline_runs(args, corpus: Path, work: Path, tok_source: str, tokens: int, base_s, fast_s) -> tuple[list, float]:
    """`prepare` end to end with each worker count, on a local Ray cluster started here (its start timed apart);
    the token count must equal the baseline's. Returns the runs and the cluster's start time."""
    import ray

    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start_s = time.perf_counter() - t
    time.sleep(3)  # let the cluster's prestarted workers settle
    from neoxray.pipelines.prepare import prepare

    runs = []
    for w in args.workers:
        out = work / f"out-w{w}"
        t = time.perf_counter()
        m = prepare(
            [str(corpus)], tok_source, args.seq_len, str(out), workers=w, progress=False, log=lambda msg: None
        ).manifest
        secs = time.perf_counter() - t
        if m["tokens"] != tokens:
            raise SystemExit(f"token counts differ: pipeline {m['tokens']} vs baseline {tokens}")
        runs.append(
            {
                "workers": w,
                "seconds": round(secs, 2),
                "tokens_per_s": round(tokens / secs),
                "ratio_vs_encode_batch": round(base_s / secs, 3),
                "ratio_vs_encode_batch_fast": round(fast_s / secs, 3) if fast_s else None,
            }
        )
    ray.shutdown()
    return runs, ray_start_s


def print_results(result: dict, tokens: int, base_s: float, fast_s: float | None) -> None:
    print(f"date {result['date']}; machine {result['machine']}")
    print(f"tokenizer {result['tokenizer']}; corpus {result['corpus']}")
    print(f"raw encode_batch        {tokens / base_s:>12,.0f} tokens/s  ({base_s:.1f} s)")
    if fast_s:
        print(f"raw encode_batch_fast   {tokens / fast_s:>12,.0f} tokens/s  ({fast_s:.1f} s)")
    for r in result["pipeline"]:
        print(
            f"prepare --workers {r['workers']:<3}   {r['tokens_per_s']:>12,} tokens/s  ({r['seconds']:.1f} s)  "
            f"ratio vs encode_batch {r['ratio_vs_encode_batch']:.2f}"
            + (f", vs encode_batch_fast {r['ratio_vs_encode_batch_fast']:.2f}" if fast_s else "")
        )
    print(json.dumps(result))


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="neoxray-bench-"))
    try:
        tok_source = tokenizer_source(args.tokenizer, work)
        tok = Tokenizer.load(tok_source)
        corpus = make_corpus(work, args.copies)
        docs = [text for path in sorted(corpus.iterdir()) for text, _ in iter_documents(path)]
        text_mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6
        tokens, base_s, fast_s = baseline(tok, docs)
        n_docs = len(docs)
        del docs
        runs, ray_start_s = pipeline_runs(args, corpus, work, tok_source, tokens, base_s, fast_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "date": _dt.date.today().isoformat(),
        "machine": machine(),
        "tokenizer": f"{tok_source} (vocab {tok.vocab_size})",
        "corpus": f"{args.copies} x bundled sample: {n_docs} documents, {text_mb:.1f} MB of text, {tokens:,} tokens",
        "seq_len": args.seq_len,
        "baseline_encode_batch": {"seconds": round(base_s, 2), "tokens_per_s": round(tokens / base_s)},
        "baseline_encode_batch_fast": (
            {"seconds": round(fast_s, 2), "tokens_per_s": round(tokens / fast_s)} if fast_s else None
        ),
        "ray_cluster_start_s": round(ray_start_s, 2),
        "pipeline": runs,
    }
    print_results(result, tokens, base_s, fast_s)


if __name__ == "__main__":
    main()
