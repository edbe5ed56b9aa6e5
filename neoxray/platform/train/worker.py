"""The per-worker training loop. It knows nothing of Ray: a `Reporter` takes its per-step metrics (under Ray
Train `RayReporter` in ray_worker.py calls `ray.train.report`), and `CheckpointWriter` writes checkpoints into
the run directory, which every rank sees (one machine, or shared storage on a cluster). What a run starts from
is decided before any worker starts and handed in as a `RunPlan` (`neoxray.platform.train.run_plan`)."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from neoxray.errors import NeoxrayError
from neoxray.model.lora import LORA_PARAMS
from neoxray.platform.checkpoint import (
    DIVERGED_PREFIX,
    EVAL_PIN,
    UNVERIFIED_PREFIX,
    CheckpointSource,
    aside_path,
    checkpoint_dir_name,
    prune_checkpoints,
    set_aside,
)
from neoxray.platform.lora_checkpoint import resolve_base
from neoxray.platform.model_cache import local_model
from neoxray.platform.train.checkpointing import restore_training_state, save_checkpoint
from neoxray.platform.train.config import to_dict
from neoxray.platform.train.engine import TrainEngine
from neoxray.platform.train.run_plan import RunPlan


class Reporter:
    """Where every rank's per-step metrics go besides rank 0's metrics sink (nowhere without Ray)."""

    def report(self, metrics: dict) -> None:
        """Called by every rank after every step (under Ray Train a collective at every logging step)."""


class CheckpointWriter:
    """RUN_DIR/checkpoint-step-N, written by every rank and kept only once its weights have given a finite loss.
    Rank 0 makes a staging directory beside it, every rank writes its files there, then rank 0 renames it
    `unverified-checkpoint-step-N` (a checkpoint directory is always whole). `settle(loss)` takes the loss of the
    next forward pass with those weights: finite, and the checkpoint is renamed `checkpoint-step-N` (pinned for
    evaluation with `pin`) and the oldest verified ones beyond `keep` (0: keep all) are deleted, never the newest
    verified one; not finite, and it is set aside as `diverged-checkpoint-step-N`. `newest` is the newest
    verified checkpoint: what a stop names. Collective: every rank calls every method."""

    def __init__(self, run_dir, keep: int = 0, pin: bool = False, newest=None, pending=None, leader=None):
        self.root = Path(run_dir)
        # who makes, renames and deletes folders: rank 0 of a run directory every rank sees; one rank per node
        # when each node has its own mirror of a run on object storage
        self.leader = dist.get_rank() == 0 if leader is None else leader
        self.keep = keep
        self.pin = pin  # mark each new checkpoint for evaluation (eval.tasks): rotation leaves it until then
        self.newest: Path | None = None if newest is None else Path(newest)
        self.pending: Path | None = None if pending is None else Path(pending)

    @contextlib.contextmanager
    def write(self, step: int):
        """A context manager giving the staging directory; collective on entry and exit."""
        tmp = self.root / f".tmp-{checkpoint_dir_name(step)}"
        if self.leader:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        yield str(tmp)
        dist.barrier()  # every rank's files are in tmp
        dest = self.root / (UNVERIFIED_PREFIX + checkpoint_dir_name(step))
        if self.leader:
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        self.pending = dest
        dist.barrier()

    def settle(self, loss: float) -> Path | None:
        """`loss`: of a forward pass with the pending checkpoint's weights (none pending: nothing to do). Returns
        where a checkpoint that failed was set aside, else None."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if not math.isfinite(loss):
            aside = aside_path(pending, DIVERGED_PREFIX)  # named by every rank before rank 0 renames it
            dist.barrier()
            if self.leader:
                set_aside(pending, DIVERGED_PREFIX, to=aside)
            return aside
        dest = self.root / pending.name.removeprefix(UNVERIFIED_PREFIX)
        if self.leader:
            shutil.rmtree(dest, ignore_errors=True)
            pending.rename(dest)
            if self.pin and dist.get_rank() == 0:
                (dest / EVAL_PIN).touch()
            prune_checkpoints(self.root, self.keep)
        dist.barrier()  # renamed on every node before any rank reads it from there (an upload)
        self.newest = dest
        return None


