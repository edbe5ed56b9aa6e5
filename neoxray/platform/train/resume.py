"""Where a run resumes in its own run directory, decided once, before any worker starts.

The candidates are its checkpoint folders, newest step first: `checkpoint-step-N` (verified: its weights have
given a finite loss) and `unverified-checkpoint-step-N` (written, but the run ended before a forward pass with
its weights; the run resumes from it saying so, and the first step's loss verifies it). The newest intact one
wins; the newer ones it passes over are set aside by name and reported: `damaged-...` (a file differs from
meta.json) or `incomplete-...` (no meta.json). When the run directory holds checkpoints and none of them can be
resumed, the run is refused in one line naming each, and nothing is touched, unless the user starts over
(`neoxray train --start-over`): then every checkpoint folder and the old metrics file are set aside and the run
trains from step 0. Nothing is ever deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.platform.checkpoint import (
    CHECKPOINT_PREFIX,
    DAMAGED_PREFIX,
    INCOMPLETE_PREFIX,
    META,
    START_OVER_PREFIX,
    checkpoint_step,
    latest_checkpoint,
    set_aside,
    verify_checkpoint,
)


@dataclass
class ResumePoint:
    """Where a run resumes, and what must be set aside first (`apply`, once every other check has passed)."""

    checkpoint: Path | None = None
    """The checkpoint to resume from (None: train from step 0)."""
    verified: bool = True
    """False when `checkpoint` is an unverified one (the first step's loss checks its weights)."""
    newest_verified: Path | None = None
    """The newest verified checkpoint of the run directory: what a stop names as the one to resume from."""
    moves: list[tuple[Path | str, str, str]] = field(default_factory=list)
    """(folder or file, the prefix it is set aside under, why) for each thing to rename out of the way."""
    start_over: bool = False
    """`--start-over`: everything in `moves` goes, and the run trains from step 0."""

    def apply(self, say: Callable[[str], None] = print) -> list[Path]:
        """Rename what must be set aside (kept, never deleted), say so, and say where the run resumes. Returns the
        new paths."""
        done = []
        for path, prefix, why in self.moves:
            shown, new = self._set_aside(path, prefix)
            done.append(new)
            if why:
                say(f"[neoxray] checkpoint {shown} {why}; set aside as {new.name}")
        if self.start_over:
            names = ", ".join(p.name for p in done) or "nothing"
            say(f"[neoxray] --start-over: set aside {names}; training from step 0")
        if self.checkpoint is not None:
            note = "" if self.verified else " (unverified: the first step's loss checks its weights)"
            say(f"[neoxray] resuming from {self._shown(self.checkpoint)}{note}")
        return done

    def _set_aside(self, path, prefix: str) -> tuple[str, Path]:
        """-> (what was set aside, as shown; its new path)."""
        return str(path), set_aside(path, prefix)

    def _shown(self, checkpoint: Path) -> str:
        return str(checkpoint)


def resumable_folders(run_dir) -> list[Path]:
    """The run directory's checkpoint folders (verified or not, complete or not), newest step first; at equal
    steps the verified one first."""
    root = Path(run_dir)
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None] if root.is_dir() else []
    return sorted(found, key=lambda p: (checkpoint_step(p), p.name.startswith(CHECKPOINT_PREFIX)), reverse=True)


def problem_of(folder: Path) -> tuple[str, str] | None:
    """Why a checkpoint folder cannot be resumed -> (the prefix it is set aside under, what is wrong, as words
    that follow its name), or None when it is intact (every file present, with its size and sha256)."""
    if not (folder / META).exists():
        return INCOMPLETE_PREFIX, f"has no {META} (its save did not finish, or the file was removed)"
    try:
        verify_checkpoint(folder)
    except NeoxrayError as e:
        return DAMAGED_PREFIX, f"is damaged ({str(e).removeprefix(f'{folder}: ')})"
    return None


