"""lm-evaluation-harness tasks on each new checkpoint while training goes on (`eval.tasks`).

The driver watches the run directory; each checkpoint that appears is evaluated by a Ray task of its own, with
`eval.resources` (a CPU, a GPU), running `neoxray eval`'s code (`neoxray.platform.eval`: lm-eval's tasks on
neoxray's inference engine) on that checkpoint. Training never waits for it. A result is written to
metrics.jsonl as {"step": N, "eval": {task: {metric: value}}}, to TensorBoard (eval/<task>/<metric>) and to
the Ray metrics `neoxray_eval_<metric>` (tagged by task). A checkpoint waiting for its evaluation is pinned
(`checkpoint.EVAL_PIN`) so that rotation (`checkpoint.keep`) does not delete it first. A failed evaluation is
reported as
{"step": N, "eval_error": "..."} and a line on the console, and never stops the run. When training ends the
driver waits for the evaluations still running (the last checkpoint's included).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
from pathlib import Path

from neoxray.platform.checkpoint import (
    CHECKPOINT_PREFIX,
    EVAL_PIN,
    checkpoint_dir_name,
    checkpoint_step,
    list_checkpoints,
    prune_checkpoints,
    read_meta,
)
from neoxray.platform.model_cache import forwarded_env
from neoxray.platform.run_store import EVAL_RECORDS
from neoxray.platform.train.report import parse_metrics


def evaluate_checkpoint(checkpoint: str, tasks: list[str], num_fewshot, limit, include_path) -> dict:
    """Run lm-eval `tasks` on one checkpoint in this process (no Ray of its own); {task: {metric: value}}."""
    from neoxray.platform.eval.run import EvalArgs, run_eval

    args = EvalArgs(
        model=checkpoint,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        include_path=[include_path] if include_path else [],
        bootstrap_iters=0,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the table is for people; the caller records the numbers
        results = run_eval(args)
    return scores(results)


def scores(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}}: the filter suffix dropped (`acc,none` -> `acc`), stderr
    and non-numbers left out."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if "stderr" in metric or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            name = re.sub(r"\W", "_", metric if flt in ("", "none") else f"{metric}_{flt}")
            out.setdefault(task, {})[name] = float(value)
    return out


class _LocalRun:
    """A run directory every process sees: checkpoints, pins and records (appended to metrics.jsonl) in it."""

    def __init__(self, run_dir: Path, metrics_file: str | None):
        self.run_dir, self.metrics_file = Path(run_dir), metrics_file
        self.tensorboard = self.run_dir / "tensorboard" / "eval"

    def checkpoints(self, seen: set[int]) -> list[tuple[int, str]]:
        out = []
        for ckpt in list_checkpoints(self.run_dir):
            try:
                out.append((int(read_meta(ckpt)["step"]), str(ckpt)))
            except Exception:  # a checkpoint being renamed into place, or rotated away: the next poll sees it
                continue
        return [(step, where) for step, where in out if step not in seen]

    def unpin(self, step: int) -> None:
        (self.run_dir / checkpoint_dir_name(step) / EVAL_PIN).unlink(missing_ok=True)

    def release(self, keep: int) -> None:
        for ckpt in list_checkpoints(self.run_dir):  # nothing is left to evaluate: rotation may have them now
            (ckpt / EVAL_PIN).unlink(missing_ok=True)
        prune_checkpoints(self.run_dir, keep)

    def append(self, record: dict) -> None:
        """One line appended to metrics.jsonl (a single write in append mode, beside rank 0's)."""
        if not self.metrics_file:
            return
        line = json.dumps({"time": time.time(), **record}) + "\n"
        fd = os.open(self.run_dir / self.metrics_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        path = self.run_dir / self.metrics_file if self.metrics_file else None
        return parse_metrics(path.read_text(encoding="utf-8")) if path is not None and path.exists() else []

    def published(self) -> None:
        pass


class _StoreRun:
    """A run on object storage (`neoxray.platform.run_store`): complete checkpoints read there (each evaluation
    reads its checkpoint through its node's model cache), pins deleted there, records kept in `EVAL_RECORDS`
    beside metrics.jsonl (rank 0 owns that object), TensorBoard's evaluation events copied up from the driver's
    staging folder."""

    def __init__(self, store, local: Path, metrics_file: str | None):
        from neoxray.platform.run_store import RunFiles

        self.store, self.local, self.metrics_file = store, Path(local), metrics_file
        self.local.mkdir(parents=True, exist_ok=True)
        self.tensorboard = self.local / "tensorboard" / "eval"
        self.lines = (store.read_text(EVAL_RECORDS) or "").splitlines(keepends=True)
        self.files = RunFiles(store, self.local, ["tensorboard"])

    def checkpoints(self, seen: set[int]) -> list[tuple[int, str]]:
        from neoxray.platform.run_store import store_checkpoints

        names = [n for n in self.store.names() if n.startswith(CHECKPOINT_PREFIX)]
        if all(checkpoint_step(Path(n)) in seen for n in names):
            return []
        complete = [
            (int(meta["step"]), self.store.path(name)) for name, meta, p in store_checkpoints(self.store) if p is None
        ]
        return sorted((step, where) for step, where in complete if step not in seen)

    def unpin(self, step: int) -> None:
        self.store.delete(f"{checkpoint_dir_name(step)}/{EVAL_PIN}")

    def release(self, keep: int) -> None:
        from neoxray.platform.run_store import rotate_store, store_checkpoints

        for name, _, problem in store_checkpoints(self.store):
            if problem is None:
                self.store.delete(f"{name}/{EVAL_PIN}")
        rotate_store(self.store, keep)

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps({"time": time.time(), **record}) + "\n")
        path = self.local / EVAL_RECORDS
        path.write_text("".join(self.lines), encoding="utf-8")
        self.store.upload(path, EVAL_RECORDS)

    def records(self) -> list[dict]:
        text = (self.store.read_text(self.metrics_file) or "") if self.metrics_file else ""
        return parse_metrics(text) + parse_metrics("".join(self.lines))

    def published(self) -> None:
        self.files.sync()


class CheckpointEvaluator:
    """Evaluates each new checkpoint of `run_dir` on Ray (see the module docstring). `poll()` submits and
    collects without blocking; `finish()` waits for what is left. `store`: the run's `RunStore` when it lives on
    object storage (`run_dir` is then the driver's staging folder)."""

    def __init__(self, cfg, run_dir: Path, ray, say, store=None):
        self.cfg, self.ray, self.say = cfg, ray, say
        name = cfg.logging.metrics_file
        self.run = _LocalRun(run_dir, name) if store is None else _StoreRun(store, run_dir, name)
        ev = cfg.eval
        resources = dict(ev.resources)
        options = {"num_cpus": resources.pop("CPU", 1), "num_gpus": resources.pop("GPU", 0), "max_retries": 0}
        if resources:
            options["resources"] = resources
        env = {"DS_ACCELERATOR": "cpu"} if not options["num_gpus"] else {}
        env.update(forwarded_env())  # the store, the model cache
        options["runtime_env"] = {"env_vars": {"PYTHONUNBUFFERED": "1", **env}}
        self._remote = ray.remote(evaluate_checkpoint).options(**options)
        self.pending: dict = {}  # ObjectRef -> step
        self.seen: set[int] = {r["step"] for r in self.run.records() if "eval" in r or "eval_error" in r}
        self._writer = None
        self._gauges: dict = {}

    def poll(self) -> None:
        for step, where in self.run.checkpoints(self.seen):
            self.seen.add(step)
            ev = self.cfg.eval
            ref = self._remote.remote(where, ev.tasks, ev.num_fewshot, ev.limit, ev.include_path)
            self.pending[ref] = step
            self.say(f"[neoxray] evaluating checkpoint-step-{step:07d} on {', '.join(ev.tasks)} beside the run")
        if self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in ready:
                self._collect(ref)

    def finish(self, timeout_s: float = 3600.0) -> None:
        """Submit the last checkpoints and wait for every evaluation (up to `timeout_s` in all)."""
        self.poll()
        deadline = time.monotonic() + timeout_s
        if self.pending:
            self.say(f"[neoxray] waiting for {len(self.pending)} evaluation(s) of the run's checkpoints")
        while self.pending and time.monotonic() < deadline:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                self._collect(ref)
        for ref, step in list(self.pending.items()):
            self.ray.cancel(ref, force=True)
            self.run.unpin(step)
            self.run.append({"step": step, "eval_error": f"not finished within {timeout_s:g} s of the run's end"})
        self.pending.clear()
        self.run.release(self.cfg.checkpoint.keep)
        if self._writer is not None:
            self._writer.close()
            self.run.published()

    def _collect(self, ref) -> None:
        from neoxray.errors import find_user_error

        step = self.pending.pop(ref)
        self.run.unpin(step)
        try:
            result = self.ray.get(ref)
        except Exception as e:  # an evaluation that failed is reported; training goes on
            user = find_user_error(e)
            text = str(user) if user is not None else f"{type(e).__name__}: {str(e).strip().splitlines()[0:1]}"
            self.say(f"[neoxray] the evaluation of step {step} failed: {text}")
            self.run.append({"step": step, "eval_error": text})
            return
        self.run.append({"step": step, "eval": result})
        line = "; ".join(f"{t} " + ", ".join(f"{m} {v:.4f}" for m, v in ms.items()) for t, ms in result.items())
        self.say(f"[neoxray] eval at step {step}: {line}")
        self._publish(step, result)

    def _publish(self, step: int, result: dict) -> None:
        """TensorBoard scalars and Ray gauges of one evaluation."""
        if self.cfg.logging.tensorboard:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.run.tensorboard))
            for task, metrics in result.items():
                for metric, value in metrics.items():
                    self._writer.add_scalar(f"eval/{task}/{metric}", value, step)
            self._writer.flush()
            self.run.published()
        if self.cfg.logging.ray_metrics:
            from ray.util.metrics import Gauge

            for task, metrics in result.items():
                for metric, value in metrics.items():
                    if metric not in self._gauges:
                        self._gauges[metric] = Gauge(
                            f"neoxray_eval_{metric}",
                            description=f"lm-eval {metric} of the newest evaluated checkpoint",
                            tag_keys=("run", "task"),
                        )
                    self._gauges[metric].set(value, tags={"run": self.cfg.name, "task": task})
