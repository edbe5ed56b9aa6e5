"""Shared by the training tests: the prepared sample (rows of 33 tokens, the sample tokenizer), the run config
every test starts from, and readers of a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, run_cli

STEPS = 5
BASE = [
    "model.preset=tiny",
    "model.overrides.vocab_size=1024",
    "model.overrides.max_seq_len=64",
    "train.seq_len=32",
    "train.global_batch=8",
    "train.micro_batch=2",
    f"train.steps={STEPS}",
    "optimizer.lr=3e-3",
    "optimizer.min_lr=3e-4",
    "schedule.warmup_steps=1",
    f"schedule.decay_steps={STEPS}",
    "train.seed=7",
    "data.seed=11",
    "logging.tensorboard=true",
    f"eval.every={STEPS}",
    "eval.batches=1",
]
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2)]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, sample_tokenizer_dir, ray_local):
    """The bundled sample, tokenized with the sample tokenizer and packed into rows of 33 tokens."""
    from neoxray.pipelines.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "sample-32"
    prepare([str(SAMPLE)], str(sample_tokenizer_dir), 32, str(out), workers=2, progress=False)
    return out


def cfg_for(data, name, layout=(1, 1, 1), extra=()):
    from neoxray.platform.train.config import load_run_config

    dp, tp, pp = layout
    return load_run_config(
        None,
        [
            *BASE,
            f"data.path={data}",
            f"name={name}",
            f"parallel.data={dp}",
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            *extra,
        ],
    )


def losses(run_dir, key="loss") -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if key in m:
            out[m["step"]] = m[key]
    return out


def assert_same(a: dict, b: dict, steps):
    for s in steps:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(b[s]), f"step {s}: {a[s]} != {b[s]}"


@pytest.fixture(scope="session")
def reference(prepared, tmp_path_factory):
    """The plain single-process run of the same engine, without Ray (`neoxray train --no-ray`), in a fresh
    process: STEPS + 2 steps with the schedule of the STEPS-step runs... and one for the resume tests."""
    root = tmp_path_factory.mktemp("ref")
    args = [f"{o}" for o in BASE] + [f"data.path={prepared}", "name=ref"]
    run_cli("train", "--no-ray", "--run-dir", str(root / "ref"), *args, "checkpoint.every=0")
    return root / "ref"
