"""The per-worker training loop. It knows nothing of Ray: a `Reporter` hands it the checkpoint to resume
from and takes its metrics and checkpoints (`RayReporter` in ray_worker.py under Ray Train, `LocalReporter`
here for runs without Ray and for benchmarks)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from neoxray.platform.checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointSource,
    HFSource,
    checkpoint_dir_name,
    latest_checkpoint,
)
from neoxray.platform.train.checkpointing import restore_training_state, save_checkpoint
from neoxray.platform.train.config import to_dict
from neoxray.platform.train.engine import TrainEngine


class Reporter:
    def latest_checkpoint(self):
        """A context manager giving the directory of the checkpoint to resume from, or None."""
        return contextlib.nullcontext(None)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Called by every rank after every step (collective under Ray Train)."""

    def staging(self, step: int):
        """A context manager giving the directory this rank writes its checkpoint files into."""
        return tempfile.TemporaryDirectory(prefix="neoxray-ckpt-")


class LocalReporter(Reporter):
    """Without Ray (one process, or torchrun on one machine): checkpoints go to RUN_DIR/checkpoint-step-N, as
    under Ray Train; resumes from the newest complete one."""

    def __init__(self, run_dir, keep: int = 0):
        self.root = Path(run_dir)
        self.keep = keep

    def latest_checkpoint(self):
        latest = latest_checkpoint(self.root)
        return contextlib.nullcontext(str(latest) if latest else None)

    @contextlib.contextmanager
    def staging(self, step):
        """All ranks write into one hidden directory beside the final one; `report` renames it into place."""
        tmp = self.root / f".tmp-{checkpoint_dir_name(step)}"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        yield str(tmp)

    def report(self, metrics, checkpoint_dir=None):
        if checkpoint_dir is None:
            return
        dist.barrier()  # every rank's files are in checkpoint_dir (one machine)
        if dist.get_rank() == 0:
            dest = self.root / checkpoint_dir_name(metrics["step"])
            shutil.rmtree(dest, ignore_errors=True)
            Path(checkpoint_dir).rename(dest)
            old = sorted(self.root.glob(CHECKPOINT_PREFIX + "*"))
            for p in old[: -self.keep] if self.keep else []:
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()


def train_worker(cfg, reporter: Reporter, data_fn, tokenizer=None, metrics_sink_fn=None) -> list[dict]:
    """Train `cfg.train.steps` optimizer steps on this rank. `data_fn(engine, split, consumed_samples)` returns
    an iterator of this dp rank's (input_ids, labels) micro-batches starting at `consumed_samples`.
    Returns the per-step metrics."""
    own = reporter.latest_checkpoint() if cfg.checkpoint.resume else contextlib.nullcontext(None)
    with own as ckpt_dir:
        ckpt_dir = ckpt_dir or cfg.checkpoint.load_from
        source = CheckpointSource(ckpt_dir) if ckpt_dir else None
        if source is None and cfg.model.init_from:
            loader = HFSource(cfg.model.init_from).load_into
        else:
            loader = source.load_into if source is not None else None
        engine = TrainEngine(cfg, loader=loader)
        if source is not None:
            restore_training_state(engine, source)
    sink = metrics_sink_fn(engine) if (metrics_sink_fn is not None and engine.rank == 0) else None
    if sink is not None and engine.step:
        sink.log({"event": "resumed", "step": engine.step, "consumed_samples": engine.consumed_samples})
    train_iter = data_fn(engine, "train", engine.consumed_samples)
    history = []
    every, ev = cfg.checkpoint.every, cfg.eval.every
    try:
        while engine.step < cfg.train.steps:
            metrics = engine.train_step(train_iter)
            if ev and engine.step % ev == 0:
                metrics["val_loss"] = engine.eval_loss(data_fn(engine, "validation", 0), cfg.eval.batches)
            history.append(metrics)
            if sink is not None:
                sink.log(metrics)
            if (every and engine.step % every == 0) or engine.step == cfg.train.steps:
                with reporter.staging(engine.step) as tmp:
                    save_checkpoint(engine, tmp, {"run_name": cfg.name, "config": to_dict(cfg)}, tokenizer)
                    reporter.report(metrics, checkpoint_dir=tmp)
            else:
                reporter.report(metrics)
    finally:
        if sink is not None:
            sink.close()
    return history


def run_worker(cfg, run_dir, reporter: Reporter) -> list[dict]:
    """One rank's whole run: its data, its tokenizer, the metrics sink (rank 0), then `train_worker`."""
    from neoxray.platform.train.data import load_run_tokenizer, make_data_fn
    from neoxray.platform.train.metrics import MetricsSink

    def sink(engine):
        return MetricsSink(
            run_dir,
            cfg.name,
            tensorboard=cfg.logging.tensorboard,
            ray_metrics=cfg.logging.ray_metrics,
            metrics_file=cfg.logging.metrics_file,
            print_every=cfg.logging.every,
            total_steps=cfg.train.steps,
        )

    return train_worker(cfg, reporter, make_data_fn(cfg), tokenizer=load_run_tokenizer(cfg), metrics_sink_fn=sink)
