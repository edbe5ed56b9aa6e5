"""The names and checks of the training checkpoint format that need no torch: the file names, the folder names a
run directory gives its checkpoints, and the sizes and checksums meta.json vouches for. Below
`neoxray.platform.checkpoint` (the format described, and the reading), `neoxray.platform.run_store` (runs on
object storage) and `neoxray.platform.model_cache` (models read from there), which all use them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

META = "meta.json"
FORMAT = "neoxray-checkpoint-v1"
OPT_KEYS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_PREFIX = "checkpoint-step-"
"""A run directory holds one checkpoint per saved step: RUN_DIR/checkpoint-step-0000100/."""
UNVERIFIED_PREFIX = "unverified-"
"""RUN_DIR/unverified-checkpoint-step-N: complete, but its weights have not yet been through a forward pass."""
DAMAGED_PREFIX = "damaged-"
"""A checkpoint that failed verification is renamed RUN_DIR/damaged-checkpoint-step-N (kept, never read)."""
INCOMPLETE_PREFIX = "incomplete-"
"""A checkpoint folder without meta.json, set aside when its run resumes from an older one."""
DIVERGED_PREFIX = "diverged-"
"""A checkpoint whose weights gave a non-finite loss: RUN_DIR/diverged-checkpoint-step-N (kept, never read)."""
START_OVER_PREFIX = "before-start-over-"
"""What `neoxray train --start-over` set aside (checkpoints, metrics) to train a run directory from step 0."""
EVAL_PIN = ".evaluation-pending"
"""A file in a checkpoint directory that `eval.tasks` has yet to evaluate: rotation (`keep`) leaves it alone."""
CHECKPOINT_DIR = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d{7})")
_RESUMABLE_DIR = re.compile(f"(?:{re.escape(UNVERIFIED_PREFIX)})?{re.escape(CHECKPOINT_PREFIX)}(\\d{{7}})")


def shard_name(pp: int, tp: int) -> str:
    return f"shard-pp{pp:02d}-tp{tp:02d}.safetensors"


def rng_file_name(rank: int) -> str:
    return f"rng-{rank:05d}.safetensors"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(path) -> int | None:
    """The step of a checkpoint folder named `checkpoint-step-N` or `unverified-checkpoint-step-N`, else None."""
    m = _RESUMABLE_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def file_digest(path) -> str:
    """Hex sha256 of a file's bytes (read in 8 MiB pieces; hashlib releases the GIL, so files hash in
    parallel threads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def listed_files(meta: dict) -> dict[str, dict]:
    """file name -> {"bytes", "sha256"?} for every file meta.json vouches for (older checkpoints list only their
    shards, by size)."""
    files = dict(meta.get("files") or {})
    for entry in meta["shards"]:
        files.setdefault(
            entry["file"], {"bytes": entry["bytes"], **({"sha256": entry["sha256"]} if "sha256" in entry else {})}
        )
    return files
