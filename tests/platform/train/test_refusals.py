"""Training refuses state that does not fit, before it runs, and says so in one line: another architecture's
checkpoint, a damaged checkpoint (skipped, named, set aside; the run resumes from the newest intact one), a
non-finite loss (the run stops before a checkpoint of it exists), data that does not fit the model, a finished
run started again. User errors raised inside Ray Train workers end the run at once; they are never retried.
Each test here failed on the code before these checks existed (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import SAMPLE, run_cli
from tests.platform.train.conftest import (
    SMALL,
    cfg_for,
    copy_of,
    flip_a_byte,
    losses,
    one_error_line,
    plan_here,
    records,
    train,
    tree,
)

pytestmark = pytest.mark.e2e  # training runs in real processes and on the session's Ray cluster


def test_another_architectures_checkpoint_is_refused_touching_nothing(prepared, base_run, tmp_path):
    run = copy_of(base_run, tmp_path)
    before = tree(run)
    proc = train(prepared, run, "train.steps=8", "model.preset=tiny-seq", check=False)  # same shapes, other model
    one_error_line(proc, "checkpoint-step-0000004", "parallel_residual True vs False", "rotary_pct 0.25 vs 1.0")
    assert tree(run) == before


def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_newest_intact_one(prepared, base_run, tmp_path):
    run = copy_of(base_run, tmp_path)
    shard = next((run / "checkpoint-step-0000004").glob("shard-*.safetensors"))
    data = flip_a_byte(shard)  # a flipped byte in the Adam state or the weights: same size, other content
    proc = train(prepared, run, "train.steps=6")
    assert "checkpoint-step-0000004 is damaged" in proc.stderr and shard.name in proc.stderr
    assert (run / "damaged-checkpoint-step-0000004" / shard.name).read_bytes() == bytes(data)  # kept, not deleted
    ref = losses(base_run)
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4):  # redone from the intact step-2 checkpoint: exactly the original run's steps
        assert abs(got[step] - ref[step]) <= 1e-5 * ref[step], step
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == sorted(set(steps)), "metrics.jsonl holds a step twice after the resume"
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [2]


def test_a_non_finite_loss_stops_the_run_before_any_checkpoint_of_it(prepared, tmp_path):
    """Step 1's update (lr 1e20) already blows the weights up: step 2's loss, their first forward, is NaN. The
    checkpoint of step 1 holds those weights, so it is set aside (kept, never resumed) and the stop names no
    newest checkpoint (before: it named checkpoint-step-0000001, and resuming from it failed again)."""
    run = tmp_path / "run"
    proc = train(
        prepared,
        run,
        "train.steps=6",
        "schedule.warmup_steps=0",
        "checkpoint.every=1",
        "optimizer.lr=1e20",
        "optimizer.min_lr=0",
        "optimizer.clip_grad=0",
        check=False,
    )
    line = one_error_line(proc, "step 2", "loss is nan", "newest checkpoint: none", "diverged-checkpoint-step-0000001")
    assert "stopped before writing a checkpoint" in line
    assert sorted(p.name for p in run.glob("checkpoint-step-*")) == []
    assert (run / "diverged-checkpoint-step-0000001" / "meta.json").exists()  # set aside, not deleted


def test_export_refuses_non_finite_weights(base_run, tmp_path):
    ckpt = copy_of(base_run, tmp_path) / "checkpoint-step-0000004"
    shard = next(ckpt.glob("shard-*.safetensors"))
    tensors = load_file(shard)
    tensors["model/embed_in.weight"][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"tp_dims": "{}"})
    meta = json.loads((ckpt / "meta.json").read_text())  # a consistent checkpoint of a bad state
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    meta["files"][shard.name] = {"bytes": shard.stat().st_size, "sha256": digest}
    for entry in meta["shards"]:
        entry.update(bytes=shard.stat().st_size, sha256=digest)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    proc = run_cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), check=False)
    one_error_line(proc, "embed_in.weight", "non-finite")
    assert not (tmp_path / "hf").exists()


def test_a_finished_run_started_again_with_fewer_steps_says_so(prepared, base_run, tmp_path):
    run = copy_of(base_run, tmp_path)
    before = tree(run)
    # the driver's plan, in this process (the architecture refusal above shows one in a fresh process)
    assert "already at step 4 >= train.steps 2" in plan_here(prepared, run, "train.steps=2")
    assert tree(run) == before


def test_a_checkpoint_removed_by_hand_leaves_the_run_resumable_with_each_step_once_in_the_metrics(
    prepared, base_run, tmp_path
):
    run = copy_of(base_run, tmp_path)
    shutil.rmtree(run / "checkpoint-step-0000004")  # by hand, or as if the run had died after logging steps 3, 4
    train(prepared, run, "train.steps=5")
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [2]
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    got, ref = losses(run), losses(base_run)
    assert all(abs(got[s] - ref[s]) <= 1e-5 * ref[s] for s in (3, 4))  # redone from step 2: the same steps


def test_a_shipped_config_runs_a_short_smoke_run(prepared, tmp_path):
    """configs/tiny-cpu.yaml warms up for 10 steps: a 4-step run shortens the warmup, with a warning."""
    proc = run_cli(
        "train",
        "--no-ray",
        "--config",
        "configs/tiny-cpu.yaml",
        "--run-dir",
        str(tmp_path / "run"),
        f"data.path={prepared}",
        "train.steps=4",
        "train.seq_len=32",
        "model.overrides.vocab_size=1024",
        "parallel.data=1",
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "train.global_batch=4",
    )
    assert "warmup (10 steps) is longer than the run's decay (4 steps); shortened" in proc.stderr
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def mismatched(tmp_path_factory, ray_local):
    """Datasets that do not fit the tiny model: tokenized with a 5,000-token vocabulary (tiny has 4,096 rows),
    and one without a validation split."""
    from neoxray.pipelines.prepare import prepare
    from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files
    from tests.pipelines.conftest import pile_line, sample_docs

    root = tmp_path_factory.mktemp("mismatch")
    src = root / "docs.jsonl"
    src.write_text("".join(pile_line(t, c) for t, c in sample_docs()[:300]))
    train_tokenizer_from_files([str(SAMPLE)], 5000, str(root / "tok5k"))
    prepare([str(src)], str(root / "tok5k"), 32, str(root / "big-vocab"), workers=1, progress=False)
    prepare([str(src)], str(root / "tok5k"), 32, str(root / "no-val"), workers=1, val_fraction=0.0, progress=False)
    return root


@pytest.mark.parametrize(
    "data, extra, needles",
    [
        ("big-vocab", [], ["5,000-token vocabulary", "1,024 rows"]),
        (
            "big-vocab",
            ["model.overrides.vocab_size=5120", "train.seq_len=16"],
            ["rows hold 32 + 1 tokens", "train.seq_len is 16"],
        ),
        ("no-val", ["model.overrides.vocab_size=5120", "eval.every=1"], ["no validation rows", "eval.every=1"]),
    ],
    ids=["vocabulary", "row-length", "empty-validation"],
)
def test_data_that_does_not_fit_is_refused_before_any_worker_starts(
    mismatched, ray_local, tmp_path, data, extra, needles
):
    from neoxray.errors import NeoxrayError
    from neoxray.platform.train.driver import run_train

    cfg = cfg_for(
        mismatched / data,
        "mismatch",
        (1, 2, 1),
        ["model.overrides.max_seq_len=32", "train.steps=2", "eval.every=0", *extra],
    )
    t0 = time.monotonic()
    with pytest.raises(NeoxrayError) as e:
        run_train(cfg, run_dir=str(tmp_path / "run"))
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert not (tmp_path / "run").exists(), "nothing is written for a refused run"
    assert time.monotonic() - t0 < 30


def test_a_manifest_that_lies_about_the_row_length_is_refused_before_the_run_directory_is_touched(
    prepared, ray_local, tmp_path
):
    """manifest.json edited to say rows of 16 + 1 tokens while its files hold 32 + 1: the driver reads the files'
    own row length (before: the workers found out, after the run directory was made, and the message repeated
    the manifest's figure)."""
    from neoxray.errors import NeoxrayError
    from neoxray.platform.train.driver import run_train

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(seq_len=16, row_length=17)
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = cfg_for(data, "liar", (1, 1, 1), ["train.seq_len=16", "train.steps=2", "eval.every=0"])
    with pytest.raises(NeoxrayError) as e:
        run_train(cfg, run_dir=str(tmp_path / "run"))
    assert "rows of 33 tokens" in str(e.value) and "manifest.json" in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists(), "nothing is written for a refused run"


def test_a_user_error_in_a_worker_ends_the_run_at_once_as_one_line(prepared, ray_local, tmp_path):
    """A NeoxrayError raised inside Ray Train workers (here: a non-finite loss at step 2) is not retried."""
    env_address = ray_local.get_runtime_context().gcs_address
    proc = run_cli(
        "train",
        "--run-dir",
        str(tmp_path / "run"),
        *SMALL,
        f"data.path={prepared}",
        "train.steps=6",
        "parallel.data=2",
        "train.device=cpu",
        "schedule.warmup_steps=0",
        "optimizer.lr=1e20",
        "optimizer.min_lr=0",
        "optimizer.clip_grad=0",
        "--max-failures",
        "2",
        check=False,
        env={**os.environ, "RAY_ADDRESS": env_address},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1].startswith("neoxray: error: step 2: loss is nan")
    assert "restarting it from the newest checkpoint" not in proc.stderr  # no retry of a user error
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == [1]
