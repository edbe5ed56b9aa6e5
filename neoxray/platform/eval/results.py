"""What `neoxray eval` hands out: lm-eval's results JSON (serialised as lm-eval's own CLI does it, written
atomically), the per-sample logs, lm-eval's results table, and for a suite the model card's GPT-NeoX-20B figures
beside ours."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from neoxray.platform.eval.suites import Suite, suite_value


def to_json(obj) -> str:
    """JSON text of lm-eval's results as lm-eval's CLI writes it (numpy scalars and other non-JSON values
    through lm-eval's `handle_non_serializable`)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it into place: a reader never sees half a
    file, and an earlier file survives a failed write."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if not text.endswith("\n"):
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def samples_path(output: str | os.PathLike, task: str) -> Path:
    """Where `--log-samples` writes a task's samples: beside the results file, `<stem>_samples_<task>.jsonl`."""
    out = Path(output).expanduser()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return out.with_name(f"{out.stem}_samples_{safe}.jsonl")


def write_samples(output: str | os.PathLike, samples: dict) -> list[Path]:
    """One JSON Lines file per task (lm-eval's sample records: doc, arguments, responses, metrics)."""
    from lm_eval.utils import handle_non_serializable

    written = []
    for task, records in samples.items():
        lines = [json.dumps(r, default=handle_non_serializable, ensure_ascii=False) for r in records]
        written.append(write_atomic(samples_path(output, task), "\n".join(lines)))
    return written


def results_table(results: dict) -> str:
    """lm-eval's own results table (and its groups table when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def card_table(results: dict, suite: Suite) -> str:
    """The suite's rows: our value with its stderr beside the model card's GPT-NeoX-20B figure (lm-eval's
    table writer, pytablewriter)."""
    from pytablewriter import MarkdownTableWriter

    writer = MarkdownTableWriter()
    writer.table_name = suite.title
    writer.headers = ["Benchmark", "Task", "n-shot", "Metric", "neoxray", "", "Stderr", "GPT-NeoX-20B (card)", "Diff"]
    rows = []
    for row in suite.tasks:
        value, err = suite_value(results, row)
        metric = row.metric + (" (mean of subtasks)" if row.subtask_mean else "")
        rows.append(
            [
                row.label,
                row.task,
                row.num_fewshot,
                metric,
                "N/A" if value is None else f"{value:.4f}",
                "±" if err is not None else "",
                "" if err is None else f"{err:.4f}",
                f"{row.card:.4f}",
                "" if value is None else f"{value - row.card:+.4f}",
            ]
        )
    writer.value_matrix = rows
    return writer.dumps()
