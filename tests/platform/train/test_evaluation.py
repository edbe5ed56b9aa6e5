"""lm-eval tasks on each new checkpoint while training goes on (`eval.tasks`): results for the expected steps
in metrics.jsonl, equal to `neoxray eval` of the same checkpoint, the training itself unchanged; a failing
evaluation is reported and the run finishes."""

from __future__ import annotations

import json

from tests.conftest import ROOT, run_cli
from tests.platform.train.conftest import STEPS, assert_same, cfg_for, losses

TASK = "neoxray_test_lastword"


def local_task(tmp_path):
    """The test suite's last-word task with its data file's absolute path (Ray tasks run elsewhere)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = ROOT / "tests/data/eval/data/lastword.jsonl"
    text = (ROOT / f"tests/data/eval/tasks/{TASK}.yaml").read_text()
    (folder / f"{TASK}.yaml").write_text(text.replace("tests/data/eval/data/lastword.jsonl", str(data)))
    return folder


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_are_evaluated_beside_training_without_changing_it(prepared, reference, ray_local, tmp_path):
    from neoxray.platform.train.driver import run_train

    tasks = local_task(tmp_path)
    run_dir = tmp_path / "run"
    extra = ["checkpoint.every=2", f"eval.tasks=[{TASK}]", f"eval.include_path={tasks}", "eval.limit=6"]
    run_train(cfg_for(prepared, "evaluated", (1, 1, 1), extra), run_dir=str(run_dir))
    evals = {r["step"]: r["eval"] for r in records(run_dir) if "eval" in r}
    assert sorted(evals) == [2, 4, STEPS]  # every checkpoint, the last one included
    for result in evals.values():
        assert set(result) == {TASK} and {"acc", "perplexity"} <= set(result[TASK])
    assert_same(losses(run_dir), losses(reference), range(1, STEPS + 1))  # training did not wait or change

    cli = json.loads(
        run_cli(
            "eval",
            "--model",
            str(run_dir / "checkpoint-step-0000004"),
            "--tasks",
            TASK,
            "--include-path",
            str(tasks),
            "--limit",
            "6",
            "--bootstrap-iters",
            "0",
            "--json",
        ).stdout
    )
    want = cli["results"][TASK]
    assert evals[4][TASK]["acc"] == want["acc,none"]
    assert abs(evals[4][TASK]["perplexity"] - want["perplexity,none"]) <= 1e-6 * want["perplexity,none"]


def test_a_failing_evaluation_is_reported_and_training_finishes(prepared, ray_local, tmp_path):
    from neoxray.platform.train.driver import run_train

    run_dir = tmp_path / "run"
    extra = ["train.steps=2", "checkpoint.every=2", "eval.tasks=[no_such_task_anywhere]", "eval.every=0"]
    run_train(cfg_for(prepared, "failing-eval", (1, 1, 1), extra), run_dir=str(run_dir))
    assert sorted(losses(run_dir)) == [1, 2]
    errors = [r for r in records(run_dir) if "eval_error" in r]
    assert [r["step"] for r in errors] == [2] and "no_such_task_anywhere" in errors[0]["eval_error"]
