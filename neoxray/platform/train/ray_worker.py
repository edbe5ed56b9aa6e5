"""Per-worker code under Ray Train: the function every Ray Train worker runs, and the `Reporter` that hands the
per-step metrics to `ray.train.report` (the Ray dashboard's view of the run; a barrier every worker calls).
Checkpoints do not go through Ray: workers write them into the run directory themselves and the driver decides
where a run resumes, so neoxray always finds its own checkpoints. The driver is `neoxray.platform.train.driver`."""

from __future__ import annotations

from neoxray.platform.train.run_plan import RunPlan
from neoxray.platform.train.worker import Reporter, run_worker


class RayReporter(Reporter):
    """Metrics through `ray.train.report` (a barrier all workers call) every `every` steps and at `last_step`.

    Not every step: a report goes on a queue of one that Ray Train's controller empties once per poll (every 2 s),
    so reporting every step held each step after the first for up to 2 s. The console follows `logging.every`
    too; metrics.jsonl, TensorBoard and the Ray gauges get every step from rank 0's sink."""

    def __init__(self, every: int, last_step: int):
        self.every, self.last_step = max(1, every), last_step

    def report(self, metrics):
        step = metrics["step"]
        if step % self.every and step != self.last_step:
            return
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if v is not None})


def ray_train_loop(payload: dict) -> None:
    """The `train_loop_per_worker` of the driver's TorchTrainer: payload = `RunPlan.to_payload()` plus "console":
    whether rank 0 prints its progress (the driver follows metrics.jsonl instead, unless --verbose)."""
    plan = RunPlan.from_payload(payload)
    reporter = RayReporter(plan.cfg.logging.every, plan.cfg.train.steps)
    run_worker(plan, reporter, console=payload.get("console", False))
