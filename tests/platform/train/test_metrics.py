"""The training metrics sink: every record in metrics.jsonl, a console line every `logging.every` steps."""

from __future__ import annotations

import io
import json

from neoxray.platform.train.metrics import MetricsSink


def steps(sink, n):
    for step in range(1, n + 1):
        record = {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3}
        if step == 4:
            record["val_loss"] = 4.5
        sink.log(record)
    sink.close()


def test_console_prints_every_n_steps_the_last_and_evaluations_the_file_gets_all(tmp_path):
    out = io.StringIO()
    sink = MetricsSink(tmp_path, "run", tensorboard=False, ray_metrics=False, stream=out, print_every=3, total_steps=10)
    sink.log({"event": "resumed", "step": 0, "consumed_samples": 0})
    steps(sink, 10)
    printed = [line.split(" | ")[0] for line in out.getvalue().splitlines()]
    assert printed == ["step 0", "step 3", "step 4", "step 6", "step 9", "step 10"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 11))


def test_every_step_by_default_and_no_file_when_metrics_file_is_null(tmp_path):
    out = io.StringIO()
    steps(MetricsSink(tmp_path, "run", tensorboard=False, ray_metrics=False, stream=out, metrics_file=None), 5)
    assert len(out.getvalue().splitlines()) == 5
    assert list(tmp_path.iterdir()) == []