def find_resume_point(run_dir, start_over: bool = False, metrics_file: str | None = None) -> ResumePoint:
    """Where the run in `run_dir` resumes (see the module docstring); nothing is renamed until `apply`. A run
    directory with checkpoints and none usable is a NeoxrayError naming each, unless `start_over` (then
    `metrics_file`, the run's metrics, is set aside with them)."""
    passed: list[tuple[Path, str, str]] = []
    found = None
    for folder in resumable_folders(run_dir):
        problem = problem_of(folder)
        if problem is None:
            found = folder
            break
        passed.append((folder, *problem))
    if start_over:
        return _start_over(run_dir, passed, metrics_file)
    if found is None and passed:
        listed = "; ".join(f"{p.name} {why}" for p, _, why in passed)
        raise NeoxrayError(
            f"run directory {run_dir} holds checkpoints and none of them can be resumed: {listed}; nothing was "
            f"changed: repair or remove them, train into a new --run-dir, or pass --start-over to set them aside "
            f"and train from step 0"
        )
    verified = found is None or found.name.startswith(CHECKPOINT_PREFIX)
    newest = found if verified else latest_checkpoint(run_dir)
    return ResumePoint(checkpoint=found, verified=verified, newest_verified=newest, moves=passed)


def _start_over(run_dir, passed, metrics_file: str | None) -> ResumePoint:
    """Every checkpoint folder of the run directory set aside (the ones found unusable by their reason, the rest
    as `before-start-over-`), and the old metrics file with them: the run trains from step 0."""
    problems = {p: (prefix, why) for p, prefix, why in passed}
    moves = [(f, *problems.get(f, (START_OVER_PREFIX, ""))) for f in resumable_folders(run_dir)]
    metrics = Path(run_dir) / metrics_file if metrics_file else None
    if metrics is not None and metrics.exists():
        moves.append((metrics, START_OVER_PREFIX, ""))
    return ResumePoint(moves=moves, start_over=True)


@dataclass
class StoreResumePoint(ResumePoint):
    """Where a run on object storage resumes: `checkpoint` is the folder its ranks download it into (their
    node's mirror) and `meta` its meta.json; `moves` name folders and files on the store, moved there."""

    store: object = None
    meta: dict | None = None

    def _set_aside(self, name, prefix: str) -> tuple[str, Path]:
        self.store.move(name, prefix + name)
        return self.store.path(name), Path(prefix + name)

    def _shown(self, checkpoint: Path) -> str:
        return self.store.path(checkpoint.name)


def find_store_resume_point(
    store, mirror: Path, start_over: bool = False, metrics_file: str | None = None
) -> StoreResumePoint:
    """`find_resume_point` for a run on object storage (`neoxray.platform.run_store.RunStore`): the newest
    complete checkpoint on the store (its meta.json, every listed file with its size; each rank checks the
    checksums as it downloads), the newer incomplete ones set aside; `mirror` is the workers' local mirror. When
    none is complete because every upload was cut before its meta.json (a kill during the first checkpoint's
    upload), they are set aside and the run starts from step 0; a damaged one is refused, as locally."""
    from neoxray.platform.run_store import NO_META, store_checkpoints

    passed, found, listed_on_store = [], None, store_checkpoints(store)  # each meta.json read once
    for name, meta, problem in listed_on_store:
        if problem is None:
            found = (name, meta)
            break
        passed.append((name, INCOMPLETE_PREFIX, problem))
    if start_over:
        moves = [
            (name, START_OVER_PREFIX if p is None else INCOMPLETE_PREFIX, p or "") for name, _, p in listed_on_store
        ]
        if metrics_file and store.exists(metrics_file):
            moves.append((metrics_file, START_OVER_PREFIX, ""))
        return StoreResumePoint(start_over=True, store=store, moves=moves)
    cut = [name for name, _, why in passed if why == NO_META]  # an upload that did not finish: nothing lost
    if found is None and passed and len(cut) < len(passed):
        listed = "; ".join(f"{name} {why}" for name, _, why in passed)
        raise NeoxrayError(
            f"run directory {store.uri} holds checkpoints and none of them can be resumed: {listed}; nothing was "
            f"changed: train into a new --run-dir, or pass --start-over to set them aside and train from step 0"
        )
    checkpoint = None if found is None else mirror / found[0]
    return StoreResumePoint(
        checkpoint=checkpoint,
        newest_verified=checkpoint,
        store=store,
        meta=None if found is None else found[1],
        moves=passed,
    )
