"""Training checkpoints, read side: the format, the names a checkpoint takes in a run directory, reading tensors
for any layout, and the checks every reader makes. Training writes them (`neoxray.platform.train.checkpointing`,
collective, DeepSpeed) and decides where a run resumes (`neoxray.platform.train.resume`); export writes Hugging
Face directories from them (`neoxray.platform.export`). Training, serving, export and evaluation read them
through this module, which needs neither Ray nor DeepSpeed.

A checkpoint directory (written by every rank into a staging directory that rank 0 renames once all files are
on disk):

    meta.json                      step, consumed_samples, layout (dp, tp, pp), the resolved run config, the
                                   model config, tokenizer identity, the list of shard files, and the size and
                                   sha256 of every other file (`files`); written by rank 0, last
    shard-pp{P}-tp{T}.safetensors  written by the data-parallel rank 0 of each (pipeline stage, tensor rank):
                                   for each parameter of that stage, under its plain-model name N:
                                   "model/N" (the weights; the fp32 master copy under mixed precision),
                                   "exp_avg/N", "exp_avg_sq/N" (Adam moments, gathered from the ZeRO-1 shards);
                                   the header metadata records each tensor's tensor-parallel split dimension
    rng-{rank}.safetensors         each rank's RNG states (restored when the layout is unchanged)
    tokenizer.json, ...            the run's tokenizer, so the checkpoint can be exported alone

Its name in RUN_DIR says what is known of it: `unverified-checkpoint-step-N` when it is written, renamed
`checkpoint-step-N` once its weights have given a finite loss (the next step's forward, or a probe forward at
the end of the run), so every reader that lists a run's checkpoints (resume, rotation, `--model RUN_DIR`,
evaluation) sees only verified ones. Checkpoints a run cannot use are set aside under another name, never
deleted: `damaged-` (a file differs from meta.json), `incomplete-` (no meta.json), `diverged-` (its weights gave
a non-finite loss), `before-start-over-` (`neoxray train --start-over`).

Because each tensor is stored with its tensor-parallel split dimension and its plain-model name, a checkpoint
saved under one (dp, tp, pp) loads under any other: shards are concatenated along the split dimension and
re-sliced for the new tensor-parallel size, and pipeline stages find their layers by name. A checkpoint
counts as complete when `meta.json` is present and every file it lists exists with the listed size
(`read_meta`), and as intact when every file also has the listed sha256 (`verify_checkpoint`). Every reader
checks the files it uses against meta.json before using them (`verify_files`: the tokenizer files, and each
shard on its first read by `CheckpointSource`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from neoxray.errors import NeoxrayError
from neoxray.model.precision import to_dtype
from neoxray.model.sharding import read_slice, shard
from neoxray.paths import is_uri, local_path
from neoxray.platform.checkpoint_format import (
    CHECKPOINT_DIR,
    CHECKPOINT_PREFIX,
    DAMAGED_PREFIX,
    DIVERGED_PREFIX,
    EVAL_PIN,
    FORMAT,
    INCOMPLETE_PREFIX,
    META,
    OPT_KEYS,
    START_OVER_PREFIX,
    UNVERIFIED_PREFIX,
    checkpoint_dir_name,
    checkpoint_step,
    file_digest,
    listed_files,
    rng_file_name,
    shard_name,
)

# the format's names live in checkpoint_format (no torch); its readers import them from here too
__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_PREFIX",
    "DAMAGED_PREFIX",
    "DIVERGED_PREFIX",
    "EVAL_PIN",
    "FORMAT",
    "INCOMPLETE_PREFIX",
    "META",
    "OPT_KEYS",
    "START_OVER_PREFIX",
    "UNVERIFIED_PREFIX",
    "checkpoint_dir_name",
    "checkpoint_step",
    "file_digest",
    "listed_files",
    "rng_file_name",
    "shard_name",
]


def list_checkpoints(run_dir) -> list[Path]:
    """The verified checkpoints of a run directory (`checkpoint-step-N` with a meta.json), oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_DIR.fullmatch(p.name) and (p / META).exists()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(run_dir, keep: int) -> list[Path]:
    """Delete the oldest verified checkpoints of `run_dir` beyond the newest `keep` (0: keep all); never the
    newest verified one, never one pinned for evaluation (`EVAL_PIN`), never an unverified one. Returns what was
    deleted."""
    import shutil

    done = list_checkpoints(run_dir)
    gone = [p for p in (done[:-keep] if keep else []) if not (p / EVAL_PIN).exists()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete verified checkpoint of a run directory (sizes checked, not checksums)."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            read_meta(p)
            return p
        except NeoxrayError:
            continue
    return None


def aside_path(path, prefix: str) -> Path:
    """Where `set_aside(path, prefix)` puts a folder: PREFIX + its name (without `unverified-`) beside it,
    numbered when that is taken."""
    path = Path(path)
    name = path.name.removeprefix(UNVERIFIED_PREFIX)
    aside, n = path.with_name(prefix + name), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{prefix}{n}-{name}")
    return aside


def set_aside(path, prefix: str, to: Path | None = None) -> Path:
    """Rename a checkpoint folder (or a file) out of every reader's way (to `to`, default `aside_path`): kept,
    never deleted. Returns its new path."""
    aside = to or aside_path(path, prefix)
    Path(path).rename(aside)
    return aside


def resolve_model_path(path, what: str = "--model") -> tuple[str, Path]:
    """-> ("hf" | "checkpoint", directory); a NeoxrayError naming the path when it is neither. A URI is read
    through this node's model cache (`neoxray.platform.model_cache`; a NeoxrayError names `what` and the URI)."""
    if is_uri(str(path)):
        from neoxray.platform.model_cache import local_model

        path = local_model(path, what)
    p = local_path(path, what)
    if not p.exists():
        raise NeoxrayError(f"model not found: {path}")
    if (p / "config.json").exists():
        return "hf", p
    if (p / META).exists():
        return "checkpoint", p
    newest = latest_checkpoint(p) if p.is_dir() else None
    if newest is not None:
        return "checkpoint", Path(newest)
    raise NeoxrayError(
        f"{path}: not a Hugging Face model directory (no config.json), a neoxray checkpoint "
        f"(no {META}) or a run directory with a complete checkpoint"
    )


# ---------------------------------------------------------------------------------------------------------
# reading tensors by plain-model name, for any target tensor-parallel rank and size
# ---------------------------------------------------------------------------------------------------------
class TensorSource:
    """Where a rank's parameters come from: `get(key, tp_dim, tp_rank, tp_size)` returns this rank's slice."""

    def get(self, key: str, tp_dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
        raise NotImplementedError

    def load_into(self, piece, prefix_key: str = "model/") -> None:
        """Fill a freshly built pipeline piece (any layout) from this source."""
        with torch.no_grad():
            for name, p in piece.canonical_parameters():
                dim = getattr(p, "tp_dim", None)
                t = self.get(prefix_key + name, dim, getattr(p, "tp_rank", 0), getattr(p, "tp_size", 1))
                if t.shape != p.shape:
                    raise NeoxrayError(f"{self}: {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
                p.copy_(t)


class CheckpointSource(TensorSource):
    """A neoxray training checkpoint directory. `files`: for a checkpoint on object storage, what fetches its
    files into `path` on first use (`neoxray.platform.run_store.StoreCheckpointFiles`: `meta`, `header(name)`,
    `fetch(name)`, each file checked as it arrives), so a rank downloads only the shards it reads."""

    def __init__(self, path, files=None):
        self.path = Path(path)
        self.files = files
        self.meta = read_meta(self.path) if files is None else files.meta
        self._verified: set[str] = set()
        self._index: dict[str, list[tuple[int, str, int | None]]] = {}  # key -> [(tp rank, file name, dim)]
        for entry in self.meta["shards"]:
            name = entry["file"]
            if files is None:
                with safe_open(self.path / name, framework="pt") as sf:
                    keys, info = list(sf.keys()), sf.metadata() or {}
            else:
                header = files.header(name)
                keys, info = [k for k in header if k != "__metadata__"], header.get("__metadata__") or {}
            dims = json.loads(info.get("tp_dims", "{}"))
            for key in keys:
                self._index.setdefault(key, []).append((entry["tp"], name, dims.get(key)))
        self.saved_tp = self.meta["layout"]["tp"]

    def __repr__(self):
        return f"checkpoint {self.path}"

    def keys(self):
        return list(self._index)

    def file(self, name: str) -> Path | None:
        """This checkpoint's file `name` as a local path (fetched first on object storage), checked against its
        sha256 the first time; None when the checkpoint has no such file."""
        if self.files is not None:
            return self.files.fetch(name) if name in self.files.listed else None
        if not (self.path / name).exists():
            return None
        if name not in self._verified:
            verify_files(self.path, self.meta, [name])
            self._verified.add(name)
        return self.path / name

    def _read(self, name: str, key: str) -> torch.Tensor:
        """A tensor of one of this checkpoint's files, the file's sha256 checked the first time it is read."""
        return _read(self.file(name), key)

    def get(self, key, tp_dim, tp_rank, tp_size):
        entries = sorted(self._index.get(key, []))
        if not entries:
            raise NeoxrayError(f"{self.path}: checkpoint has no tensor {key!r}")
        saved_dim = entries[0][2]
        if saved_dim is None or len(entries) == 1:
            full = self._read(entries[0][1], key)
            return full if tp_dim is None else shard(full, tp_dim, tp_rank, tp_size)
        if tp_dim is not None and tp_dim != saved_dim:
            raise NeoxrayError(f"{self.path}: {key} was split on dim {saved_dim}, the model splits dim {tp_dim}")
        if len(entries) == tp_size:  # same tensor-parallel size: this rank's own file
            return self._read(entries[tp_rank][1], key)
        full = torch.cat([self._read(f, key) for _, f, _ in entries], dim=saved_dim)
        return full if tp_dim is None else shard(full, tp_dim, tp_rank, tp_size)


class HFSource(TensorSource):
    """A Hugging Face GPT-NeoX directory (fine-tuning): each rank reads only its slice of each tensor."""

    def __init__(self, path):
        from neoxray.model.hf import from_hf_name, weight_files

        self.path = Path(path)
        self._files = {from_hf_name(k): (k, f) for k, f in weight_files(self.path).items()}

    def __repr__(self):
        return f"Hugging Face directory {self.path}"

    def get(self, key, tp_dim, tp_rank, tp_size):
        name = key.removeprefix("model/")
        if name not in self._files:
            raise NeoxrayError(f"{self.path}: no tensor for {name}")
        hf_name, f = self._files[name]
        with safe_open(f, framework="pt") as sf:
            try:
                return read_slice(sf.get_slice(hf_name), tp_dim, tp_rank, tp_size)
            except NeoxrayError as e:
                raise NeoxrayError(f"{self.path}: {hf_name}: {e} (tensor parallel {tp_size})") from None


def _read(path: Path, key: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


# ---------------------------------------------------------------------------------------------------------
# meta.json and completeness
# ---------------------------------------------------------------------------------------------------------
def read_meta(path) -> dict:
    """meta.json of a complete checkpoint (every listed file present with its size); a missing, foreign or
    incomplete checkpoint is a NeoxrayError."""
    path = Path(path)
    meta_path = path / META
    if not path.is_dir():
        raise NeoxrayError(f"checkpoint not found: {path}")
    if not meta_path.exists():
        raise NeoxrayError(f"{path}: no {META}; not a neoxray checkpoint, or one whose save did not finish")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise NeoxrayError(f"{meta_path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise NeoxrayError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    for name, entry in listed_files(meta).items():
        f = path / name
        if not f.exists() or f.stat().st_size != entry["bytes"]:
            raise NeoxrayError(f"{path}: incomplete checkpoint: {name} is missing or has the wrong size")
    return meta


def verify_checkpoint(path, threads: int = 8) -> dict:
    """meta.json of an intact checkpoint: complete, and every file it lists has its recorded sha256 (hashed in
    `threads` parallel threads). A damaged file is a NeoxrayError naming it."""
    meta = read_meta(path)
    verify_files(path, meta, threads=threads)
    return meta


def verify_files(path, meta: dict, names=None, threads: int = 8) -> None:
    """Check files of the checkpoint at `path` (default: every file its meta.json lists) against the sha256
    meta.json records for them, before anything reads them. A file that differs, or one meta.json does not vouch
    for (a checkpoint whose meta.json lists its files), is a NeoxrayError naming it."""
    path, listed = Path(path), listed_files(meta)
    names = list(listed) if names is None else list(names)
    unlisted = sorted(n for n in names if n not in listed) if "files" in meta else []
    if unlisted:
        raise NeoxrayError(f"{path}: {', '.join(unlisted)} not listed in {META}: nothing vouches for them")
    todo = [n for n in names if "sha256" in listed.get(n, {})]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo) or 1))) as pool:
        digests = dict(zip(todo, pool.map(lambda n: file_digest(path / n), todo)))
    bad = sorted(n for n, d in digests.items() if d != listed[n]["sha256"])
    if bad:
        raise NeoxrayError(f"{path}: {', '.join(bad)} do not match the checksums in {META} (damaged)")


def check_finite_tensor(name: str, t: torch.Tensor, where) -> None:
    """A NeoxrayError naming the tensor when it holds NaN or infinity: such weights are never used or passed on."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NeoxrayError(f"{where}: tensor {name} holds non-finite values (NaN or infinity)")


# ---------------------------------------------------------------------------------------------------------
# whole models and tokenizers
# ---------------------------------------------------------------------------------------------------------
def checkpoint_dtype(meta: dict) -> torch.dtype:
    """The training precision of a checkpoint as a torch dtype (fp32 when it trained in fp32)."""
    return to_dtype(meta.get("precision") or "fp32", "precision") or torch.float32


def load_checkpoint_model(checkpoint_dir, device="cpu", dtype: torch.dtype = torch.float32):
    """The whole plain model of a training checkpoint (any layout), built on the meta device and filled one
    tensor at a time, each file checked against meta.json and each tensor for non-finite values ->
    (model, CheckpointSource)."""
    from neoxray.model.config import ModelConfig
    from neoxray.model.gptneox import build_model

    source = CheckpointSource(checkpoint_dir)
    model = build_model(ModelConfig.from_dict(source.meta["model_config"]), device=device, seed=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = source.get(f"model/{name}", None, 0, 1)
            check_finite_tensor(name, t, source.path)
            p.copy_(t)
    return model.to(dtype), source


def checkpoint_chat_template(path, meta: dict):
    """The chat template a checkpoint's run trained with (meta.json's `chat_template`, recorded from its
    conversation datasets' manifests) as a `ChatTemplate`, or None (a run on other data)."""
    from neoxray.model.chat_template import ChatTemplate

    spec = meta.get("chat_template")
    if not spec:
        return None
    return ChatTemplate(spec["text"], f"{spec['source']} (recorded in {Path(path) / META})", spec["special_tokens"])


def load_checkpoint_tokenizer(path, meta: dict):
    """The tokenizer a checkpoint carries (None when it carries none), its files checked against meta.json
    first: a tokenizer.json that differs from what was trained with is never used."""
    from neoxray.model.tokenizer import SAVED_FILES, TOKENIZER_FILE, Tokenizer

    path = Path(path)
    if not (path / TOKENIZER_FILE).exists():
        return None
    verify_files(path, meta, [name for name in SAVED_FILES if (path / name).exists()])
    return Tokenizer.load(path)
