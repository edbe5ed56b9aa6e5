"""The per-worker training loop. It knows nothing of Ray: a `Reporter` takes its per-step metrics (under Ray
Train `RayReporter` in ray_worker.py calls `ray.train.report`), and `CheckpointWriter` writes checkpoints into
the run directory, which every rank sees (one machine, or shared storage on a cluster). Where a run resumes is
decided before any worker starts (`preflight`) and handed in as `resume_from`."""

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
from neoxray.platform.checkpoint import EVAL_PIN, CheckpointSource, checkpoint_dir_name, prune_checkpoints
from neoxray.platform.lora_checkpoint import resolve_base
from neoxray.platform.train.checkpointing import restore_training_state, save_checkpoint
from neoxray.platform.train.config import to_dict
from neoxray.platform.train.engine import TrainEngine


class Reporter:
    """Where every rank's per-step metrics go besides rank 0's metrics sink (nowhere without Ray)."""

    def report(self, metrics: dict) -> None:
        """Called by every rank after every step (collective under Ray Train)."""


class CheckpointWriter:
    """RUN_DIR/checkpoint-step-N, written by every rank: rank 0 makes a staging directory beside it, every rank
    writes its files there, then rank 0 renames it into place (a checkpoint directory is always whole) and
    deletes the oldest beyond `keep` (0: keep all). The newest checkpoint is never deleted, and damaged ones
    are set aside under another name before a run starts, so rotation only ever sees intact ones."""

    def __init__(self, run_dir, keep: int = 0, pin: bool = False):
        self.root = Path(run_dir)
        self.keep = keep
        self.pin = pin  # mark each new checkpoint for evaluation (eval.tasks): rotation leaves it until then
        self.newest: str | None = None

    @contextlib.contextmanager
    def write(self, step: int):
        """A context manager giving the staging directory; collective on entry and exit."""
        tmp = self.root / f".tmp-{checkpoint_dir_name(step)}"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        yield str(tmp)
        dist.barrier()  # every rank's files are in tmp
        dest = self.root / checkpoint_dir_name(step)
        if dist.get_rank() == 0:
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            if self.pin:
                (dest / EVAL_PIN).touch()
            prune_checkpoints(self.root, self.keep)
        self.newest = str(dest)
        dist.barrier()


def check_finite(metrics: dict, precision: str, newest: str | None) -> None:
    """Stop the run at a non-finite loss or gradient norm (bf16, fp32) before any checkpoint of that state is
    written. Under fp16 an overflowing step is DeepSpeed's dynamic loss scaling at work: it skips the step."""
    if precision == "fp16":
        return
    values = {k: metrics.get(k) for k in ("loss", "grad_norm")}
    bad = [f"{k} is {v}" for k, v in values.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise NeoxrayError(
            f"step {metrics['step']}: {' and '.join(bad)}; stopped before writing a checkpoint of this state "
            f"(newest checkpoint: {newest or 'none'}); lower optimizer.lr or check the data, then resume"
        )


def train_worker(
    cfg, run_dir, reporter: Reporter, data_fn, tokenizer=None, metrics_sink_fn=None, resume_from=None
) -> list[dict]:
    """Train this rank up to `cfg.train.steps` optimizer steps, from `resume_from` (a checkpoint: weights,
    optimizer, step, data position) or from `model.init_from` / a fresh initialisation. `data_fn(engine, split,
    consumed_samples)` returns an iterator of this dp rank's (input_ids, labels) micro-batches starting at
    `consumed_samples`. Returns the per-step metrics."""
    source = CheckpointSource(resume_from) if resume_from else None
    base = resolve_base(cfg.model.init_from) if cfg.model.init_from else None
    adapter_loader, extra = None, {"run_name": cfg.name, "config": to_dict(cfg)}
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
    engine = TrainEngine(cfg, loader=loader, adapter_loader=adapter_loader)
    if source is not None:
        restore_training_state(engine, source)
    writer = CheckpointWriter(run_dir, keep=cfg.checkpoint.keep, pin=bool(cfg.eval.tasks))
    writer.newest = resume_from
    sink = metrics_sink_fn(engine) if (metrics_sink_fn is not None and engine.rank == 0) else None
    if sink is not None:
        sink.rewind(engine.step)  # records of steps after the resume point describe a run that no longer exists
        if engine.step:
            sink.log({"event": "resumed", "step": engine.step, "consumed_samples": engine.consumed_samples})
    train_iter = data_fn(engine, "train", engine.consumed_samples)
    history = []
    every, ev = cfg.checkpoint.every, cfg.eval.every
    try:
        while engine.step < cfg.train.steps:
            metrics = engine.train_step(train_iter)
            check_finite(metrics, cfg.train.precision, writer.newest)
            if ev and engine.step % ev == 0:
                metrics["val_loss"] = engine.eval_loss(data_fn(engine, "validation", 0), cfg.eval.batches)
            history.append(metrics)
            if sink is not None:
                sink.log(metrics)
            if (every and engine.step % every == 0) or engine.step == cfg.train.steps:
                with writer.write(engine.step) as tmp:
                    save_checkpoint(engine, tmp, extra, tokenizer)
            reporter.report(metrics)
    finally:
        if sink is not None:
            sink.close()
    return history


def _adapter_loader(source: CheckpointSource):
    """Fill a piece's adapters (this rank's slices) from a LoRA checkpoint."""

    def load(piece) -> None:
        with torch.no_grad():
            for name, p in piece.canonical_parameters():
                if name.rpartition(".")[2] in LORA_PARAMS:
                    dim, r, n = getattr(p, "tp_dim", None), getattr(p, "tp_rank", 0), getattr(p, "tp_size", 1)
                    p.copy_(source.get(f"model/{name}", dim, r, n))

    return load


def run_worker(cfg, run_dir, reporter: Reporter, resume_from: str | None = None, console: bool = True) -> list[dict]:
    """One rank's whole run: its data, its tokenizer, the metrics sink (rank 0; printing the progress on stdout
    when `console`), then `train_worker`."""
    from neoxray.platform.train.data import load_run_tokenizer, make_data_fn
    from neoxray.platform.train.metrics import MetricsSink

    def sink(engine):
        return MetricsSink(
            run_dir,
            cfg.name,
            tensorboard=cfg.logging.tensorboard,
            ray_metrics=cfg.logging.ray_metrics,
            metrics_file=cfg.logging.metrics_file,
            stream=sys.stdout if console else None,
            print_every=cfg.logging.every,
            total_steps=cfg.train.steps,
        )

    return train_worker(
        cfg,
        run_dir,
        reporter,
        make_data_fn(cfg),
        load_run_tokenizer(cfg),
        metrics_sink_fn=sink,
        resume_from=resume_from,
    )
