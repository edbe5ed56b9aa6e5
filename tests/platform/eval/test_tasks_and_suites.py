"""Task lookup and loading (names, suggestions, include paths that override built-in tasks, dataset errors), the
model card's suites and their table, and how requests are cut into chunks for Ray replicas. No model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neoxray.errors import NeoxrayError
from neoxray.platform.eval.replicas import chunk_bounds
from neoxray.platform.eval.runner import ScoreItem, submission_order
from neoxray.platform.eval.suites import SUITES, get_suite, suite_value
from neoxray.platform.eval.tasks import load_tasks, resolve_names, task_manager
from tests.platform.eval.conftest import CARD_DIR, TASKS, TASKS_DIR, at_root


def test_unknown_task_names_get_the_closest_names_from_the_index(local_tm):
    with pytest.raises(NeoxrayError, match=r"unknown task 'neoxray_test_choise'; did you mean: neoxray_test_choice"):
        resolve_names(local_tm, ["neoxray_test_choise"])
    with pytest.raises(NeoxrayError, match="no similar names"):
        resolve_names(local_tm, ["zzzz"])


def test_globs_and_duplicates(local_tm):
    assert resolve_names(local_tm, ["neoxray_test_*", "neoxray_test_gen"]) == sorted(TASKS)
    with pytest.raises(NeoxrayError, match="no task matches"):
        resolve_names(local_tm, ["nothing_*"])


def test_include_path_tasks_alone_skip_the_built_in_index():
    tm = task_manager(["neoxray_test_gen"], [str(TASKS_DIR)])
    assert len(tm.all_tasks) == len(TASKS)
    with pytest.raises(NeoxrayError, match="no such directory"):
        task_manager(["x"], [str(TASKS_DIR / "missing")])


def test_an_include_path_task_overrides_a_built_in_one_of_the_same_name():
    """lm-eval indexes its built-in folder first and include paths after, later entries replacing earlier
    ones: the same rule, shown with the built-in sciq folder indexed before our stand-in's."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    builtin = Path(lm_eval.tasks.__file__).parent / "sciq"
    tm = TaskManager(include_path=[str(builtin), str(CARD_DIR)], include_defaults=False)
    assert tm.task_index["sciq"].yaml_path == CARD_DIR / "sciq.yaml"
    with at_root():
        (task,) = load_tasks(tm, ["sciq"])
    assert task.config.dataset_path == "json"
    assert len(task.eval_docs) == 5


def test_a_task_yaml_with_a_syntax_error_is_named_with_the_yaml_error(tmp_path):
    """lm-eval skips a YAML file it cannot parse without a word (then the task is just "unknown"): the file and
    the parser's complaint, with its line, are the error instead."""
    folder = tmp_path / "tasks" / "sub"
    folder.mkdir(parents=True)
    (tmp_path / "tasks" / "good.yaml").write_text("task: good\ndataset_path: json\noutput_type: loglikelihood\n")
    (folder / "broken.yaml").write_text("task: broken\ndataset_path: json\noutput_type: [loglikelihood\n")
    for names in (["broken"], ["good"]):  # a broken file in a folder the user named is refused whatever is asked
        with pytest.raises(NeoxrayError) as err:
            task_manager(names, [str(tmp_path / "tasks")])
        msg = str(err.value)
        assert msg.startswith(f"--include-path {tmp_path / 'tasks'}: {folder / 'broken.yaml'}: invalid YAML at line 4")
        assert "\n" not in msg and "unknown task" not in msg
    (folder / "broken.yaml").write_text("task: fixed\nprocess_docs: !function utils.process\n")  # lm-eval's tag
    task_manager(["good"], [str(tmp_path / "tasks")])


def test_a_missing_dataset_names_the_task_and_the_dataset(tmp_path):
    (tmp_path / "broken.yaml").write_text(
        "task: broken_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nonexistent/b.jsonl\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{a}}'\ndoc_to_target: '{{b}}'\n"
    )
    tm = task_manager(["broken_task"], [str(tmp_path)])
    with pytest.raises(NeoxrayError) as err:
        load_tasks(tm, ["broken_task"])
    msg = str(err.value)
    assert msg.startswith("task broken_task: cannot load dataset json") and "/nonexistent/b.jsonl" in msg
    assert "HF_DATASETS_OFFLINE=1" in msg and "\n" not in msg


def test_suites_name_lm_eval_tasks_and_metrics():
    card = get_suite("model-card")
    assert [t.task for t in card.tasks] == ["lambada_openai", "sciq", "piqa", "triviaqa", "arc_challenge"]
    assert {t.num_fewshot for t in card.tasks} == {0}
    board = get_suite("leaderboard")
    assert {t.task: t.num_fewshot for t in board.tasks} == {
        "arc_challenge": 25,
        "hellaswag": 10,
        "mmlu": 5,
        "truthfulqa_mc2": 0,
        "winogrande": 5,
        "gsm8k": 5,
        "drop": 3,
    }
    with pytest.raises(NeoxrayError, match="unknown suite"):
        get_suite("nope")
    assert set(SUITES) == {"model-card", "leaderboard"}


