"""A run directory on object storage (`--run-dir s3://...`, issue 18) against a real S3-protocol server on
127.0.0.1 (moto's server mode): checkpoints land in the bucket complete (meta.json last, every file with its
size and checksum), nothing under the working directory; a resume needs nothing but the bucket (every local
staging folder deleted), under another layout too, and equals one uninterrupted process; an incomplete
checkpoint on the store is set aside, a damaged one is named, a missing bucket and a failed upload are one
line; export reads and writes the bucket, and a model in it is read through one node-local cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neoxray.platform.run_store import mirror_dir
from tests.conftest import run_cli
from tests.platform.train.conftest import SMALL, STEPS, assert_same, cfg_for, one_error_line, train
from tests.platform.train.test_evaluation import TASK, local_task
from tests.support.s3 import s3_server  # the `s3` fixture: tests/conftest.py

pytestmark = pytest.mark.e2e  # training runs against a real S3-protocol server


def store_losses(s3, bucket: str, prefix: str) -> dict[int, float]:
    body = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
    return {r["step"]: r["loss"] for r in map(json.loads, body.splitlines()) if "loss" in r}


def store_records(s3, bucket: str, prefix: str) -> list[dict]:
    body = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
    return [json.loads(x) for x in body.splitlines()]


def assert_complete_checkpoints(s3, bucket: str, prefix: str, steps: list[int]) -> None:
    keys = s3.keys(bucket, prefix + "/")
    names = sorted({k[len(prefix) + 1 :].split("/")[0] for k in keys if "/checkpoint-step-" in "/" + k})
    assert names == [f"checkpoint-step-{s:07d}" for s in steps], names
    for name in names:
        meta = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{name}/meta.json")["Body"].read())
        for file, entry in meta["files"].items():
            assert keys.get(f"{prefix}/{name}/{file}") == entry["bytes"] and len(entry["sha256"]) == 64, file


def check_a_rank_downloads_only_what_it_reads(uri: str, name: str, mirror: Path) -> None:
    """A (2,1,2) checkpoint read as a resumed rank reads it: its index from the shards' headers (ranged reads),
    then one tensor of pipeline stage 0: one shard of the two comes down, checked."""
    from neoxray.platform.checkpoint import CheckpointSource
    from neoxray.platform.run_store import RunStore, StoreCheckpointFiles

    local = mirror / name
    source = CheckpointSource(local, files=StoreCheckpointFiles(RunStore(uri), name, local))
    shards = [e["file"] for e in source.meta["shards"]]
    assert len(shards) == 2 and all(source.keys())
    embed = source.get("model/embed_in.weight", None, 0, 1)
    assert embed.shape[0] == 1024
    held = sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    assert held == ["meta.json", shards[0]] or held == ["meta.json", shards[1]], held


def test_a_run_on_s3_resumes_from_the_bucket_alone_under_another_layout(
    prepared, reference, ray_local, s3, tmp_path, monkeypatch
):
    from neoxray.platform.train.driver import run_train

    uri = s3.bucket("runs") + "/tiny/run"
    cwd, staging = tmp_path / "cwd", tmp_path / "staging"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    extra = ["checkpoint.every=2", "checkpoint.keep=0", f"checkpoint.staging_dir={staging}"]
    evals = [f"eval.tasks=[{TASK}]", f"eval.include_path={local_task(tmp_path)}", "eval.limit=6"]
    run_train(cfg_for(prepared, "s3run", (2, 1, 2), ["train.steps=3", *extra, *evals]), run_dir=uri)
    assert_complete_checkpoints(s3, "runs", "tiny/run", [2, 3])
    # each checkpoint evaluated from the bucket beside training; the records beside the metrics; no pin left
    got = s3.client().get_object(Bucket="runs", Key="tiny/run/eval.jsonl")["Body"].read().decode().splitlines()
    assert sorted(json.loads(x)["step"] for x in got) == [2, 3] and all(TASK in json.loads(x)["eval"] for x in got)
    assert not [k for k in s3.keys("runs", "tiny/run/") if k.endswith("/.evaluation-pending")]
    assert {"tiny/run/config.yaml", "tiny/run/metrics.jsonl"} <= set(s3.keys("runs", "tiny/run/"))
    assert "tiny/run/.validate_storage_marker" in s3.keys("runs", "tiny/run/")  # Ray Train's state: there too
    assert sorted(store_losses(s3, "runs", "tiny/run")) == [1, 2, 3]
    assert list(cwd.iterdir()) == []  # nothing became a local folder named s3:
    check_a_rank_downloads_only_what_it_reads(uri, "checkpoint-step-0000003", tmp_path / "one-node")

    shutil.rmtree(staging)  # every node's staging gone: the bucket alone holds the run
    run_train(cfg_for(prepared, "s3run", (1, 2, 1), [f"train.steps={STEPS}", *extra]), run_dir=uri)
    assert [r["step"] for r in store_records(s3, "runs", "tiny/run") if r.get("event") == "resumed"] == [3]
    got = store_losses(s3, "runs", "tiny/run")
    assert sorted(got) == list(range(1, STEPS + 1))
    ref = {r["step"]: r["loss"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())}
    assert_same(got, ref, range(1, STEPS + 1))  # one uninterrupted process, from the bucket after step 3
    assert_complete_checkpoints(s3, "runs", "tiny/run", [2, 3, 4, STEPS])
    assert list(cwd.iterdir()) == []


def test_on_the_store_an_incomplete_checkpoint_is_set_aside_and_a_damaged_one_is_named(
    prepared, s3, tmp_path, cli_here, monkeypatch
):
    uri = s3.bucket("sets") + "/run"
    staging = tmp_path / "staging"
    env = {**os.environ, **s3.env}
    opts = [f"checkpoint.staging_dir={staging}", "checkpoint.keep=0"]
    train(prepared, uri, "train.steps=4", *opts, env=env)
    assert_complete_checkpoints(s3, "sets", "run", [2, 4])
    s3.client().delete_object(Bucket="sets", Key="run/checkpoint-step-0000004/meta.json")  # its upload "died"
    shutil.rmtree(staging)
    proc = train(prepared, uri, "train.steps=5", *opts, env=env)
    assert "set aside as incomplete-checkpoint-step-0000004" in proc.stderr
    assert [r["step"] for r in store_records(s3, "sets", "run") if r.get("event") == "resumed"] == [2]
    assert any(k.startswith("run/incomplete-checkpoint-step-0000004/") for k in s3.keys("sets", "run/"))

    # export from the bucket to the bucket; two processes read the model through one empty node cache at once
    cache = tmp_path / "cache"
    env = {**env, "NEOXRAY_MODEL_CACHE": str(cache)}
    out = run_cli("export", "--checkpoint", uri, "--out", "s3://sets/hf", env=env).stdout
    assert "checkpoint-step-0000005 to s3://sets/hf" in out
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= set(s3.keys("sets", "hf/"))
    score = [sys.executable, "-m", "neoxray.cli", "score", "--text", "def main(args):", "--json", "--model"]
    both = [subprocess.Popen([*score, "s3://sets/hf"], env=env, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in both]
    assert all(p.returncode == 0 for p in both) and outs[0] == outs[1]
    assert len(list(cache.glob("*/hf"))) == 1  # filled once (beside it: the checkpoint export read)
    monkeypatch.setenv("NEOXRAY_MODEL_CACHE", str(cache))
    from_run = json.loads(cli_here("score", "--text", "def main(args):", "--json", "--model", uri))
    assert from_run["tokens"] == outs[0]["tokens"]
    assert from_run["logprobs"][1:] == pytest.approx(outs[0]["logprobs"][1:], abs=1e-5)  # the checkpoint itself

    # the run's page: read from the bucket, written into it
    assert cli_here("report", uri).strip() == f"wrote {uri}/report.html"
    page = s3.client().get_object(Bucket="sets", Key="run/report.html")["Body"].read().decode()
    assert f"<td>{uri}</td>" in page and "checkpoint-step-0000005" in page and "data:image/png" in page

    shard = next(k for k in s3.keys("sets", "run/checkpoint-step-0000005/") if "shard-" in k)
    body = bytearray(s3.client().get_object(Bucket="sets", Key=shard)["Body"].read())
    body[-64] ^= 0xFF  # same size, other content
    s3.client().put_object(Bucket="sets", Key=shard, Body=bytes(body))
    shutil.rmtree(staging)
    one_error_line(train(prepared, uri, "train.steps=6", *opts, env=env, check=False), Path(shard).name, "damaged")


def test_a_missing_bucket_a_missing_model_and_a_failed_upload_are_one_line(prepared, tmp_path):
    with s3_server() as server:
        env = {**os.environ, **server.env}
        staging = tmp_path / "staging"
        proc = train(prepared, "s3://no-such-bucket/run", f"checkpoint.staging_dir={staging}", env=env, check=False)
        one_error_line(proc, "s3://no-such-bucket/run", "cannot write, list and delete")
        assert not staging.exists()  # refused before anything was written

        uri = server.bucket("flaky") + "/run"
        score = ("score", "--text", "x", "--model", "s3://flaky/no-model")
        one_error_line(run_cli(*score, env=env, check=False), "--model s3://flaky/no-model", "nothing there")
        metrics = mirror_dir(uri, str(staging)) / "metrics.jsonl"
        cmd = [sys.executable, "-m", "neoxray.cli", "train", "--no-ray", "--run-dir", uri]
        child = subprocess.Popen(
            [*cmd, *SMALL, f"data.path={prepared}", "train.steps=40", f"checkpoint.staging_dir={staging}"],
            env={**env, "NEOXRAY_STORE_ATTEMPTS": "2"},  # the default 5 take about 40 s
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        server.stop()  # the store goes away while the run trains
        out, err = child.communicate(timeout=300)
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    one_error_line(proc, f"{uri}/", "failed after 2 attempts")  # a checkpoint's file or the metrics, named


def test_a_kill_in_the_middle_of_an_upload_then_resume_equals_a_run_never_interrupted(prepared, s3, tmp_path):
    uri, staging = s3.bucket("killed") + "/run", tmp_path / "staging"
    data = s3.upload_dir(prepared, "s3://killed/data")  # the prepared dataset read from the bucket too
    opts = ["train.steps=12", "checkpoint.every=1", "checkpoint.keep=0"]
    cmd = [sys.executable, "-m", "neoxray.cli", "train", "--no-ray", "--run-dir", uri, *SMALL, f"data.path={data}"]
    cmd += [*opts, f"checkpoint.staging_dir={staging}"]

    def in_flight(after: int = 0) -> list[str]:
        """Checkpoints with files in the bucket but no meta.json (their upload is under way, or was cut), once
        `after` checkpoints are complete there."""
        keys = s3.keys("killed", "run/")
        names = {k.split("/")[1] for k in keys if k.startswith("run/checkpoint-step-")}
        if sum(k.endswith("/meta.json") and k.startswith("run/checkpoint-step-") for k in keys) < after:
            return []
        return [n for n in names if f"run/{n}/meta.json" not in keys]

    cut = []
    for _ in range(3):  # SIGKILL (the driver: with --no-ray, one process) the moment an upload is in flight,
        # with a few complete checkpoints before it: the resume starts from the newest of them
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while child.poll() is None and not in_flight(after=3):
            time.sleep(0.005)
        child.kill()
        child.communicate(timeout=60)
        cut = in_flight()  # still without meta.json after the kill: it was cut in the middle
        if cut:
            break
    assert cut, "no upload was caught in flight in three tries"
    proc = train(data, uri, *opts, f"checkpoint.staging_dir={staging}")  # the same node: its staging as left
    resumed = [r["step"] for r in store_records(s3, "killed", "run") if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0] >= 3, (resumed, proc.stderr[-2000:])
    assert "incomplete-checkpoint-step-" in "".join(s3.keys("killed", "run/"))  # the cut one, set aside

    reference = tmp_path / "reference"  # the same run, its data and run directory on a local disk, never interrupted
    train(prepared, reference, *opts)
    want = {r["step"]: r["loss"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())}
    got = store_losses(s3, "killed", "run")
    assert sorted(got) == list(range(1, 13)) and all(got[s] == want[s] for s in got), (got, want)  # bit-identical
