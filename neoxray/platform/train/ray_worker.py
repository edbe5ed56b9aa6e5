"""Per-worker code under Ray Train: the function every Ray Train worker runs, and the `Reporter` that hands the
per-step metrics to `ray.train.report` (the Ray dashboard's view of the run; a barrier every worker calls).
Checkpoints do not go through Ray: workers write them into the run directory themselves and the driver decides
where a run resumes, so neoxray always finds its own checkpoints. The driver is `neoxray.platform.train.driver`."""

from __future__ import annotations

from neoxray.platform.train.run_plan import RunPlan
from neoxray.platform.train.worker import Reporter, run_worker


class RayReporter(Reporter):
    """Metrics through `ray.train.report` (a barrier all workers call every step)."""

    def report(self, metrics):
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if v is not None})


def ray_train_loop(payload: dict) -> None:
    """The `train_loop_per_worker` of the driver's TorchTrainer: payload = `RunPlan.to_payload()` plus "console":
    whether rank 0 prints its progress (the driver follows metrics.jsonl instead, unless --verbose)."""
    run_worker(RunPlan.from_payload(payload), RayReporter(), console=payload.get("console", False))
