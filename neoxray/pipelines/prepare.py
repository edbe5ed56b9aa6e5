"""`neoxray prepare`: Pile-format (or prompt-completion) shards -> tokenized, packed Parquet datasets, on Ray Data.

    inputs (files, folders, globs; local or s3:// gs:// ...)
      |  Ray Data: from_items(files) -> map_batches(read_chunks)   one task per input file streams its lines and
      v                                                           cuts them into chunks of about `chunk_bytes`
    map_batches(Tokenize, ActorPoolStrategy(size=workers))        the tokenizer the driver loaded is shipped once
      |                                                           per actor; each chunk is encoded with
      |                                                           `encode_batch`, EOD appended after every
      |                                                           document, documents routed to train or
      |                                                           validation by a hash of their text, and the
      |                                                           chunk's token streams written to
      |                                                           DIR/.tmp-*/chunks/ (with content
      |                                                           prompt-completion: prompt and completion
      |                                                           encoded apart, with a loss mask 0 on the prompt)
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

This module is the driver: `PrepareJob` (the run's inputs and options, checked and resolved before anything is
written), the temporary folder and the commit, the Ray Data pipeline and its bookkeeping, progress, the manifest.
The stages are `neoxray.pipelines.tokenizing` (reading, tokenizing) and `neoxray.pipelines.packing`; the format's
names and the manifest are `neoxray.pipelines.dataset_format`'s. The format is described in docs/data.md;
`neoxray.pipelines.packed_dataset` and `neoxray.pipelines.reader` read it back for training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from neoxray.errors import NeoxrayError, find_user_error
from neoxray.model.tokenizer import Tokenizer
from neoxray.pipelines import fs
from neoxray.pipelines.chat import resolve_template, template_spec
from neoxray.pipelines.dataset_format import (
    CHAT,
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
from neoxray.pipelines.packing import COMPRESSION, layout_for, pack_file
from neoxray.pipelines.pile import JSONL_SUFFIXES
from neoxray.pipelines.tokenizing import UNKNOWN_COMPONENT, Tokenize, read_chunks
from neoxray.ray_connection import connect_ray

DEFAULT_VAL_FRACTION = 0.01
DEFAULT_CHUNK_BYTES = 2 << 20
"""Text per unit of tokenizer work (about a second of one core's tokenization)."""
PROGRESS_EVERY_S = 5.0

_TMP_PREFIX = ".tmp-"


@dataclass
class PrepareResult:
    output: str
    manifest: dict
    skipped: bool = False
    """True when the output was already prepared with the same inputs and options (nothing was done)."""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------- the job
@dataclass
class PrepareJob:
    """One `neoxray prepare` run. The fields up to `rows_per_file` are what the caller asked for; creating the job
    checks them, expands the inputs and loads the tokenizer (`files`, `sizes`, `tok`, the Parquet layout), so that
    bad input is refused before anything is written. `run` does the work."""

    inputs: Iterable[str]
    """Files, folders (searched recursively for .jsonl, .jsonl.gz, .jsonl.zst) or globs, local or URIs."""
    tokenizer: str
    """A tokenizer.json, a folder holding one, or a hub id."""
    seq_len: int
    """Tokens per training sequence: rows hold seq_len + 1 ids."""
    output: str
    """The dataset folder (local or a URI), as the caller named it (messages name it so)."""
    val_fraction: float = DEFAULT_VAL_FRACTION
    """Share of documents (by the hash of their text) that go to the validation split, in [0, 1)."""
    workers: int | None = None
    """Size of the tokenizer actor pool (default: the cluster's CPUs less one)."""
    text_key: str = "text"
    """The JSON key of a document's text (content text only)."""
    content: str = TEXT
    """"text" (Pile rows: `text_key`, every token trained), "prompt-completion" (`prompt` and `completion` keys;
    rows get a loss mask that trains only the completion and its EOD) or "chat" (`messages`, rendered with the chat
    template; the loss mask trains only the assistant turns, `neoxray.pipelines.chat`)."""
    by_component: bool = False
    """Pack each meta.pile_set_name apart, so that components can be selected and mixed at training time."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Characters of text per unit of tokenizer work."""
    rows_per_file: int | None = None
    """Rows per Parquet file (None: about 64 MB of ids, `packing.layout_for`; the job holds the number it chose)."""
    chat_template: str | None = None
    """Content chat only: a template file, a model folder or the template itself (None: the tokenizer folder's,
    else neoxray's default). The job holds what it resolved as `chat` (`chat.template_spec`)."""
    out: str = field(init=False)
    """`output`, normalized (`fs.normalize`): where the dataset is written."""
    files: list[str] = field(init=False)
    """The input files `inputs` expand to, in order (the order of the output rows)."""
    sizes: list[int] = field(init=False)
    """Their sizes in bytes (with the paths, what a rerun is compared by)."""
    tok: Tokenizer = field(init=False)
    """The tokenizer `tokenizer` names, loaded: saved with the dataset and shipped to the tokenizer actors."""
    row_group_rows: int = field(init=False)
    """Rows per Parquet row group (`packing.layout_for`, at most `rows_per_file`)."""
    chat: dict | None = field(init=False)
    """Content chat: the template resolved from `chat_template` (`chat.template_spec`: source, sha256, text, special
    tokens), shipped to the tokenizer actors and recorded in the manifest; else None."""

    def __post_init__(self):
        self._check_options()
        self.out = fs.normalize(self.output)
        if fs.is_file(self.out):
            raise NeoxrayError(f"output {self.output}: exists and is a file, expected a folder")
        self.files = fs.expand_inputs(self.inputs, JSONL_SUFFIXES, "input")
        self.sizes = [fs.file_size(p) for p in self.files]
        self.tok = Tokenizer.load(self.tokenizer)
        self.chat = (
            template_spec(resolve_template(self.chat_template, self.tokenizer)) if self.content == CHAT else None
        )
        default_rows, self.row_group_rows = layout_for(self.seq_len, self.dtype)
        if self.rows_per_file is None:
            self.rows_per_file = default_rows
        self.row_group_rows = min(self.row_group_rows, self.rows_per_file)

    def _check_options(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise NeoxrayError(f"--seq-len must be a positive integer, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise NeoxrayError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        self.val_fraction = float(self.val_fraction)
        if self.workers is not None and self.workers < 1:
            raise NeoxrayError(f"--workers must be at least 1, got {self.workers}")
        if self.chunk_bytes < 1:
            raise NeoxrayError(f"chunk_bytes must be positive, got {self.chunk_bytes}")
        if self.content not in CONTENTS:
            raise NeoxrayError(
                f"--format {self.content!r}: unknown input format (expected one of {', '.join(CONTENTS)})"
            )
        if self.content != TEXT and self.text_key != "text":
            raise NeoxrayError(
                f"--text-key applies to --format text only; {self.content} rows have "
                + ("a messages key" if self.content == CHAT else "prompt and completion keys")
            )
        if self.chat_template is not None and self.content != CHAT:
            raise NeoxrayError(f"--chat-template applies to --format chat only, not {self.content}")
        if self.rows_per_file is not None and self.rows_per_file < 1:
            raise NeoxrayError(f"rows_per_file must be positive, got {self.rows_per_file}")

    @property
    def dtype(self) -> str:
        return token_dtype(self.tok.vocab_size)

    def options(self) -> dict:
        """The manifest's `options`: everything that shapes the output."""
        hashed = {TEXT: "text", CHAT: "messages as canonical JSON"}.get(self.content, "prompt + completion")
        chat = {"chat_template_sha256": self.chat["sha256"]} if self.chat else {}
        return {
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "text_key": self.text_key if self.content == TEXT else None,
            "by_component": self.by_component,
            "split_hash": f"blake2b-64({hashed} utf-8) < val_fraction * 2^64 -> validation",
            "rows_per_file": self.rows_per_file,
            "row_group_rows": self.row_group_rows,
            "compression": COMPRESSION,
            **chat,
        }

    def tokenizer_info(self) -> dict:
        return {"sha256": self.tok.sha256, "vocab_size": self.tok.vocab_size, "eod_id": self.tok.eod_id}

    def input_list(self) -> list[dict]:
        return [{"path": p, "size": s} for p, s in zip(self.files, self.sizes)]

    def prepared(self, manifest: dict) -> bool:
        """True when `manifest` is of a run with these inputs (paths and sizes), tokenizer and options."""
        return (
            content_of(manifest) == self.content
            and manifest.get("options") == self.options()
            and manifest.get("tokenizer") == self.tokenizer_info()
            and [{"path": i["path"], "size": i["size"]} for i in manifest.get("inputs", [])] == self.input_list()
        )

    def run(self, overwrite: bool = False, progress: bool = True, say: Callable[[str], None] | None = None):
        """Prepare the dataset (see `prepare`); progress and the summary go to `say` (default: stderr)."""
        t0 = time.monotonic()
        say = say or _to_stderr
        existing = read_manifest(self.out, required=False)
        if existing is not None and not overwrite:
            if not self.prepared(existing):
                raise NeoxrayError(
                    f"output {self.output} already holds a dataset prepared from other inputs or options "
                    f"(see {fs.join(self.out, MANIFEST)}); pass --overwrite to replace it, or choose another --output"
                )
            done = f"prepare: {self.output} is already prepared ({MANIFEST} present); nothing to do"
            say(f"{done} (--overwrite rebuilds it)")
            return PrepareResult(self.out, existing, skipped=True, seconds=time.monotonic() - t0)
        with _staging(self.out) as tmp:
            _save_tokenizer(self.tok, fs.join(tmp, TOKENIZER_DIR))
            manifest = self._manifest(*_run_pipeline(self, tmp, progress, say))
            _commit(tmp, self.out, manifest)
        seconds = time.monotonic() - t0
        _summarize(manifest, self.out, seconds, say)
        return PrepareResult(self.out, manifest, skipped=False, seconds=seconds)

    def _manifest(self, chunks: list[dict], packed: list[dict]) -> dict:
        manifest = build_manifest(
            chunks,
            packed,
            content=self.content,
            seq_len=self.seq_len,
            dtype=self.dtype,
            tokenizer=self.tokenizer_info(),
            inputs=self.input_list(),
            options=self.options(),
        )
        if self.chat:
            manifest["chat_template"] = self.chat
        if manifest["splits"]["train"]["rows"] == 0:
            files = self.files
            raise NeoxrayError(
                f"no training rows: {manifest['tokens']:,} tokens from {len(files)} input file(s) "
                f"({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}) do not fill one row of "
                f"{self.seq_len + 1} tokens per file; use a smaller --seq-len or more data"
            )
        return manifest


def prepare(
    inputs: Iterable[str],
    tokenizer: str,
    seq_len: int,
    output: str,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options,
) -> PrepareResult:
    """Tokenize and pack Pile-format inputs into the folder `output` (see the module docstring and docs/data.md).

    `options`: `PrepareJob`'s other fields (val_fraction, workers, text_key, content, by_component, chunk_bytes,
    rows_per_file, chat_template). Connects to the running Ray cluster (RAY_ADDRESS, a Ray job) or starts a local one
    (`neoxray.ray_connection`). A finished `output` with the same inputs and options is left alone
    (skipped=True); with other inputs or options it is an error unless `overwrite`. Progress and the summary go
    to `log` (default: stderr)."""
    return PrepareJob(inputs, tokenizer, seq_len, output, **options).run(overwrite, progress, log)


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- output folder
@contextmanager
def _staging(out: str) -> Iterator[str]:
    """A fresh temporary folder in `out` (DIR/.tmp-*/ with chunks/, train/, validation/), removed on the way out
    whatever happens; leftovers of runs that died are removed first (nothing finished lives there)."""
    fs.makedirs(out)
    for name in fs.list_dir(out):
        if name.startswith(_TMP_PREFIX):
            fs.delete(fs.join(out, name))
    tmp = fs.join(out, f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        for sub in ("chunks", *SPLITS):
            fs.makedirs(fs.join(tmp, sub))
        yield tmp
    finally:
        _discard(tmp)


def _commit(tmp: str, out: str, manifest: dict) -> None:
    """Move the finished splits and tokenizer from `tmp` into `out`: the old manifest goes first (the folder stops
    looking finished), the new one comes last."""
    fs.delete(fs.join(tmp, "chunks"))
    fs.delete(fs.join(out, MANIFEST))
    for sub in (*SPLITS, TOKENIZER_DIR):
        fs.delete(fs.join(out, sub))
        fs.move(fs.join(tmp, sub), fs.join(out, sub))
    fs.write_bytes_atomic(fs.join(out, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def _summarize(manifest: dict, out: str, seconds: float, say: Callable[[str], None]) -> None:
    splits = manifest["splits"]
    say(
        f"prepare: wrote {splits['train']['rows']:,} train and {splits['validation']['rows']:,} validation rows of "
        f"{manifest['row_length']} tokens ({manifest['documents']:,} documents, {manifest['tokens']:,} tokens) to "
        f"{out} in {seconds:,.1f} s ({manifest['tokens'] / max(seconds, 1e-9) / 1e6:,.3f}M tokens/s); "
        f"{_dropped(manifest['bad_rows'])}"
    )
    if manifest["documents_without_component"]:
        say(
            f"prepare: {manifest['documents_without_component']:,} documents without meta.pile_set_name were kept, "
            f"as component {UNKNOWN_COMPONENT!r}"
        )


def _dropped(bad: dict) -> str:
    """'N bad rows dropped (reason: n, ...)' or 'no bad rows'."""
    total = sum(bad.values())
    if not total:
        return "no bad rows"
    return f"{total:,} bad rows dropped ({', '.join(f'{k}: {v}' for k, v in bad.items())})"


def _save_tokenizer(tok: Tokenizer, directory: str) -> None:
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


# ------------------------------------------------------------------------------------------------ progress
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


# ------------------------------------------------------------------------------------------------ pipeline
def _run_pipeline(job: PrepareJob, tmp: str, progress: bool, say: Callable[[str], None]) -> tuple[list, list]:
    """Run the three stages on Ray into `tmp`. Returns what they reported: per tokenized chunk its counts (rows of
    `tokenizing.tokenized_schema()`), per packed stream its rows and part files (`pack_file`)."""
    ray = connect_ray()
    workers = _pool_size(ray, job.workers)
    files = _FileChunks(len(job.files))
    packer = _Packer(ray, tmp, job, max_running=max(2, workers))
    bar = _Progress(progress, len(job.files))
    chunks: list[dict] = []
    with _ray_data_settings(job.chunk_bytes):
        try:
            for row in _dataset(ray, job, tmp, workers).iter_rows():
                chunk = {k: row[k] for k in ("file_idx", "chunk_idx", "last", "path", "bad", "without_component")}
                chunk["streams"] = streams = row["streams"]
                chunks.append(chunk)
                ordered = files.add(chunk)
                if ordered is not None:
                    bar.files_done += 1
                    packer.submit(chunk["file_idx"], ordered)
                bar.update(sum(s["documents"] for s in streams), row["text_bytes"], sum(s["tokens"] for s in streams))
                packer.collect(block=False)
            bar.update(0, 0, 0, force=True)
            if progress and packer.unfinished:
                say(f"prepare: packing the last {packer.unfinished} file(s)")
            packer.collect(block=True)
        except BaseException as e:
            packer.cancel()
            err = find_user_error(e) if isinstance(e, Exception) else None
            if err is not None:
                raise err from None
            raise
    missing = files.unfinished(job.files)
    if missing:
        raise NeoxrayError(f"prepare: input {missing[0]} was not read to its end")
    return chunks, packer.results


def _pool_size(ray, workers: int | None) -> int:
    """The tokenizer actor pool's size: `workers`, at most the cluster's CPUs (default: the CPUs less one)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if workers is None:
        return max(1, cpus - 1)
    if workers > cpus:
        raise NeoxrayError(f"--workers {workers}: the Ray cluster has only {cpus} CPUs")
    return workers


def _dataset(ray, job: PrepareJob, tmp: str, workers: int):
    """Stages 1 and 2 as a Ray Data dataset of tokenized chunks."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ds = ray.data.from_items(
        [{"file_idx": i, "path": p} for i, p in enumerate(job.files)], override_num_blocks=len(job.files)
    )
    # readers reserve no CPU: they are light (decompression, JSON), and a reservation could deadlock against an
    # actor pool that holds every CPU (--workers = CPUs)
    ds = ds.map_batches(
        read_chunks,
        fn_kwargs={"text_key": job.text_key, "chunk_bytes": job.chunk_bytes, "content": job.content},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        compute=TaskPoolStrategy(size=max(1, min(len(job.files), workers))),
    )
    return ds.map_batches(
        Tokenize,
        fn_constructor_kwargs={
            "tokenizer": job.tok,
            "val_fraction": job.val_fraction,
            "by_component": job.by_component,
            "content": job.content,
            "chunk_dir": fs.join(tmp, "chunks"),
            "chat_template": job.chat,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers),
        num_cpus=1,
        # no actor restarts: Ray Data ships an actor's constructor arguments (its UDF, the tokenizer included,
        # and its DataContext) through the object store, where Ray cannot promise them to a restarted actor
        # (ray-project/ray#53727; its core worker logs an error for every such actor, and Ray Data asks for
        # endless restarts unless told otherwise). A tokenizer actor that dies ends the run, which leaves no
        # dataset behind; a rerun starts over. Ray 2.60 accepts this only among `**ray_remote_args`, which it
        # deprecates (to go in 2.64, with no named replacement yet): revisit when raising Ray's upper bound.
        max_restarts=0,
    )


@contextmanager
def _ray_data_settings(chunk_bytes: int) -> Iterator[None]:
    """Ray Data's settings for prepare, restored on the way out: one chunk per block, no progress bars or stats
    of its own (prepare prints progress), and none of its logging and advice."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    names = ("target_max_block_size", "enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats")
    saved = {name: getattr(ctx, name) for name in names}
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    # one chunk per block, so that chunks spread over the actor pool instead of queueing behind each other
    ctx.target_max_block_size = max(1 << 20, chunk_bytes // 2)
    ctx.enable_progress_bars = ctx.print_on_execution_start = ctx.enable_auto_log_stats = False
    # a failed task is re-raised here (a NeoxrayError as its one line): Ray Data's own report of it is noise
    data_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # Ray Data's advice about pools larger than the number of inputs: a small job simply uses fewer actors
            warnings.filterwarnings("ignore", message=r".*number of concurrent (actors|tasks).*", category=UserWarning)
            # its notice that `max_restarts` (see `_dataset`) is passed the deprecated way: for us, not the user
            warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning)
            yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        data_logger.setLevel(saved_level)


class _FileChunks:
    """Which chunks of each input file have been tokenized, so that a file is packed once all of them have."""

    def __init__(self, n_files: int):
        self.paths: list[dict[int, str]] = [{} for _ in range(n_files)]
        self.last: dict[int, int] = {}

    def add(self, chunk: dict) -> list[str] | None:
        """Record a tokenized chunk; when it completes its file, that file's stream files in chunk order."""
        f, c = chunk["file_idx"], chunk["chunk_idx"]
        self.paths[f][c] = chunk["path"]
        if chunk["last"]:
            self.last[f] = c
        if f not in self.last or len(self.paths[f]) != self.last[f] + 1:
            return None
        return [self.paths[f][k] for k in range(self.last[f] + 1) if self.paths[f][k]]

    def unfinished(self, files: list[str]) -> list[str]:
        return [files[i] for i in range(len(files)) if i not in self.last]


class _Packer:
    """Stage 3: a `pack_file` task per input file, at most `max_running` at once; `results` gathers what they
    return. Packers reserve no CPU (concatenation and Parquet writes are light, and a reservation could deadlock
    against an actor pool that holds every CPU)."""

    def __init__(self, ray, tmp: str, job: PrepareJob, max_running: int):
        self.ray, self.max_running = ray, max_running
        self.pack = ray.remote(num_cpus=0, max_retries=0)(pack_file)
        self.args = (tmp, job.seq_len, job.rows_per_file, job.row_group_rows)
        self.waiting: list[tuple[int, list[str]]] = []
        self.running: dict = {}  # ObjectRef -> file index
        self.results: list[dict] = []

    @property
    def unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def submit(self, file_idx: int, chunk_paths: list[str]) -> None:
        self.waiting.append((file_idx, chunk_paths))

    def collect(self, block: bool) -> None:
        """Start waiting packers while there is room and gather finished ones: all of them when `block`."""
        while True:
            while self.waiting and len(self.running) < self.max_running:
                file_idx, paths = self.waiting.pop(0)
                self.running[self.pack.remote(file_idx, paths, *self.args)] = file_idx
            if not self.running:
                return
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            for ref in ready:
                self.running.pop(ref)
                self.results.extend(self.ray.get(ref))

    def cancel(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)