def stop_on_non_finite(metrics: dict, precision: str, newest, diverged: Path | None = None) -> None:
    """Stop the run at a non-finite loss or gradient norm (bf16, fp32) before any checkpoint of that state is
    written; `diverged`: the checkpoint whose weights gave this loss, set aside. Under fp16 an overflowing step
    is DeepSpeed's dynamic loss scaling at work: it skips the step."""
    if precision == "fp16":
        return
    values = {k: metrics.get(k) for k in ("loss", "grad_norm")}
    bad = [f"{k} is {v}" for k, v in values.items() if v is not None and not math.isfinite(v)]
    if bad:
        aside = f"; the checkpoint whose weights gave it was set aside as {diverged.name}" if diverged else ""
        raise NeoxrayError(
            f"step {metrics['step']}: {' and '.join(bad)}; stopped before writing a checkpoint of this state "
            f"(newest checkpoint: {newest or 'none'}){aside}; lower optimizer.lr or check the data, then resume"
        )


def train_worker(plan: RunPlan, reporter: Reporter, data_fn, tokenizer=None, metrics_sink_fn=None) -> list[dict]:
    """Train this rank up to `cfg.train.steps` optimizer steps, from the plan's checkpoint (weights, optimizer,
    step, data position) or from `model.init_from` / a fresh initialisation. `data_fn(engine, split,
    consumed_samples)` returns an iterator of this dp rank's micro-batches (`engine.MicroBatch`) starting at
    `consumed_samples`. A run on object storage (`plan.store_uri`) trains in this node's mirror and uploads each
    verified checkpoint (`neoxray.platform.train.upload`). Returns the per-step metrics."""
    cfg = plan.cfg
    uploads = None
    if plan.store_uri:
        from neoxray.platform.train.upload import CheckpointUploads, node_leader, prepare_mirror

        prepare_mirror(plan, dist.get_rank())
        uploads = CheckpointUploads(plan, dist.get_rank())
    engine, extra = _build_engine(plan)
    pending = None if plan.resume_verified else plan.resume_from  # its first step's loss verifies it
    writer = CheckpointWriter(
        plan.run_dir,
        cfg.checkpoint.keep,
        bool(cfg.eval.tasks) and uploads is None,  # on object storage the pins are the store's (upload.py)
        plan.newest_checkpoint,
        pending,
        leader=node_leader() if uploads is not None else None,
    )
    sink = metrics_sink_fn(engine) if (metrics_sink_fn is not None and engine.rank == 0) else None
    if sink is not None:
        sink.rewind(engine.step)  # records of steps after the resume point describe a run that no longer exists
        if engine.step:
            sink.log({"event": "resumed", "step": engine.step, "consumed_samples": engine.consumed_samples})
    train_iter = data_fn(engine, "train", engine.consumed_samples)
    history, written = [], []
    every, ev = cfg.checkpoint.every, cfg.eval.every
    finished = False
    try:
        while engine.step < cfg.train.steps:
            metrics = engine.train_step(train_iter)
            diverged = _settle(writer, metrics["loss"], uploads, written)  # its forward ran on the pending weights
            stop_on_non_finite(metrics, cfg.train.precision, writer.newest, diverged)
            if ev and engine.step % ev == 0:
                metrics["val_loss"] = engine.eval_loss(data_fn(engine, "validation", 0), cfg.eval.batches)
            history.append(metrics)
            if sink is not None:
                sink.log(metrics)
            if (every and engine.step % every == 0) or engine.step == cfg.train.steps:
                if uploads is not None:
                    uploads.complete()  # the previous checkpoint's upload: one checkpoint in flight at a time
                with writer.write(engine.step) as tmp:
                    written = save_checkpoint(engine, tmp, extra, tokenizer)
            elif uploads is not None and engine.step % cfg.logging.every == 0:
                uploads.sync_run_files_soon()
            reporter.report(metrics)
        _settle_last(engine, writer, train_iter, uploads, written)
        if uploads is not None:
            uploads.complete()
        finished = True
    finally:
        if sink is not None:
            newest = writer.newest
            if newest is not None and plan.store_uri:  # the trackers name it where it lives
                newest = f"{plan.store_uri.rstrip('/')}/{Path(newest).name}"
            sink.close(ok=finished, newest_checkpoint=None if newest is None else str(newest))
    if uploads is not None:
        uploads.sync_run_files()  # the metrics file as the sink closed it
    return history


def _settle(writer: CheckpointWriter, loss: float, uploads, written: list[str]):
    """`writer.settle(loss)`; a checkpoint it verified starts uploading (a run on object storage). Collective."""
    before = writer.newest
    diverged = writer.settle(loss)
    if uploads is not None and writer.newest != before:
        uploads.begin(writer.newest, written)
    return diverged


