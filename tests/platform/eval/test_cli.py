"""`neoxray eval` as a user runs it (a fresh process, offline): the model card suite end to end on local stand-ins
of its five tasks, lm-eval's table with the card's column, a dataset that cannot be fetched offline, and the one
progress display; once those fresh processes have shown the command as a user runs it, --verbose's displays, the
results JSON (`--output`, `--json`) and the other one-line errors (an unknown task with the closest names, a
missing model, a task YAML that does not parse) are checked with the same command in this process (`run_here`: an
interpreter start with torch and lm-eval costs seconds each)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_here
from tests.platform.eval.conftest import CARD_DIR, OFFLINE, TASKS, TASKS_DIR, at_root

pytestmark = pytest.mark.e2e


def neoxray_eval(*args, check=True, timeout=300):
    """`neoxray eval ARGS` from the repository root (the local tasks' data paths are relative to it), offline."""
    exe = Path(sys.executable).with_name("neoxray")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "neoxray.cli"])]
    env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*cmd, "eval", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"neoxray eval {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def eval_here(*args):
    """`neoxray eval ARGS` in this process, from the repository root and offline, as `neoxray_eval` runs it."""
    with at_root():
        return run_here("eval", *args)


def test_model_card_suite_end_to_end(long_model_dir, tmp_path):
    """Local stand-ins of the card's five tasks (same names, formats and metrics) shadow lm-eval's own from
    --include-path; stdout is lm-eval's table, then the card's GPT-NeoX-20B column beside ours."""
    out = tmp_path / "results.json"
    proc = neoxray_eval(
        "--model", str(long_model_dir), "--suite", "model-card", "--include-path", str(CARD_DIR),
        "--output", str(out), "--log-samples", "--bootstrap-iters", "1000",
    )  # fmt: skip
    table, _, card = proc.stdout.partition("GPT-NeoX-20B model card, zero-shot")
    assert re.search(r"^\|\s*Tasks\s*\|Version\|\s*Filter\s*\|n-shot\|\s*Metric\s*\|", table, re.M), proc.stdout
    for task in ("lambada_openai", "sciq", "piqa", "triviaqa", "arc_challenge"):
        assert f"|{task}" in table
    assert "GPT-NeoX-20B (card)" in card and "Stderr" in card
    for label, figure in [("LAMBADA (OpenAI)", "0.720"), ("SciQ", "0.928"), ("PIQA", "0.779"), ("TriviaQA", "0.259")]:
        row = next(line for line in card.splitlines() if line.startswith(f"|{label}"))
        assert figure in row
    assert "Traceback" not in proc.stderr

    results = json.loads(out.read_text())  # lm-eval's results object, as lm-eval writes it
    assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"} <= results.keys()
    assert "samples" not in results
    assert results["results"]["lambada_openai"].keys() >= {"acc,none", "acc_stderr,none", "perplexity,none"}
    assert "exact_match,remove_whitespace" in results["results"]["triviaqa"]
    assert results["n-shot"]["sciq"] == 0 and results["config"]["model"] == "neoxray"
    assert results["configs"]["piqa"]["dataset_path"] == "json"  # the stand-in, not the hub's piqa
    for task in results["results"]:
        lines = (tmp_path / f"results_samples_{task}.jsonl").read_text().splitlines()
        assert len(lines) == results["n-samples"][task]["effective"]


def test_json_output_equals_the_file(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    proc = eval_here(
        "--model", str(tiny_model_dir), "--tasks", ",".join(TASKS), "--include-path", str(TASKS_DIR),
        "--limit", "3", "--json", "--output", str(out), "--bootstrap-iters", "0", "--batch-size", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert sorted(printed["results"]) == sorted(TASKS)
    assert {t: printed["n-samples"][t]["effective"] for t in TASKS} == dict.fromkeys(TASKS, 3)
    assert printed["config"]["model_args"].startswith(f"pretrained={tiny_model_dir},")


def one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("neoxray: error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_an_unknown_task_lists_the_closest_names(tiny_model_dir):
    proc = eval_here("--model", str(tiny_model_dir), "--tasks", "lambada_openai,hellaswagg")
    line = one_line_error(proc)
    assert "unknown task 'hellaswagg'; did you mean: hellaswag" in line


def test_a_dataset_that_cannot_be_fetched_offline_says_how_to_provide_it(tiny_model_dir):
    """lm-eval's own sciq task, its folder alone indexed (--include-path: the whole index, 14,000 tasks, costs
    seconds; the unknown-task test goes through it)."""
    import lm_eval.tasks

    sciq = Path(lm_eval.tasks.__file__).parent / "sciq"
    proc = neoxray_eval("--model", str(tiny_model_dir), "--tasks", "sciq", "--include-path", str(sciq), check=False)
    line = one_line_error(proc)
    assert line.startswith("neoxray: error: task sciq: cannot load dataset allenai/sciq (")
    assert "HF_DATASETS_OFFLINE=1" in line and "--include-path" in line


def test_a_missing_model_is_the_same_error_as_generate(tmp_path):
    missing = str(tmp_path / "nope")
    proc = eval_here("--model", missing, "--tasks", "sciq")
    generate = run_here("generate", "--model", missing, "--prompt", "x")
    assert one_line_error(proc) == one_line_error(generate) == f"neoxray: error: model not found: {missing}"
    usage = eval_here("--model", missing)  # neither --tasks nor --suite: argparse's usage error
    assert usage.returncode == 2 and "one of the arguments --tasks --suite is required" in usage.stderr


def test_a_task_yaml_that_does_not_parse_is_named(tiny_model_dir, tmp_path):
    (tmp_path / "broken.yaml").write_text("task: broken\ndataset_path: json\noutput_type: [loglikelihood\n")
    args = ["--model", str(tiny_model_dir), "--tasks", "broken", "--include-path", str(tmp_path)]
    line = one_line_error(eval_here(*args))
    assert line.startswith(f"neoxray: error: --include-path {tmp_path}: {tmp_path / 'broken.yaml'}: invalid YAML at ")


def test_one_progress_display_unless_verbose(tiny_model_dir, tmp_path):
    """What `make demo`'s eval step shows: the backend's own bar, not datasets' (reading the task's data, here a
    file no cache has seen) nor lm-eval's (building the requests, tokenizing them); --verbose shows them all."""
    lines = [json.dumps({"text": f"passage {i} ends with the word w{i}"}) for i in range(6)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "fresh.yaml").write_text(
        "task: neoxray_fresh\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\noutput_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: acc\n"
    )
    args = ["--model", str(tiny_model_dir), "--tasks", "neoxray_fresh", "--include-path", str(tmp_path)]
    quiet = neoxray_eval(*args, "--bootstrap-iters", "0").stderr
    assert "neoxray loglikelihood: 100%" in quiet, quiet
    bars = [line for line in quiet.replace("\r", "\n").splitlines() if "it/s]" in line or "examples/s]" in line]
    assert all(line.startswith("neoxray loglikelihood") for line in bars), bars
    (tmp_path / "data.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # unseen again
    loud = eval_here(*args, "--bootstrap-iters", "0", "--verbose").stderr  # the same command, in this process
    assert "Generating test split" in loud and "Tokenizing inputs" in loud and "neoxray loglikelihood" in loud
