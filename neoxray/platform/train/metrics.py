"""One place that fans training metrics out: RUN_DIR/metrics.jsonl, TensorBoard event files, Ray metrics
(`ray.util.metrics`, names `neoxray_train_*`, shown in the Ray dashboard and on the Prometheus export port), the
console progress (`progress.Progress`) and the experiment trackers (`trackers`: W&B, MLflow). Only one rank
(global rank 0) writes; Ray metrics are skipped where Ray is not running."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from neoxray.platform.train.progress import Progress

GAUGES = {
    "loss": "training loss of the last optimizer step",
    "val_loss": "validation loss",
    "lr": "learning rate",
    "grad_norm": "global gradient norm before clipping",
    "tokens_per_s": "training tokens per second (whole job)",
    "tflops_per_gpu": "achieved model TFLOP/s per worker",
    "mfu": "model FLOPs utilisation",
    "step": "optimizer steps done",
    "consumed_samples": "training sequences consumed",
    "step_time_s": "seconds per optimizer step",
    "loss_scale": "fp16 dynamic loss scale",
}


class MetricsSink:
    """Every record goes to `metrics_file` (None: no file), TensorBoard and the Ray gauges; with a `stream`, the
    progress is printed there (every `print_every` steps in a log, redrawn in place on a terminal)."""

    def __init__(
        self,
        run_dir,
        run_name: str,
        tensorboard: bool = True,
        ray_metrics: bool = True,
        metrics_file: str | None = "metrics.jsonl",
        stream=sys.stdout,
        print_every: int = 1,
        total_steps: int | None = None,
        trackers=None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / metrics_file if metrics_file else None
        self._file = self.path.open("a", buffering=1) if self.path is not None else None
        self.progress = Progress(total_steps or 0, print_every, stream) if stream is not None else None
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb_dir = self.run_dir / "tensorboard"
            self.writer = SummaryWriter(str(self.tb_dir))
        self.gauges = {}
        if ray_metrics:
            try:
                import ray
                from ray.util.metrics import Gauge

                if ray.is_initialized():
                    self.gauges = {
                        k: Gauge(f"neoxray_train_{k}", description=d, tag_keys=("run",)) for k, d in GAUGES.items()
                    }
            except ImportError:
                pass
        self.tags = {"run": run_name}
        self.trackers = trackers  # W&B, MLflow (`neoxray.platform.train.trackers.Trackers`), or None

    def rewind(self, step: int) -> None:
        """Drop the file's records of steps after `step` (a run resuming there redoes them), so that
        metrics.jsonl never holds one step twice. The file is rewritten whole and renamed into place."""
        if self.path is None or not self.path.exists():
            return
        self._file.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(record.get("step"), int) or record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", buffering=1)

    def log(self, metrics: dict) -> None:
        record = {"time": time.time(), **metrics}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        step = metrics.get("step", 0)
        for k, v in metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if self.writer is not None and k != "step":
                self.writer.add_scalar(f"train/{k}", v, step)
            if k in self.gauges:
                self.gauges[k].set(float(v), tags=self.tags)
        if self.progress is not None:
            self.progress.update(metrics)
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self, ok: bool = True, newest_checkpoint: str | None = None) -> None:
        """`ok`: the run reached its end (a tracker marks its run finished, or failed); `newest_checkpoint`:
        named in the trackers' summary."""
        if self.trackers is not None:
            self.trackers.finish(ok, newest_checkpoint)
        if self.progress is not None:
            self.progress.close()
        if self._file is not None:
            self._file.close()
        if self.writer is not None:
            self.writer.close()