def _settle_last(engine: TrainEngine, writer: CheckpointWriter, train_iter, uploads=None, written=()) -> None:
    """The run's last checkpoint has had no forward pass with its weights: one probe forward on the next
    micro-batch of the training data decides whether it is kept. Collective."""
    if writer.pending is None:
        return
    loss = engine.probe_loss(train_iter)
    diverged = _settle(writer, loss, uploads, list(written))
    if diverged is not None:
        raise NeoxrayError(
            f"step {engine.step}: the weights after this step give a non-finite loss ({loss}) on the next batch "
            f"(their update diverged); their checkpoint was set aside as {diverged.name} (newest checkpoint: "
            f"{writer.newest or 'none'}); lower optimizer.lr or check the data, then resume"
        )


def _build_engine(plan: RunPlan) -> tuple[TrainEngine, dict]:
    """This rank's engine, filled from the plan's checkpoint (or `model.init_from`'s weights, or initialised from
    the seed), and the extra meta.json entries of its checkpoints (a LoRA run's adapter shape and base; the chat
    template of the conversations it trains on)."""
    cfg = plan.cfg
    source = _checkpoint_source(plan)
    base = resolve_base(cfg.model.init_from) if cfg.model.init_from else None
    adapter_loader, extra = None, {"run_name": cfg.name, "config": to_dict(cfg)}
    if plan.chat_template is not None:
        extra["chat_template"] = plan.chat_template
    if cfg.lora.spec() is not None:  # LoRA: the base from model.init_from, frozen; the adapters trained
        loader = base.source().load_into
        if source is not None:  # preflight checked it was trained on this base
            adapter_loader = _adapter_loader(source)
        extra.update(lora=cfg.lora.spec().to_dict(), base=base.identity() if dist.get_rank() == 0 else None)
    elif source is not None:
        loader = source.load_into
    elif base is not None:
        loader = base.source().load_into
    else:
        loader = None
    engine = TrainEngine(cfg, plan.model_config, loader=loader, adapter_loader=adapter_loader)
    if source is not None:
        restore_training_state(engine, source)
    return engine, extra


def _checkpoint_source(plan: RunPlan) -> CheckpointSource | None:
    """What the run starts from: its own checkpoint (on object storage: read into this node's mirror file by file,
    only the shards this node's ranks read), or `checkpoint.load_from` (a URI: this node's model cache)."""
    if not plan.resume_from:
        return None
    if plan.store_uri and Path(plan.resume_from).parent == plan.run_dir:
        from neoxray.platform.run_store import RunStore, StoreCheckpointFiles

        local = Path(plan.resume_from)
        return CheckpointSource(local, files=StoreCheckpointFiles(RunStore(plan.store_uri), local.name, local))
    return CheckpointSource(local_model(plan.resume_from, "checkpoint.load_from"))


def _adapter_loader(source: CheckpointSource):
    """Fill a piece's adapters (this rank's slices) from a LoRA checkpoint."""

    def load(piece) -> None:
        with torch.no_grad():
            for name, p in piece.canonical_parameters():
                if name.rpartition(".")[2] in LORA_PARAMS:
                    dim, r, n = getattr(p, "tp_dim", None), getattr(p, "tp_rank", 0), getattr(p, "tp_size", 1)
                    p.copy_(source.get(f"model/{name}", dim, r, n))

    return load


def run_worker(plan: RunPlan, reporter: Reporter, console: bool = True) -> list[dict]:
    """One rank's whole run: its data, its tokenizer, the metrics sink (rank 0; printing the progress on stdout
    when `console`), then `train_worker`."""
    from neoxray.platform.train.data import load_run_tokenizer, make_data_fn
    from neoxray.platform.train.metrics import MetricsSink

    cfg = plan.cfg

    def sink(engine):
        trackers = None
        if cfg.logging.wandb.enabled or cfg.logging.mlflow.enabled:
            from neoxray.platform.train.trackers import Trackers

            trackers = Trackers(cfg.logging, to_dict(cfg), plan.run_dir, cfg.name)
        return MetricsSink(
            plan.run_dir,
            cfg.name,
            tensorboard=cfg.logging.tensorboard,
            ray_metrics=cfg.logging.ray_metrics,
            metrics_file=cfg.logging.metrics_file,
            stream=sys.stdout if console else None,
            print_every=cfg.logging.every,
            total_steps=cfg.train.steps,
            trackers=trackers,
        )

    return train_worker(plan, reporter, make_data_fn(cfg), load_run_tokenizer(cfg), metrics_sink_fn=sink)
