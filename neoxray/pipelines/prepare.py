"""`neoxray prepare`: Pile-format (or prompt-completion) shards -> tokenized, packed Parquet datasets, on Ray Data.

    inputs (files, folders, globs; local or s3:// gs:// ...)
      |  Ray Data: from_items(files) -> flat_map(read)        one task per input file streams its lines and cuts
      |                                                       them into chunks of about `chunk_bytes` of text
      v
    map_batches(_Tokenize, ActorPoolStrategy(size=workers))   the tokenizer is built once per actor; each chunk is
      |                                                       encoded with `encode_batch`, EOD appended after
      |                                                       every document, documents routed to train or
      |                                                       validation by a hash of their text, and the chunk's
      |                                                       token streams written to DIR/.tmp-*/chunks/ (with
      |                                                       content prompt-completion: prompt and completion
      |                                                       encoded apart, with a loss mask 0 on the prompt)
      v
    packing.pack_file (a Ray task per input file, started as soon as all of that file's chunks are tokenized)
      |   concatenates the file's streams in chunk order and cuts them into rows of seq_len + 1 tokens that
      |   cross document boundaries; the remainder (< seq_len + 1 tokens per file and split) is dropped and
      |   counted; rows go to Parquet files with fixed, deterministic names and settings
      v
    DIR/train/part-*.parquet, DIR/validation/part-*.parquet, DIR/manifest.json (written last)

Packing per input file makes the output independent of scheduling: the same inputs and options give
byte-identical files whatever the number of workers, the chunk size or the cluster. Only the per-file reading is
sequential; tokenization (the expensive part) spreads over the actor pool, and files are packed in parallel.

This module holds the driver (`prepare`: checks, the temporary folder and the commit, the Ray Data pipeline,
progress, the manifest) and the first two stages (reading, tokenizing); the packing stage is in
`neoxray.pipelines.packing`, the format's names and the manifest reader in `neoxray.pipelines.dataset_format`.
The dataset format is described in docs/data.md; `neoxray.pipelines.reader` reads it back for training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from neoxray.errors import NeoxrayError, find_user_error
from neoxray.model.tokenizer import TOKENIZER_FILE, Tokenizer
from neoxray.pipelines import fs
from neoxray.pipelines.dataset_format import (
    CONTENTS,
    MANIFEST,
    SPLITS,
    TEXT,
    TOKENIZER_DIR,
    build_manifest,
    content_of,
    read_manifest,
    token_dtype,
)
from neoxray.pipelines.packing import COMPRESSION, ChunkStreams, layout_for, pack_file
from neoxray.pipelines.pile import JSONL_SUFFIXES, iter_documents, iter_prompt_completions
from neoxray.ray_connection import connect_ray

UNKNOWN_COMPONENT = "unknown"
"""The component of a document whose row has no meta.pile_set_name."""
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_CHUNK_BYTES = 2 << 20
"""Text per unit of tokenizer work (about a second of one core's tokenization)."""
PROGRESS_EVERY_S = 5.0

_TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------------------------------- helpers
def validation_threshold(val_fraction: float) -> int:
    """Documents whose 64-bit text hash is below this go to validation."""
    return int(round(val_fraction * (1 << 64)))


def text_hash64(text: str | bytes) -> int:
    """The hash that routes a document to train or validation: BLAKE2b (8-byte digest) of its UTF-8, big-endian."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass
class PrepareResult:
    output: str
    manifest: dict
    skipped: bool = False
    """True when the output was already prepared with the same inputs and options (nothing was done)."""
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ stage 1: reading
def _read_chunks(item: dict, text_key: str, chunk_bytes: int, content: str = TEXT) -> Iterator[dict]:
    """One input file -> its documents in order, in chunks of about `chunk_bytes` characters. With content
    prompt-completion, `texts` holds the completions and `prompts` their prompts (else `prompts` is empty)."""
    file_idx, path = int(item["file_idx"]), str(item["path"])
    bad: Counter = Counter()
    texts: list[str] = []
    prompts: list[str] = []
    comps: list[str] = []
    size = 0
    chunk = 0

    def row(last: bool) -> dict:  # the file's bad-row counts travel with its last chunk
        return {
            "file_idx": file_idx,
            "chunk_idx": chunk,
            "texts": texts,
            "prompts": prompts,
            "components": comps,
            "bad": json.dumps(dict(bad) if last else {}),
            "last": last,
        }

    if content == TEXT:
        docs = ((None, text, name) for text, name in iter_documents(path, text_key, bad=bad, labelled=bad))
    else:
        docs = iter_prompt_completions(path, bad=bad, labelled=bad)
    for prompt, text, name in docs:
        texts.append(text)
        comps.append(UNKNOWN_COMPONENT if name is None else name)
        size += len(text)
        if prompt is not None:
            prompts.append(prompt)
            size += len(prompt)
        if size >= chunk_bytes:
            yield row(False)
            chunk += 1
            texts, prompts, comps, size = [], [], [], 0
    yield row(True)


# --------------------------------------------------------------------------------------- stage 2: tokenizing
class _Tokenize:
    """Ray Data actor: the tokenizer is built once, here; each call tokenizes chunks and writes their streams."""

    def __init__(
        self,
        tokenizer_file: str,
        eod_id: int,
        dtype: str,
        val_fraction: float,
        by_component: bool,
        chunk_dir: str,
        content: str = TEXT,
        threads: int = 1,
    ):
        # the Rust thread pool reads this once, at its first use: one tokenizer thread per reserved CPU
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        import tokenizers

        self.tok = tokenizers.Tokenizer.from_str(fs.read_bytes(tokenizer_file).decode("utf-8"))
        self.encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        self.eod = int(eod_id)
        self.dtype = np.dtype(dtype)
        self.threshold = validation_threshold(val_fraction)
        self.by_component = by_component
        self.chunk_dir = chunk_dir
        self.masked = content != TEXT

    def __call__(self, batch):
        import pyarrow as pa

        return pa.Table.from_pylist([self._chunk(row) for row in batch.to_pylist()], schema=_chunk_result_schema())

    def _chunk(self, row: dict) -> dict:
        texts, comps = row["texts"], row["components"]
        encodings = self.encode(texts, add_special_tokens=False) if texts else []
        prompts = row["prompts"] if self.masked else [None] * len(texts)
        # prompt-completion: the two parts are encoded apart and concatenated, so the mask's boundary is exact
        prompt_encodings = self.encode(prompts, add_special_tokens=False) if self.masked and texts else prompts
        streams = ChunkStreams(self.eod, self.dtype, self.masked)
        stats: dict[tuple[int, str], list[int]] = {}  # (split, component) -> [documents, tokens, loss tokens]
        text_bytes = 0
        for text, prompt, comp, enc, prompt_enc in zip(texts, prompts, comps, encodings, prompt_encodings):
            data = text.encode("utf-8") if prompt is None else prompt.encode("utf-8") + text.encode("utf-8")
            text_bytes += len(data)
            split = 1 if text_hash64(data) < self.threshold else 0
            prompt_ids = [] if prompt_enc is None else prompt_enc.ids
            ids = enc.ids
            streams.add((split, comp if self.by_component else ""), prompt_ids, ids)
            s = stats.setdefault((split, comp), [0, 0, 0])
            s[0] += 1
            s[1] += len(prompt_ids) + len(ids) + 1
            s[2] += len(ids) + 1  # every token of a text, the completion and its EOD of a prompt-completion
        path = fs.join(self.chunk_dir, f"f{row['file_idx']:05d}-c{row['chunk_idx']:07d}.arrow")
        if not streams.write(path):
            path = ""
        return {
            "file_idx": row["file_idx"],
            "chunk_idx": row["chunk_idx"],
            "last": row["last"],
            "path": path,
            "text_bytes": text_bytes,
            "bad": row["bad"],
            "stats": json.dumps([[sp, c, *counts] for (sp, c), counts in sorted(stats.items())]),
        }


def _chunk_result_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("file_idx", pa.int64()),
            ("chunk_idx", pa.int64()),
            ("last", pa.bool_()),
            ("path", pa.string()),
            ("text_bytes", pa.int64()),
            ("bad", pa.string()),
            ("stats", pa.string()),
        ]
    )


# ------------------------------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, enabled: bool, n_files: int, out=sys.stderr):
        self.enabled, self.n_files, self.out = enabled, n_files, out
        self.start = self.last = time.monotonic()
        self.docs = self.bytes = self.tokens = 0
        self.files_done = 0

    def update(self, docs: int, nbytes: int, tokens: int, force: bool = False) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= PROGRESS_EVERY_S):
            self.last = now
            dt = max(now - self.start, 1e-9)
            print(
                f"prepare: {self.docs:,} documents ({self.docs / dt:,.0f}/s), {self.bytes / 1e6:,.1f} MB "
                f"({self.bytes / 1e6 / dt:,.2f} MB/s), {self.tokens / 1e6:,.2f}M tokens "
                f"({self.tokens / 1e6 / dt:,.3f}M tokens/s); {self.files_done}/{self.n_files} files tokenized",
                file=self.out,
                flush=True,
            )


# ----------------------------------------------------------------------------------------------------- driver
def _options(seq_len, val_fraction, text_key, by_component, rows_per_file, row_group_rows, content=TEXT) -> dict:
    hashed = "text" if content == TEXT else "prompt + completion"
    return {
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "text_key": text_key if content == TEXT else None,
        "by_component": by_component,
        "split_hash": f"blake2b-64({hashed} utf-8) < val_fraction * 2^64 -> validation",
        "rows_per_file": rows_per_file,
        "row_group_rows": row_group_rows,
        "compression": COMPRESSION,
    }


def prepare(
    inputs: Iterable[str],
    tokenizer: str,
    seq_len: int,
    output: str,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    text_key: str = "text",
    content: str = TEXT,
    by_component: bool = False,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    rows_per_file: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Tokenize and pack Pile-format inputs into DIR=`output` (see the module docstring and docs/data.md).

    `inputs`: files, folders (searched recursively for .jsonl, .jsonl.gz, .jsonl.zst) or globs, local or URIs.
    `content`: "text" (Pile rows: `text_key`, every token trained) or "prompt-completion" (`prompt` and
    `completion` keys; rows get a loss mask that trains only the completion and its EOD).
    `tokenizer`: a tokenizer.json, a folder holding one, or a hub id. `workers`: size of the tokenizer actor pool
    (default: the cluster's CPUs less one). Connects to the running Ray cluster (RAY_ADDRESS, a Ray job) or
    starts a local one (`neoxray.ray_connection`). A finished `output` with the same inputs and options is left
    alone (skipped=True); with other inputs or options it is an error unless `overwrite`.
    """
    t0 = time.monotonic()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not isinstance(seq_len, int) or seq_len < 1:
        raise NeoxrayError(f"--seq-len must be a positive integer, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise NeoxrayError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    val_fraction = float(val_fraction)
    if workers is not None and workers < 1:
        raise NeoxrayError(f"--workers must be at least 1, got {workers}")
    if chunk_bytes < 1:
        raise NeoxrayError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if content not in CONTENTS:
        raise NeoxrayError(f"--format {content!r}: unknown input format (expected one of {', '.join(CONTENTS)})")
    if content != TEXT and text_key != "text":
        raise NeoxrayError(f"--text-key applies to --format text only; {content} rows have prompt and completion keys")
    out = fs.normalize(output)
    if fs.is_file(out):
        raise NeoxrayError(f"output {output}: exists and is a file, expected a folder")

    files = fs.expand_inputs(inputs, JSONL_SUFFIXES, "input")
    sizes = [fs.file_size(p) for p in files]

    tok = Tokenizer.load(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    default_rows, row_group_rows = layout_for(seq_len, dtype)
    if rows_per_file is not None:
        if rows_per_file < 1:
            raise NeoxrayError(f"rows_per_file must be positive, got {rows_per_file}")
        row_group_rows = min(row_group_rows, rows_per_file)
    else:
        rows_per_file = default_rows
    options = _options(seq_len, val_fraction, text_key, by_component, rows_per_file, row_group_rows, content)
    tok_info = {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
    input_list = [{"path": p, "size": s} for p, s in zip(files, sizes)]

    existing = read_manifest(out, required=False)
    if existing is not None and not overwrite:
        same = (
            content_of(existing) == content
            and existing.get("options") == options
            and existing.get("tokenizer") == tok_info
            and [{"path": i["path"], "size": i["size"]} for i in existing.get("inputs", [])] == input_list
        )
        if not same:
            raise NeoxrayError(
                f"output {output} already holds a dataset prepared from other inputs or options "
                f"(see {fs.join(out, MANIFEST)}); pass --overwrite to replace it, or choose another --output"
            )
        say(f"prepare: {output} is already prepared ({MANIFEST} present); nothing to do (--overwrite rebuilds it)")
        return PrepareResult(out, existing, skipped=True, seconds=time.monotonic() - t0)

    fs.makedirs(out)
    for name in fs.list_dir(out):  # leftovers of runs that died: nothing finished lives there
        if name.startswith(_TMP_PREFIX):
            fs.delete(fs.join(out, name))
    tmp = fs.join(out, f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        for sub in ("chunks", *SPLITS):
            fs.makedirs(fs.join(tmp, sub))
        _save_tokenizer(tok, fs.join(tmp, TOKENIZER_DIR))
        results = _run_pipeline(
            files,
            sizes,
            tok,
            dtype,
            seq_len,
            val_fraction,
            text_key,
            content,
            by_component,
            workers,
            chunk_bytes,
            rows_per_file,
            row_group_rows,
            tmp,
            progress,
            say,
        )
        manifest = build_manifest(results, input_list, options, tok_info, seq_len, dtype, files, content)
        if manifest["splits"]["train"]["rows"] == 0:
            raise NeoxrayError(
                f"no training rows: {manifest['tokens']:,} tokens from {len(files)} input file(s) "
                f"({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}) do not fill one row of "
                f"{seq_len + 1} tokens per file; use a smaller --seq-len or more data"
            )
        fs.delete(fs.join(tmp, "chunks"))
        # commit: the old manifest goes first (the folder stops looking finished), the new one comes last
        fs.delete(fs.join(out, MANIFEST))
        for sub in (*SPLITS, TOKENIZER_DIR):
            fs.delete(fs.join(out, sub))
            fs.move(fs.join(tmp, sub), fs.join(out, sub))
        fs.write_bytes_atomic(fs.join(out, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    except BaseException:
        _discard(tmp)
        raise
    _discard(tmp)
    seconds = time.monotonic() - t0
    say(
        f"prepare: wrote {manifest['splits']['train']['rows']:,} train and "
        f"{manifest['splits']['validation']['rows']:,} validation rows of {seq_len + 1} tokens "
        f"({manifest['documents']:,} documents, {manifest['tokens']:,} tokens) to {out} in {seconds:,.1f} s "
        f"({manifest['tokens'] / max(seconds, 1e-9) / 1e6:,.3f}M tokens/s); "
        f"{_dropped(manifest['bad_rows'])}"
    )
    if manifest["documents_without_component"]:
        say(
            f"prepare: {manifest['documents_without_component']:,} documents without meta.pile_set_name were kept, "
            f"as component {UNKNOWN_COMPONENT!r}"
        )
    return PrepareResult(out, manifest, skipped=False, seconds=seconds)


def _dropped(bad: dict) -> str:
    """'N bad rows dropped (reason: n, ...)' or 'no bad rows'."""
    total = sum(bad.values())
    if not total:
        return "no bad rows"
    return f"{total:,} bad rows dropped ({', '.join(f'{k}: {v}' for k, v in bad.items())})"


def _save_tokenizer(tok, directory: str) -> None:
    """`Tokenizer.save` into `directory`, which may be a URI."""
    if not fs.is_uri(directory):
        tok.save(directory)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="neoxray-tok-") as local:
        tok.save(local)
        fs.makedirs(directory)
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as src, fs.open_output(fs.join(directory, name)) as dst:
                dst.write(src.read())


def _discard(path: str) -> None:
    """Delete a temporary folder, retrying while straggling writers (cancelled tasks) still add to it."""
    for _ in range(20):
        try:
            fs.delete(path)
            if not fs.exists(path):
                return
        except Exception:
            pass
        time.sleep(0.25)


def _run_pipeline(
    files,
    sizes,
    tok,
    dtype,
    seq_len,
    val_fraction,
    text_key,
    content,
    by_component,
    workers,
    chunk_bytes,
    rows_per_file,
    row_group_rows,
    tmp,
    progress,
    say,
) -> dict:
    ray = connect_ray()
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    cpus = int(ray.cluster_resources().get("CPU", 1))
    if workers is None:
        workers = max(1, cpus - 1)
    elif workers > cpus:
        raise NeoxrayError(f"--workers {workers}: the Ray cluster has only {cpus} CPUs")

    ctx = DataContext.get_current()
    saved = (
        ctx.target_max_block_size,
        ctx.enable_progress_bars,
        ctx.print_on_execution_start,
        ctx.enable_auto_log_stats,
    )
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    # one chunk per block, so that chunks spread over the actor pool instead of queueing behind each other
    ctx.target_max_block_size = max(1 << 20, chunk_bytes // 2)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # a failed task is re-raised here (a NeoxrayError as its one line): Ray Data's own report of it is noise
    data_logger.setLevel(logging.CRITICAL)
    caught = warnings.catch_warnings()
    caught.__enter__()
    # Ray Data's advice about pools larger than the number of inputs: a small job simply uses fewer actors
    warnings.filterwarnings("ignore", message=r".*number of concurrent (actors|tasks).*", category=UserWarning)
    # its notice that `max_restarts` (below) is passed the deprecated way: for us, not the user
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning)
    chunk_dir = fs.join(tmp, "chunks")
    tokenizer_file = fs.join(tmp, TOKENIZER_DIR, TOKENIZER_FILE)  # on the output filesystem: every node reaches it
    # readers and packers reserve no CPU: they are light (decompression, JSON, concatenation, Parquet writes),
    # and a reservation could deadlock against an actor pool that holds every CPU (--workers = CPUs)
    pack = ray.remote(num_cpus=0, max_retries=0)(pack_file)
    max_packing = max(2, workers)
    waiting: list[tuple] = []  # pack jobs not yet submitted (at most max_packing run at once)
    bar = _Progress(progress, len(files))
    chunks: dict[int, dict[int, dict]] = {}
    last_chunk: dict[int, int] = {}
    pending: dict = {}  # ObjectRef -> file index
    packed: list[dict] = []
    try:
        ds = ray.data.from_items(
            [{"file_idx": i, "path": p} for i, p in enumerate(files)], override_num_blocks=len(files)
        )
        ds = ds.flat_map(
            _read_chunks,
            fn_kwargs={"text_key": text_key, "chunk_bytes": chunk_bytes, "content": content},
            num_cpus=0,
            compute=TaskPoolStrategy(size=max(1, min(len(files), workers))),
        )
        ds = ds.map_batches(
            _Tokenize,
            fn_constructor_kwargs={
                "tokenizer_file": tokenizer_file,
                "eod_id": tok.eod_id,
                "dtype": dtype,
                "val_fraction": val_fraction,
                "by_component": by_component,
                "chunk_dir": chunk_dir,
                "content": content,
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=workers),
            num_cpus=1,
            # no actor restarts: Ray Data ships an actor's constructor arguments (its UDF and its DataContext)
            # through the object store, where Ray cannot promise them to a restarted actor (ray-project/ray#53727;
            # its core worker logs an error for every such actor, and Ray Data asks for endless restarts unless
            # told otherwise). A tokenizer actor that dies ends the run, which leaves no dataset behind; a rerun
            # starts over. Ray 2.60 accepts this only among `**ray_remote_args`, which it deprecates (to go in
            # 2.64, with no named replacement yet): revisit when raising Ray's upper bound.
            max_restarts=0,
        )

        def collect_packed(block: bool) -> None:
            while True:
                while waiting and len(pending) < max_packing:
                    job = waiting.pop(0)
                    pending[pack.remote(*job)] = job[0]
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
                if not ready:
                    return
                for ref in ready:
                    pending.pop(ref)
                    packed.extend(ray.get(ref))

        for row in ds.iter_rows():
            f, c = int(row["file_idx"]), int(row["chunk_idx"])
            stats = json.loads(row["stats"])
            chunks.setdefault(f, {})[c] = {"path": row["path"], "bad": json.loads(row["bad"]), "stats": stats}
            if row["last"]:
                last_chunk[f] = c
            if f in last_chunk and len(chunks[f]) == last_chunk[f] + 1:
                bar.files_done += 1
                ordered = [chunks[f][k]["path"] for k in range(last_chunk[f] + 1) if chunks[f][k]["path"]]
                waiting.append((f, ordered, tmp, seq_len, rows_per_file, row_group_rows))
            bar.update(sum(s[2] for s in stats), int(row["text_bytes"]), sum(s[3] for s in stats))
            collect_packed(block=False)
        bar.update(0, 0, 0, force=True)
        if progress and (pending or waiting):
            say(f"prepare: packing the last {len(pending) + len(waiting)} file(s)")
        collect_packed(block=True)
    except BaseException as e:
        for ref in pending:
            ray.cancel(ref, force=True)
        err = find_user_error(e) if isinstance(e, Exception) else None
        if err is not None:
            raise err from None
        raise
    finally:
        (
            ctx.target_max_block_size,
            ctx.enable_progress_bars,
            ctx.print_on_execution_start,
            ctx.enable_auto_log_stats,
        ) = saved
        data_logger.setLevel(saved_level)
        caught.__exit__(None, None, None)
    missing = [files[i] for i in range(len(files)) if i not in last_chunk]
    if missing:
        raise NeoxrayError(f"prepare: input {missing[0]} was not read to its end")
    return {"chunks": chunks, "packed": packed}
