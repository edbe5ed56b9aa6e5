"""One place that fans training metrics out: console, RUN_DIR/metrics.jsonl, TensorBoard event files and
Ray metrics (`ray.util.metrics`, names `neoxray_train_*`, shown in the Ray dashboard and on the Prometheus
export port). Only one rank (global rank 0) writes; Ray metrics are skipped where Ray is not running."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

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
    """Every record goes to `metrics_file` (None: no file), TensorBoard and the Ray gauges; a console line is
    printed for every `print_every`-th step, the last step (`total_steps`), steps with a validation loss and
    events (such as a resume)."""

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
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / metrics_file if metrics_file else None
        self._file = self.path.open("a", buffering=1) if self.path is not None else None
        self.stream = stream
        self.print_every = max(1, int(print_every))
        self.total_steps = total_steps
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
        if self.stream is not None and self._prints(metrics):
            self.stream.write(format_line(metrics) + "\n")
            self.stream.flush()

    def _prints(self, metrics: dict) -> bool:
        step = metrics.get("step")
        if "event" in metrics or "val_loss" in metrics or not isinstance(step, int):
            return True
        return step % self.print_every == 0 or step == self.total_steps

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.writer is not None:
            self.writer.close()


def format_line(m: dict) -> str:
    parts = [f"step {m.get('step')}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("val_loss", "{:.4f}"),
        ("lr", "{:.3e}"),
        ("grad_norm", "{:.3f}"),
        ("tokens_per_s", "{:,.0f}"),
        ("tflops_per_gpu", "{:.2f}"),
        ("mfu", "{:.3f}"),
        ("loss_scale", "{:g}"),
    ):
        if m.get(key) is not None:
            parts.append(f"{key} " + fmt.format(m[key]))
    return " | ".join(parts)
