"""A training run whose directory is a URI (`s3://bucket/runs/x`, `gs://...`, any filesystem `neoxray.pipelines.fs`
reaches): the run directory of a cluster with no shared disk.

Every node keeps a local mirror of the run (`mirror_dir`: under `checkpoint.staging_dir`, by default the temp
folder), where training writes exactly as into a local run directory; the store is the run's truth:
- checkpoints are uploaded rank by rank, each rank its own files, once their weights have given a finite loss;
  `meta.json` goes up last, written by rank 0 once every rank's upload is done, so a checkpoint folder on the
  store without `meta.json` is never taken as complete (`store_checkpoints`);
- config.yaml, the metrics file and TensorBoard's event files are copied up as they change (`RunFiles`);
- a resumed run reads the checkpoint into each node's mirror file by file, only the shards that node's ranks
  read, each once per node and checked against the sha256 in `meta.json` (`StoreCheckpointFiles`); a model
  read whole (inference, export) is fetched whole, once per node (`fetch_checkpoint`).
Transient errors are retried with backoff (`retrying`); what still fails is one `NeoxrayError` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.paths import is_uri
from neoxray.pipelines import fs
from neoxray.platform.checkpoint_format import (
    CHECKPOINT_PREFIX,
    EVAL_PIN,
    FORMAT,
    META,
    checkpoint_step,
    file_digest,
    listed_files,
)

STORE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
"""The environment a driver passes on to what it starts (training workers, evaluation tasks) when it has it set,
for what they read and write on object storage (pyarrow reads it); on a cluster whose pods carry their own
identity, leave it unset on the driver."""

EVAL_RECORDS = "eval.jsonl"
"""Where `eval.tasks`' records of a run on object storage go, beside metrics.jsonl (which rank 0 writes)."""

FETCHED = ".fetched"
"""Marks a checkpoint folder of a mirror whose files were all downloaded and checked."""


def is_store(run_dir) -> bool:
    """Whether a run directory is a URI (object storage or any other pyarrow/fsspec filesystem)."""
    return run_dir is not None and is_uri(str(run_dir))


def mirror_dir(uri: str, staging_dir: str | None = None, role: str = "run") -> Path:
    """This node's mirror of the run at `uri`: the same path on every node, so that a path in a plan means the
    same files everywhere. `role`: "run" for the training ranks, "driver" for the driver's own copy (on the node
    of rank 0 they must not write the same files)."""
    uri = fs.normalize(uri)
    root = Path(staging_dir).expanduser() if staging_dir else Path(tempfile.gettempdir())
    name = uri.rsplit("/", 1)[-1] or "run"
    return (root / "neoxray-staging" / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}" / role).absolute()


ATTEMPTS_ENV = "NEOXRAY_STORE_ATTEMPTS"
"""How many times a copy to or from the store is tried before the run stops (default 5: with the backoff and
pyarrow's own retries, about 40 s against a refused connection)."""


def retrying(what: str, fn: Callable, attempts: int | None = None, first_delay_s: float = 0.5):
    """`fn()`, retried with exponential backoff on an OSError (a dropped connection, a throttled request); after
    the last attempt (`attempts`, default `NEOXRAY_STORE_ATTEMPTS` or 5) a NeoxrayError naming `what` and the
    error."""
    if attempts is None:
        attempts = max(1, int(os.environ.get(ATTEMPTS_ENV) or 5))
    for attempt in range(attempts):
        try:
            return fn()
        except (OSError, NeoxrayError) as e:
            last = e
            if attempt + 1 < attempts:
                time.sleep(first_delay_s * 2**attempt)
    raise NeoxrayError(f"{what}: failed after {attempts} attempts ({str(last).strip().splitlines()[0]})")


