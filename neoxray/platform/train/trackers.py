"""Experiment trackers: Weights & Biases (`logging.wandb`) and MLflow (`logging.mlflow`), so that a run is
watched from anywhere, not only from the node that started it. Rank 0's metrics sink (`metrics.MetricsSink`)
hands each tracker what it writes to metrics.jsonl, the run's config once (W&B's config, MLflow's parameters,
flattened to dotted keys), and at the end a summary (final losses, steps, wall time, newest checkpoint).

A resumed run continues the same tracker run: the ids are kept in the run directory (`trackers.json`, copied
to the store with the run's other files). Steps a resumed run trains again are sent again: W&B plots them
against the `step` metric, MLflow keeps both values of a step in its history.

A tracker is never a reason for a run to stop: one that cannot be started, or fails later (no API key, an
unreachable server, a missing package), is one warning line on stderr, and the run trains on without it."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

IDS_FILE = "trackers.json"
ENV_PREFIXES = ("WANDB_", "MLFLOW_")
"""Environment variables the driver passes on to its workers for the trackers (mode, keys, servers)."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class _Ids:
    """The tracker run ids of this run directory (`trackers.json`)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / IDS_FILE
        try:
            self.ids = json.loads(self.path.read_text()) if self.path.exists() else {}
        except ValueError:
            self.ids = {}

    def get(self, name: str) -> str | None:
        return self.ids.get(name)

    def set(self, name: str, value: str) -> None:
        self.ids[name] = value
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.ids, indent=1))
        os.replace(tmp, self.path)


class WandbTracker:
    def __init__(self, section, config: dict, run_dir: Path, name: str, ids: _Ids):
        import wandb

        run_id = ids.get("wandb") or secrets.token_hex(4)
        self.run = wandb.init(
            project=section.project,
            entity=section.entity,
            name=section.run_name or name,
            id=run_id,
            resume="allow",
            config=config,
            dir=str(run_dir),
            settings=wandb.Settings(console="off", silent=True),
        )
        ids.set("wandb", run_id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # a resumed run's repeated steps plot where they belong

    def log(self, record: dict) -> None:
        self.run.log(_flat({k: v for k, v in record.items() if k != "time"}))

    def finish(self, summary: dict, ok: bool) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker:
    FLUSH_S = 5.0

    def __init__(self, section, config: dict, run_dir: Path, name: str, ids: _Ids):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # an unreachable server: a warning soon
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow import MlflowClient

        uri = section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = ids.get("mlflow")
        if self.run_id is None:
            exp = client.get_experiment_by_name(section.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(section.experiment)
            run = client.create_run(exp_id, run_name=section.run_name or name, tags={"neoxray.run": name})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                client.log_batch(self.run_id, params=params[i : i + 100])
            ids.set("mlflow", self.run_id)
        else:
            client.update_run(self.run_id, status="RUNNING")
        self.pending: list = []
        self.flushed = time.monotonic()

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        step = int(record.get("step", 0))
        ms = int(record.get("time", time.time()) * 1000)
        flat = _numbers(_flat({k: v for k, v in record.items() if k not in ("time", "step")}))
        self.pending += [Metric(k.replace("@", "_at_"), v, ms, step) for k, v in flat.items()]
        if time.monotonic() - self.flushed >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.flushed = time.monotonic()

    def finish(self, summary: dict, ok: bool) -> None:
        self.flush()
        from mlflow.entities import Metric

        ms, step = int(time.time() * 1000), int(summary.get("steps", 0))
        metrics = [Metric(k, v, ms, step) for k, v in _numbers(summary).items()]
        tags = {f"neoxray.{k}": str(v) for k, v in summary.items() if isinstance(v, str)}
        self.client.log_batch(self.run_id, metrics=metrics)
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


KINDS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers a run's config turns on, on rank 0. Every call is guarded: a tracker that raises is warned
    about once (naming its config key) and dropped."""

    def __init__(self, logging_section, config: dict, run_dir, name: str, warn=None):
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.active: dict[str, object] = {}
        self.last: dict = {}
        self.started = time.monotonic()
        ids = _Ids(Path(run_dir))
        for key, cls in KINDS.items():
            section = getattr(logging_section, key)
            if section.enabled:
                self._guard(key, lambda k=key, c=cls, s=section: self._start(k, c, s, config, Path(run_dir), name, ids))

    def _start(self, key, cls, section, config, run_dir, name, ids) -> None:
        self.active[key] = cls(section, config, run_dir, name, ids)

    def _guard(self, key: str, fn) -> None:
        try:
            fn()
        except Exception as e:
            self.active.pop(key, None)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            self.warn(
                f"[neoxray] warning: logging.{key}: {type(e).__name__}: {first}; the run goes on without it "
                f"(metrics.jsonl has every step)"
            )

    def log(self, record: dict) -> None:
        if "loss" in record:
            self.last.update({k: record[k] for k in ("step", "loss", "val_loss", "tokens_per_s") if k in record})
        for key, tracker in list(self.active.items()):
            self._guard(key, lambda t=tracker: t.log(record))

    def finish(self, ok: bool = True, newest_checkpoint: str | None = None) -> None:
        summary = {f"final_{k}": v for k, v in self.last.items() if k != "step" and v is not None}
        summary.update(steps=int(self.last.get("step", 0)), wall_time_s=round(time.monotonic() - self.started, 1))
        if newest_checkpoint:
            summary["newest_checkpoint"] = str(newest_checkpoint)
        for key, tracker in list(self.active.items()):
            self._guard(key, lambda t=tracker: t.finish(summary, ok))
        self.active.clear()
