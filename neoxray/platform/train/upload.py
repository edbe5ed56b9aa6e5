"""The training ranks' side of a run on object storage (`neoxray.platform.run_store`): each rank uploads its own
files of every verified checkpoint in the background while training goes on, and the next save (or the end of
the run) waits for that upload; rank 0 writes `meta.json` to the store only once every rank's upload is done,
then deletes the store's checkpoints beyond `checkpoint.keep` (never the newest complete one)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch.distributed as dist

from neoxray.errors import NeoxrayError
from neoxray.platform.checkpoint import EVAL_PIN, META
from neoxray.platform.run_store import RunFiles, RunStore, rotate_store
from neoxray.platform.train.run_plan import RunPlan
from neoxray.platform.train.trackers import IDS_FILE


def node_leader() -> bool:
    """Whether this rank makes and renames checkpoint folders in its node's mirror (local rank 0; Ray Train and
    torchrun set LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def prepare_mirror(plan: RunPlan, rank: int) -> None:
    """Before the engine is built: this node's mirror, and on rank 0 the store's metrics file and tracker ids, so
    the resumed run continues them (the checkpoint it resumes from is read file by file as the ranks need it:
    `neoxray.platform.run_store.StoreCheckpointFiles`). Every rank calls it."""
    store = RunStore(plan.store_uri)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    for name in (plan.cfg.logging.metrics_file, IDS_FILE):  # continued: the metrics, the trackers' run ids
        if rank == 0 and name and store.exists(name):
            store.download(name, plan.run_dir / name)


class CheckpointUploads:
    """One rank's uploads (see the module docstring). `begin` after a checkpoint is verified (every rank at
    once), `complete` before the next save and at the end (collective)."""

    def __init__(self, plan: RunPlan, rank: int):
        self.store = RunStore(plan.store_uri)
        self.rank, self.keep = rank, plan.cfg.checkpoint.keep
        self.pin = bool(plan.cfg.eval.tasks)  # the driver unpins each checkpoint on the store once evaluated
        names = ["config.yaml", plan.cfg.logging.metrics_file, IDS_FILE]
        names.append("tensorboard" if plan.cfg.logging.tensorboard else None)
        names.append("wandb" if plan.cfg.logging.wandb.enabled else None)  # W&B's offline files, for `wandb sync`
        self.run_files = RunFiles(self.store, plan.run_dir, [n for n in names if n]) if rank == 0 else None
        self._thread: threading.Thread | None = None
        self._folder: Path | None = None
        self._error: str | None = None
        self._metrics_thread: threading.Thread | None = None

    def begin(self, folder: Path, names: list[str]) -> None:
        """Upload this rank's files `names` of the verified checkpoint `folder` in a background thread (meta.json
        waits for `complete`)."""
        self._folder, self._error = folder, None

        def upload() -> None:
            try:
                for name in names:
                    if name != META:
                        self.store.upload(folder / name, f"{folder.name}/{name}")
            except NeoxrayError as e:
                self._error = str(e)

        self._thread = threading.Thread(target=upload, name="neoxray-upload", daemon=True)
        self._thread.start()

    def complete(self) -> None:
        """Wait for this rank's upload, learn every rank's outcome (collective), and on success have rank 0 write
        meta.json to the store, rotate the store's checkpoints and copy the run's small files. A failed upload
        ends the run on every rank with the same line naming the file."""
        for thread in (self._thread, self._metrics_thread):
            if thread is not None:
                thread.join()
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, self._error)
        failed = [e for e in outcomes if e]
        if failed:
            raise NeoxrayError(f"checkpoint upload failed: {failed[0]}; the store holds no {META} for it")
        folder, self._thread, self._folder = self._folder, None, None
        if self.rank != 0:
            return
        if folder is not None:
            if self.pin:  # eval.tasks: pinned before it is complete, so rotation waits for its evaluation
                (folder / EVAL_PIN).touch()
                self.store.upload(folder / EVAL_PIN, f"{folder.name}/{EVAL_PIN}")
                (folder / EVAL_PIN).unlink()
            self.store.upload(folder / META, f"{folder.name}/{META}")  # last: the checkpoint is complete
            rotate_store(self.store, self.keep)
        self.sync_run_files()

    def sync_run_files(self) -> None:
        """Rank 0: config.yaml, metrics and TensorBoard files to the store, now."""
        if self.run_files is not None:
            self.run_files.sync()

    def sync_run_files_soon(self) -> None:
        """Rank 0, at a logging step: the same in the background, unless the previous copy is still running (a
        watcher of the store sees the metrics within a logging interval or two)."""
        if self.run_files is None or (self._metrics_thread is not None and self._metrics_thread.is_alive()):
            return

        def sync() -> None:
            # a failure here is left to the next logging step or checkpoint, whose copy is checked
            with contextlib.suppress(NeoxrayError):
                self.run_files.sync()

        self._metrics_thread = threading.Thread(target=sync, name="neoxray-run-files", daemon=True)
        self._metrics_thread.start()