class RunStore:
    """The run directory on its filesystem: copy files up and down, list, move and delete, by relative name."""

    def __init__(self, uri: str):
        self.uri = fs.normalize(uri)

    def __repr__(self):
        return self.uri

    def path(self, *parts: str) -> str:
        return fs.join(self.uri, *parts)

    def probe(self, what: str = "--run-dir") -> None:
        """Write, list and delete a small object at the run's URI: a missing bucket, an unknown scheme or missing
        credentials is one NeoxrayError naming `what`, before any worker starts."""
        name = f".neoxray-probe-{uuid.uuid4().hex[:8]}"
        try:
            fs.makedirs(self.uri)
            with fs.open_output(self.path(name)) as f:
                f.write(b"probe")
            if name not in fs.list_dir(self.uri):
                raise OSError("an object written there is not listed")
            fs.delete(self.path(name))
        except (OSError, NeoxrayError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NeoxrayError(
                f"{what} {self.uri}: cannot write, list and delete there ({first}); check the bucket, the "
                f"endpoint (AWS_ENDPOINT_URL) and the credentials"
            ) from None

    def upload(self, local: Path, rel: str) -> None:
        """Copy a local file to `rel` (retried)."""
        import pyarrow.fs as pafs

        dest_fs, dest = fs.resolve(self.path(rel))

        def copy():
            if "/" in dest.strip("/"):  # folders exist on local, HDFS and file:// stores (object stores need none)
                dest_fs.create_dir(dest.rstrip("/").rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest_fs)

        retrying(f"uploading {local} to {self.path(rel)}", copy)

    def download(self, rel: str, local: Path) -> None:
        """Copy `rel` to a local file (through a temporary name, retried)."""
        import pyarrow.fs as pafs

        src_fs, src = fs.resolve(self.path(rel))
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part-{uuid.uuid4().hex[:6]}")

        def copy():
            pafs.copy_files(src, str(tmp), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, local)

        try:
            retrying(f"downloading {self.path(rel)}", copy)
        finally:
            tmp.unlink(missing_ok=True)

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """`length` bytes of a file from `offset` (a safetensors header without the tensors after it)."""
        path = self.path(rel)

        def read():
            with fs.open_random_access(path) as f:
                return f.read_at(length, offset)

        return retrying(f"reading {path}", read)

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        return retrying(f"looking up {path}", lambda: fs.exists(path))

    def read_text(self, rel: str) -> str | None:
        """A small file's text, or None when it does not exist."""
        path = self.path(rel)
        return retrying(f"reading {path}", lambda: fs.read_bytes(path).decode() if fs.exists(path) else None)

    def files(self, rel: str, with_mtime: bool = False) -> dict:
        """Every file under folder `rel`: relative name -> size (`with_mtime`: (size, modification time in ns));
        {} when there is none."""
        import pyarrow.fs as pafs

        fsys, inner = fs.resolve(self.path(rel))

        def listing():
            try:
                infos = fsys.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
            except FileNotFoundError:
                return {}
            base = inner.rstrip("/") + "/"
            found = [i for i in infos if i.type == pafs.FileType.File]
            if with_mtime:
                return {i.path[len(base) :]: (int(i.size), i.mtime_ns) for i in found}
            return {i.path[len(base) :]: int(i.size) for i in found}

        return retrying(f"listing {self.path(rel)}", listing)

    def names(self) -> list[str]:
        return retrying(f"listing {self.uri}", lambda: fs.list_dir(self.uri))

    def delete(self, rel: str) -> None:
        retrying(f"deleting {self.path(rel)}", lambda: fs.delete(self.path(rel)))

    def move(self, rel: str, new_rel: str) -> None:
        """Rename a folder or file (on object stores a copy, then a delete)."""
        src, dst = self.path(rel), self.path(new_rel)
        retrying(f"moving {src} to {dst}", lambda: fs.move(src, dst))


NO_META = f"has no {META} (its upload did not finish)"


def store_checkpoints(store: RunStore) -> list[tuple[str, dict | None, str | None]]:
    """The run's `checkpoint-step-N` folders on the store, newest first: (name, meta.json or None, what is wrong
    or None). Complete means: a meta.json of this format, and every file it lists present with its size (the
    checksums are checked by each rank as it downloads)."""
    found = []
    for name in store.names():
        if not name.startswith(CHECKPOINT_PREFIX) or checkpoint_step(Path(name)) is None:
            continue
        files = store.files(name)
        meta, problem = None, None
        if META not in files:
            problem = NO_META
        else:
            try:
                meta = json.loads(store.read_text(f"{name}/{META}") or "")
                if meta.get("format") != FORMAT:
                    raise ValueError(f"unknown format {meta.get('format')!r}")
                wrong = [n for n, e in listed_files(meta).items() if files.get(n) != e["bytes"]]
                if wrong:
                    problem = f"is incomplete ({', '.join(sorted(wrong)[:3])} missing or of another size)"
            except ValueError as e:
                problem = f"has an unreadable {META} ({e})"
        found.append((name, meta, problem))
    return sorted(found, key=lambda x: checkpoint_step(Path(x[0])), reverse=True)


def rotate_store(store: RunStore, keep: int) -> list[str]:
    """Delete the store's complete checkpoints beyond the newest `keep` (0: keep all), never one pinned for
    evaluation (`EVAL_PIN` in its folder), never an incomplete one (an upload under way). Returns the deleted."""
    if keep <= 0:
        return []
    complete = [name for name, _, problem in store_checkpoints(store) if problem is None]
    gone = [name for name in complete[keep:] if not store.exists(f"{name}/{EVAL_PIN}")]
    for name in gone:
        store.delete(name)
    return gone


@contextlib.contextmanager
def node_lock(path: Path):
    """An exclusive lock on `path` shared by the processes of this node (the ranks of one mirror)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_checkpoint(store: RunStore, name: str, local: Path) -> Path:
    """Checkpoint `name` of the store in the local folder `local`, downloaded once per node (the first rank to
    come downloads, the others wait on a lock), every file checked against the sha256 in its meta.json; a file
    that differs is a NeoxrayError naming it. Returns `local`. (`StoreCheckpointFiles`, every file at once.)"""
    if (local / FETCHED).exists():  # written last: every file is there and checked
        return local
    files = StoreCheckpointFiles(store, name, local)
    for file in sorted(files.listed):
        files.fetch(file)
    (local / FETCHED).touch()
    return local


class StoreCheckpointFiles:
    """Checkpoint `name` of the store, read file by file into the local folder `local` (this node's mirror):
    meta.json at once, each other file only when a rank of this node first reads from it (under a lock per file:
    once per node), checked against its sha256. A rank's index of the tensors comes from the shards' safetensors
    headers, read with ranged reads: a node downloads the shards its ranks' layout needs, not the whole
    checkpoint. A folder left by an earlier attempt is reused where its meta.json is the store's."""

    def __init__(self, store: RunStore, name: str, local: Path):
        self.store, self.name, self.local = store, name, Path(local)
        text = store.read_text(f"{name}/{META}")
        if text is None:
            raise NeoxrayError(f"{store.path(name)}: no {META} (not a complete checkpoint)")
        with node_lock(self.local.parent / f".{self.local.name}.lock"):
            held = self.local / META
            if not held.exists() or held.read_text() != text:
                shutil.rmtree(self.local, ignore_errors=True)
                self.local.mkdir(parents=True)
                (self.local / f".{META}.tmp").write_text(text)
                os.replace(self.local / f".{META}.tmp", held)
        self.meta = json.loads(text)
        self.listed = listed_files(self.meta)

    def header(self, file: str) -> dict:
        """The safetensors header of `file` ({tensor: {dtype, shape, data_offsets}, "__metadata__": {...}})."""
        if (self.local / f".{file}.ok").exists():
            with open(self.local / file, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                return json.loads(f.read(n))
        n = struct.unpack("<Q", self.store.read_range(f"{self.name}/{file}", 0, 8))[0]
        if n > self.listed.get(file, {}).get("bytes", n + 8) - 8:
            raise NeoxrayError(f"{self.store.path(self.name, file)}: not a safetensors file (header of {n} bytes)")
        return json.loads(self.store.read_range(f"{self.name}/{file}", 8, n))

    def fetch(self, file: str) -> Path:
        """`file`, local and checked (downloaded by the first rank of this node that needs it)."""
        path, ok = self.local / file, self.local / f".{file}.ok"
        with node_lock(self.local / f".{file}.lock"):
            if not ok.exists():
                entry = self.listed.get(file, {})
                if not (path.exists() and "sha256" in entry and file_digest(path) == entry["sha256"]):
                    self.store.download(f"{self.name}/{file}", path)
                    if "sha256" in entry and file_digest(path) != entry["sha256"]:
                        raise NeoxrayError(
                            f"{self.store.path(self.name, file)}: does not match the checksum in its {META} "
                            f"(damaged); set the checkpoint aside (rename it) to resume from an older one"
                        )
                ok.touch()
        return path


class RunFiles:
    """Rank 0's copies of the run's small files to the store: config.yaml, the metrics file, TensorBoard's event
    files; each copied when its size or time changed since the last copy."""

    def __init__(self, store: RunStore, local: Path, names: list[str]):
        self.store, self.local, self.names = store, local, names
        self._sent: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        for name in self.names:
            root = self.local / name
            paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            for p in paths:
                if not p.is_file():
                    continue
                st = p.stat()
                rel = str(p.relative_to(self.local))
                if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                    self.store.upload(p, rel)
                    self._sent[rel] = (st.st_size, st.st_mtime_ns)
