"""Per-worker code under Ray Train: the function every Ray Train worker runs, and the `Reporter` that hands the
training loop its checkpoint and takes its metrics and checkpoints through `ray.train`. The driver that starts
these workers is `neoxray.platform.train.driver`."""

from __future__ import annotations

import contextlib

from neoxray.platform.checkpoint import checkpoint_dir_name
from neoxray.platform.train.worker import Reporter, run_worker


class RayReporter(Reporter):
    """Metrics and checkpoints through `ray.train.report` (a barrier all workers call every step)."""

    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(None)

    def report(self, metrics, checkpoint_dir=None):
        import ray.train

        clean = {k: v for k, v in metrics.items() if v is not None}
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(
            clean, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(metrics["step"]) if ckpt else None
        )


def ray_train_loop(payload: dict) -> None:
    """The `train_loop_per_worker` of the driver's TorchTrainer: payload = {"config": run config dict, "run_dir"}."""
    from neoxray.platform.train.config import from_dict

    run_worker(from_dict(payload["config"]), payload["run_dir"], RayReporter())