def test_suite_values_and_the_card_table():
    results = {
        "results": {
            "mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01},
            "mmlu_stem": {"acc,none": 0.4},
            "mmlu_a": {"acc,none": 0.2, "acc_stderr,none": 0.03},
            "mmlu_b": {"acc,none": 0.4, "acc_stderr,none": 0.04},
            "mmlu_c": {"acc,none": 0.9, "acc_stderr,none": 0.0},
            "arc_challenge": {"acc_norm,none": 0.5, "acc_norm_stderr,none": 0.02},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_c"], "mmlu_stem": ["mmlu_a", "mmlu_b"]},
    }
    board = {t.task: t for t in get_suite("leaderboard").tasks}
    value, err = suite_value(results, board["mmlu"])  # the unweighted mean of the leaf subjects
    assert value == pytest.approx(0.5) and err == pytest.approx(0.05 / 3)
    assert suite_value(results, board["arc_challenge"]) == (0.5, 0.02)
    assert suite_value(results, board["gsm8k"]) == (None, None)

    from neoxray.platform.eval.results import card_table

    text = card_table(results, get_suite("leaderboard"))
    assert "GPT-NeoX-20B (card)" in text and "0.4573" in text and "N/A" in text


def test_results_json_is_written_atomically_and_serialisable(tmp_path):
    import numpy as np

    from neoxray.platform.eval.results import samples_path, to_json, write_atomic, write_samples

    out = write_atomic(tmp_path / "r.json", to_json({"results": {"t": {"acc,none": np.float64(0.5)}}}))
    assert json.loads(out.read_text()) == {"results": {"t": {"acc,none": 0.5}}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    (written,) = write_samples(out, {"a/b": [{"doc_id": 0, "x": {1, 2}}]})
    assert written == samples_path(out, "a/b") and written.name == "r_samples_a_b.jsonl"
    assert json.loads(written.read_text()) == {"doc_id": 0, "x": [1, 2]}


def test_requests_sharing_a_context_stay_together():
    items = [ScoreItem((1, 2, 3, 9), 1), ScoreItem((4, 5, 6), 1), ScoreItem((1, 2, 3, 8, 7), 2)] * 3
    order = submission_order(items, group_by_context=True)
    contexts = [items[i].context for i in order]
    assert contexts == sorted(contexts)  # same context, adjacent
    longest_first = [len(items[i].tokens) for i in submission_order(items, group_by_context=False)]
    assert longest_first == sorted(longest_first, reverse=True)
    ordered = [items[i] for i in order]
    bounds = chunk_bounds(ordered, 4, same_group=lambda a, b: a.context == b.context)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(items)
    assert all(b[0] == a[1] for a, b in zip(bounds, bounds[1:]))
    for start, _ in bounds[1:]:
        assert ordered[start - 1].context != ordered[start].context
    assert chunk_bounds(list(range(10)), 3) == [(0, 4), (4, 8), (8, 10)]


def test_suite_rows_name_lm_evals_tasks_metrics_and_filters():
    """Against lm-eval's own task YAMLs (its folders for these tasks only: quicker than its whole index): each
    row's task exists, computes the row's metric, and has the row's filter."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folders = ["lambada", "sciq", "piqa", "triviaqa", "arc", "hellaswag", "mmlu/default", "truthfulqa"]
    folders += ["winogrande", "gsm8k", "drop"]
    root = Path(lm_eval.tasks.__file__).parent
    index = TaskManager(include_path=[str(root / f) for f in folders], include_defaults=False).task_index
    for suite in SUITES.values():
        for row in suite.tasks:
            cfg = index[row.task].cfg
            metric, _, filt = row.metric.partition(",")
            metrics = cfg.get("metric_list") or cfg.get("aggregate_metric_list")
            assert metric in [m["metric"] for m in metrics], row
            assert filt == "none" or filt in [f["name"] for f in cfg["filter_list"]], row


def test_lm_evals_own_index_is_built_once_per_process(monkeypatch, tmp_path):
    """Indexing lm-eval's ~14,000 built-in tasks takes 10-30 s here; a training run evaluates every checkpoint, so
    the index of the built-in tasks is built once (an include path is indexed afresh each time: its files may
    change). Counted on a stand-in for lm-eval's TaskManager, so the test does not pay for the index itself."""
    import lm_eval.tasks

    from neoxray.platform.eval import tasks

    built = []

    class Counting:
        def __init__(self, include_path=None, include_defaults=True):
            built.append(include_path)
            self.task_index = {}

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Counting)
    tasks._builtin_tasks.cache_clear()
    try:
        first = tasks.task_manager(["hellaswag"])
        assert tasks.task_manager(["arc_easy", "piqa"]) is first and built == [None]
        tasks.task_manager(["mine"], [str(tmp_path)])
        tasks.task_manager(["mine"], [str(tmp_path)])
        assert built == [None] + [[str(tmp_path)]] * 4  # include paths: the local index, then with the built-ins
    finally:
        tasks._builtin_tasks.cache_clear()
