"""The GPT-NeoX-20B model card's two tables as `neoxray eval --suite` task lists: which lm-eval 0.4 task and
metric key stands for each row, with how many shots, and the card's GPT-NeoX-20B figure to show beside ours.
docs/evaluation.md explains each mapping (and where lm-eval 0.4 differs from what the card's numbers came from).
"""

from __future__ import annotations

from dataclasses import dataclass

from neoxray.errors import NeoxrayError


@dataclass(frozen=True)
class SuiteTask:
    """One row of a model-card table."""

    label: str
    """The card's name for the benchmark."""
    task: str
    """lm-eval's task (or group) name."""
    num_fewshot: int
    metric: str
    """The key in lm-eval's results: `metric,filter`."""
    card: float
    """GPT-NeoX-20B's figure on the card, as a fraction."""
    subtask_mean: bool = False
    """Compare the unweighted mean of the group's leaf tasks (how the leaderboard averaged MMLU's 57 subjects)
    rather than lm-eval's group figure (weighted by subject size)."""


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    tasks: tuple[SuiteTask, ...]


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "model-card",
            "GPT-NeoX-20B model card, zero-shot",
            (
                SuiteTask("LAMBADA (OpenAI)", "lambada_openai", 0, "acc,none", 0.720),
                SuiteTask("SciQ", "sciq", 0, "acc,none", 0.928),
                SuiteTask("PIQA", "piqa", 0, "acc,none", 0.779),
                SuiteTask("TriviaQA", "triviaqa", 0, "exact_match,remove_whitespace", 0.259),
                SuiteTask("ARC (Challenge)", "arc_challenge", 0, "acc,none", 0.380),
            ),
        ),
        Suite(
            "leaderboard",
            "GPT-NeoX-20B on the (archived) Open LLM Leaderboard",
            (
                SuiteTask("ARC (25-shot)", "arc_challenge", 25, "acc_norm,none", 0.4573),
                SuiteTask("HellaSwag (10-shot)", "hellaswag", 10, "acc_norm,none", 0.7345),
                SuiteTask("MMLU (5-shot)", "mmlu", 5, "acc,none", 0.250, subtask_mean=True),
                SuiteTask("TruthfulQA (0-shot)", "truthfulqa_mc2", 0, "acc,none", 0.3161),
                SuiteTask("Winogrande (5-shot)", "winogrande", 5, "acc,none", 0.689),
                SuiteTask("GSM8K (5-shot)", "gsm8k", 5, "exact_match,strict-match", 0.0243),
                SuiteTask("DROP (3-shot)", "drop", 3, "f1,none", 0.0504),
            ),
        ),
    )
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise NeoxrayError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}") from None


def suite_value(results: dict, row: SuiteTask) -> tuple[float | None, float | None]:
    """Our (value, stderr) for one card row from lm-eval's results (None where the results lack it)."""
    metric, _, filt = row.metric.partition(",")
    stderr_key = f"{metric}_stderr,{filt}"
    if row.subtask_mean:
        leaves = _leaves(results, row.task)
        values = [results["results"][t].get(row.metric) for t in leaves]
        values = [v for v in values if isinstance(v, (int, float))]
        if values:
            errs = [results["results"][t].get(stderr_key) for t in leaves]
            errs = [e for e in errs if isinstance(e, (int, float))]
            # the mean of independent subject means: sqrt(sum of squared stderrs) / n
            err = (sum(e * e for e in errs) ** 0.5) / len(errs) if len(errs) == len(values) else None
            return sum(values) / len(values), err
    entry = results.get("results", {}).get(row.task) or results.get("groups", {}).get(row.task) or {}
    value, err = entry.get(row.metric), entry.get(stderr_key)
    return (
        float(value) if isinstance(value, (int, float)) else None,
        float(err) if isinstance(err, (int, float)) else None,
    )


def _leaves(results: dict, group: str) -> list[str]:
    """The leaf tasks under `group` in lm-eval's results (its `group_subtasks` tree)."""
    tree = results.get("group_subtasks", {})
    if group not in tree:
        return []
    out, stack = [], list(reversed(tree[group]))
    while stack:
        name = stack.pop()
        if name in tree and tree[name]:
            stack.extend(reversed(tree[name]))
        elif name in results.get("results", {}):
            out.append(name)
    return out
