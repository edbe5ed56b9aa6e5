"""`neoxray report RUN_DIR`: one self-contained HTML page (RUN_DIR/report.html) with plots of a run's training
and validation loss, learning rate, gradient norm, throughput and evaluation scores (`eval.tasks`), read from
metrics.jsonl and drawn with
matplotlib (embedded as PNG), plus the run's config and checkpoints. Open it in any browser; nothing else is
needed to read it."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.paths import is_uri, local_path
from neoxray.platform.checkpoint import list_checkpoints

PANELS = [
    ("Loss", [("loss", "training"), ("val_loss", "validation")], "linear"),
    ("Learning rate", [("lr", "lr")], "linear"),
    ("Gradient norm (before clipping)", [("grad_norm", "grad norm")], "log"),
    ("Throughput (tokens per second)", [("tokens_per_s", "tokens/s")], "linear"),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise NeoxrayError(
            f"{run_dir}: no metrics.jsonl (not a run directory, or a run with logging.metrics_file null)"
        )
    return parse_metrics(path.read_text(encoding="utf-8"))


def parse_metrics(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def _flat_eval(result: dict) -> dict[str, float]:
    """{task: {metric: value}} -> {"task metric": value}."""
    return {f"{task} {metric}": v for task, metrics in result.items() for metric, v in metrics.items()}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get("step"), int) and r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _plot(records: list[dict], title: str, series: list[tuple[str, str]], scale: str) -> str | None:
    """One panel as a base64 PNG, or None when the run has none of its series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(label, *_series(records, key)) for key, label in series]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 3.3), dpi=100)
    for label, x, y in drawn:
        ax.plot(x, y, marker="o" if len(x) < 40 else None, markersize=3, linewidth=1.5, label=label)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    if scale == "log" and all(v > 0 for _, _, y in drawn for v in y):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(drawn) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(run_dir, out: str | os.PathLike | None = None) -> str:
    """Write the report of the run at `run_dir` (default RUN_DIR/report.html, written atomically); returns where.
    A run on object storage (`s3://...`) is read from there, and its page written there unless `out` says
    otherwise (a local path or another URI)."""
    if is_uri(str(run_dir)):
        return _write_store_report(str(run_dir), out)
    run_dir = local_path(run_dir, "report")
    if not run_dir.is_dir():
        raise NeoxrayError(f"run directory not found: {run_dir}")
    config = run_dir / "config.yaml"
    page = render_report(
        str(run_dir),  # as given: `neoxray report runs/x` from the project shows runs/x
        run_dir.name,
        read_metrics(run_dir),
        [p.name for p in list_checkpoints(run_dir)],
        config.read_text(encoding="utf-8") if config.exists() else None,
    )
    if out and is_uri(str(out)):
        return _upload_page(page, str(out))
    target = Path(out) if out else run_dir / "report.html"
    _write_atomically(page, target)
    return str(target)


def _write_store_report(uri: str, out) -> str:
    from neoxray.platform.run_store import EVAL_RECORDS, RunStore, store_checkpoints

    store = RunStore(uri)
    text = store.read_text("metrics.jsonl")
    if text is None:
        raise NeoxrayError(f"{uri}: no metrics.jsonl (not a run directory, or a run with logging.metrics_file null)")
    complete = [name for name, _, problem in reversed(store_checkpoints(store)) if problem is None]
    records = parse_metrics(text) + parse_metrics(store.read_text(EVAL_RECORDS) or "")  # eval.tasks' records
    page = render_report(store.uri, store.uri.rsplit("/", 1)[-1], records, complete, store.read_text("config.yaml"))
    if out and not is_uri(str(out)):
        target = local_path(out, "report --out")
        _write_atomically(page, target)
        return str(target)
    return _upload_page(page, str(out) if out else store.path("report.html"))


def _write_atomically(page: str, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)


def _upload_page(page: str, uri: str) -> str:
    """The page written to the URI `uri` (one object: readers see the old page or the new one)."""
    import tempfile

    from neoxray.platform.run_store import RunStore

    parent, name = uri.rstrip("/").rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="neoxray-report-") as tmp:
        local = Path(tmp) / name
        local.write_text(page, encoding="utf-8")
        RunStore(parent).upload(local, name)
    return uri


def render_report(where: str, name: str, records: list[dict], checkpoints: list[str], config: str | None) -> str:
    """The page: `where` the run is (as given), its `name`, its metrics records, its complete checkpoints'
    names (oldest first) and its config.yaml's text (or None)."""
    steps = [r for r in records if "loss" in r]
    if not steps:
        raise NeoxrayError(f"{where}/metrics.jsonl has no training steps yet")
    last = steps[-1]
    facts = [
        ("run directory", where),
        ("steps", f"{last['step']}"),
        ("final training loss", f"{last['loss']:.4f}"),
    ]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    if vals:
        facts.append(("final validation loss", f"{vals[-1]:.4f}"))
    facts.append(("checkpoints", ", ".join(checkpoints) or "none"))
    resumes = [r["step"] for r in records if r.get("event") == "resumed"]
    if resumes:
        facts.append(("resumed at steps", ", ".join(map(str, resumes))))
    panels = [(t, _plot(records, t, s, scale)) for t, s, scale in PANELS]
    flat = [{"step": r["step"], **_flat_eval(r["eval"])} for r in records if isinstance(r.get("eval"), dict)]
    keys = sorted({k for r in flat for k in r if k != "step"})
    if keys:
        panels.append(("Evaluation (lm-eval)", _plot(flat, "Evaluation (lm-eval)", [(k, k) for k in keys], "linear")))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>neoxray run {html.escape(name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1600px}"
        "table{border-collapse:collapse}td{padding:2px 12px 2px 0;vertical-align:top}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}img{border:1px solid #ddd}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style></head><body>",
        f"<h1>neoxray run <code>{html.escape(name)}</code></h1><table>",
        *[f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in facts],
        "</table><h2>Metrics</h2><div class='grid'>",
        *[f"<img alt='{html.escape(t)}' src='data:image/png;base64,{png}'>" for t, png in panels if png],
        "</div>",
    ]
    if config is not None:
        parts.append(f"<h2>Config</h2><pre>{html.escape(config)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
