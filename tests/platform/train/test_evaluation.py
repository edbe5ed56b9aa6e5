"""lm-eval tasks on each new checkpoint while training goes on (`eval.tasks`): results for the expected steps
in metrics.jsonl, equal to `neoxray eval` of the same checkpoint, the training itself unchanged; a failing
evaluation is reported and the run finishes."""

from __future__ import annotations

import json

from tests.conftest import ROOT, run_cli
from tests.platform.train.conftest import STEPS, assert_same, cfg_for, copy_of, losses

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


def test_a_failing_evaluation_is_reported_and_never_stops_the_run(prepared, base_run, ray_local, tmp_path):
    # the driver's evaluator (what run_train polls beside training and finishes after it) on a run's
    # checkpoints, with a task lm-eval does not know: each failure is a record and a console line, never a raise
    from neoxray.platform.train.evaluation import CheckpointEvaluator

    run_dir = copy_of(base_run, tmp_path)
    cfg = cfg_for(prepared, "failing-eval", extra=["eval.tasks=[no_such_task_anywhere]"])
    said: list[str] = []
    evaluator = CheckpointEvaluator(cfg, run_dir, ray_local, said.append)
    evaluator.poll()
    evaluator.finish(timeout_s=300)
    errors = [r for r in records(run_dir) if "eval_error" in r]
    assert sorted(r["step"] for r in errors) == [2, 4] and all(
        "no_such_task_anywhere" in r["eval_error"] for r in errors
    )
    assert sum("the evaluation of step" in line and "failed" in line for line in said) == 2, said
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]  # the run's own records untouched
