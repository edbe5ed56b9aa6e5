"""The training metrics sink and the console progress: every record in metrics.jsonl, a progress line every
`logging.every` steps (plus the last step and every evaluation) with step N/total and an ETA, the progress
followed from the file by the Ray driver, and the end-of-run summary."""

from __future__ import annotations

import io
import json
import threading

from neoxray.platform.train.metrics import MetricsSink
from neoxray.platform.train.progress import Progress, follow, summary


def steps(sink, n, start=1):
    for step in range(start, n + 1):
        record = {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "tokens_per_s": 1000.0, "step_time_s": 0.01}
        if step == 4:
            record["val_loss"] = 4.5
        sink.log(record)
    sink.close()


def test_console_prints_every_n_steps_the_last_and_evaluations_the_file_gets_all(tmp_path):
    out = io.StringIO()
    sink = MetricsSink(tmp_path, "run", tensorboard=False, ray_metrics=False, stream=out, print_every=3, total_steps=10)
    sink.log({"event": "resumed", "step": 2, "consumed_samples": 8})
    steps(sink, 10, start=3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "resumed at step 2 from its checkpoint"
    assert [line.split(" | ")[0] for line in lines[1:]] == [
        "step 3/10",
        "step 4/10",
        "step 6/10",
        "step 9/10",
        "step 10/10",
    ]
    assert "val_loss 4.5000" in lines[2] and "1,000 tok/s" in lines[1] and "ETA" in lines[1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(3, 11))


def test_every_step_by_default_and_no_file_when_metrics_file_is_null(tmp_path):
    out = io.StringIO()
    sink = MetricsSink(
        tmp_path, "run", tensorboard=False, ray_metrics=False, stream=out, metrics_file=None, total_steps=5
    )
    steps(sink, 5)
    assert len(out.getvalue().splitlines()) == 5
    assert list(tmp_path.iterdir()) == []


def test_resume_rewinds_the_file_so_no_step_is_recorded_twice(tmp_path):
    sink = MetricsSink(tmp_path, "run", tensorboard=False, ray_metrics=False, stream=None)
    steps(sink, 6)
    sink = MetricsSink(tmp_path, "run", tensorboard=False, ray_metrics=False, stream=None)
    sink.rewind(4)
    steps(sink, 6, start=5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_the_driver_follows_the_file_and_sums_up(tmp_path):
    (tmp_path / "checkpoint-step-0000006").mkdir()
    (tmp_path / "checkpoint-step-0000006" / "meta.json").write_text(json.dumps({"format": "x"}))
    out, stop = io.StringIO(), threading.Event()
    watcher = follow(tmp_path / "metrics.jsonl", Progress(6, 2, out), stop, poll_s=0.01)
    steps(MetricsSink(tmp_path, "run", tensorboard=False, ray_metrics=False, stream=None), 6)
    stop.set()
    watcher.join(timeout=10)
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == ["step 2/6", "step 4/6", "step 6/6"]
    text = summary(tmp_path, 75.0)
    assert "run finished in 1:15" in text and "final loss      4.4000 at step 6" in text
    assert "validation loss 4.5000" in text and "neoxray report" in text


def test_ray_train_gets_a_report_every_logging_step_and_the_last_not_every_step(monkeypatch):
    # ray.train.report puts the metrics on a queue of one that Ray Train's controller empties once per poll
    # (2 s): a report every step held every step after the first for up to 2 s (a 5-step tiny run took ~10 s
    # more than its steps). The metrics sink and the Ray gauges still get every step.
    import ray.train

    from neoxray.platform.train.ray_worker import RayReporter

    sent = []
    monkeypatch.setattr(ray.train, "report", lambda metrics: sent.append(metrics["step"]))
    reporter = RayReporter(every=10, last_step=25)
    for step in range(1, 26):
        reporter.report({"step": step, "loss": 1.0, "val_loss": None})
    assert sent == [10, 20, 25]
