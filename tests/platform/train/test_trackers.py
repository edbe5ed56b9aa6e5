"""Experiment trackers (issue 18): a run with `logging.wandb` (offline, as `WANDB_MODE` says) and `logging.mlflow`
(its default SQLite store in the run directory) sends them what metrics.jsonl holds, the config and a summary;
read back with MLflow's own client and from W&B's offline run file, they equal metrics.jsonl, and a resumed run
continues the same tracker runs. A tracker that cannot be reached is one warning each, and the run trains on."""

from __future__ import annotations

import json
import os

import pytest

from neoxray.platform.train.distributed import free_port
from tests.platform.train.conftest import records, train
from tests.support.wandb_files import read_run

pytestmark = pytest.mark.e2e  # `neoxray train --no-ray` processes

TRACKERS = ["logging.wandb.enabled=true", "logging.wandb.project=neoxray-test", "logging.mlflow.enabled=true"]


def mlflow_run(run_dir):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("neoxray")
    (run,) = client.search_runs([exp.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    return run, history


def test_wandb_offline_and_mlflow_receive_what_metrics_jsonl_holds_and_a_resume_continues_them(prepared, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    train(prepared, run_dir, "name=tracked", "train.steps=3", "checkpoint.every=2", *TRACKERS, env=env)
    train(prepared, run_dir, "name=tracked", "train.steps=4", "checkpoint.every=2", *TRACKERS, env=env)  # resumed
    want = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    assert sorted(want) == [1, 2, 3, 4]

    run, history = mlflow_run(run_dir)  # one MLflow run: the resume continued it
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert {s: history[s] for s in want} == pytest.approx(want, rel=1e-6)
    assert run.data.params["train.steps"] == "3" and run.data.params["optimizer.lr"] == "0.001"  # the first start's
    assert run.data.metrics["final_loss"] == pytest.approx(want[4], rel=1e-6) and run.data.metrics["steps"] == 4
    assert run.data.tags["neoxray.newest_checkpoint"].endswith("checkpoint-step-0000004")

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per process, the same W&B run id: `wandb sync` joins them
    runs = [read_run(f) for f in files]
    assert runs[0]["id"] == runs[1]["id"] == json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert runs[0]["name"] == "tracked" and runs[0]["project"] == "neoxray-test"
    got = {row["step"]: row["loss"] for run in runs for row in run["history"] if "loss" in row}
    assert got == pytest.approx(want, rel=1e-6)  # step 3, trained again after the resume, with its new loss
    assert runs[1]["config"]["train"]["steps"] == 4 and runs[1]["config"]["optimizer"]["lr"] == 0.001
    assert runs[1]["summary"]["final_loss"] == pytest.approx(want[4], rel=1e-6) and runs[1]["summary"]["steps"] == 4


def test_trackers_that_cannot_be_reached_are_one_warning_each_and_the_run_trains_on(prepared, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_BASE_URL": nowhere, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    env.pop("WANDB_API_KEY", None)
    run_dir = tmp_path / "run"
    proc = train(prepared, run_dir, "train.steps=2", *TRACKERS, f"logging.mlflow.tracking_uri={nowhere}", env=env)
    warnings = [line for line in proc.stderr.splitlines() if "warning: logging." in line]
    assert len(warnings) == 2, proc.stderr[-3000:]
    assert any("logging.wandb:" in w for w in warnings) and any("logging.mlflow:" in w for w in warnings)
    assert "Traceback" not in proc.stderr
    assert sorted(r["step"] for r in records(run_dir) if "loss" in r) == [1, 2]
