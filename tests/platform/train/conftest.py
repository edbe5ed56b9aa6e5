"""Shared by the training tests: the prepared sample (rows of 33 tokens, the sample tokenizer), the run config
every test starts from, readers of a run's metrics, and the small `neoxray train --no-ray` runs (with a 4-step
run to copy) that the refusal tests change and restart."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
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
# the layouts test_train.py's test_layouts_train_the_same_model_as_one_process runs on Ray Train and compares
# with `reference` (one process, BASE): all three axes at once; the other Ray Train runs of BASE are compared
# with it too: (1, 1, 1) in test_evaluation.py, (2, 1, 1) in the SIGKILL test, (2, 1, 2) and a re-layout to
# (1, 2, 1) (tensor parallel alone) in test_object_storage.py; tensor parallelism alone in gloo worlds against
# one process: tests/model/test_tensor_parallel.py
LAYOUTS = [(2, 2, 2)]


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
    process: the STEPS steps of BASE, no checkpoint; what the Ray Train runs of BASE are compared with."""
    root = tmp_path_factory.mktemp("ref")
    args = [f"{o}" for o in BASE] + [f"data.path={prepared}", "name=ref"]
    run_cli("train", "--no-ray", "--run-dir", str(root / "ref"), *args, "checkpoint.every=0")
    return root / "ref"


# ------------------------------------------------------------------------ small runs of `neoxray train --no-ray`
SMALL = [
    "model.preset=tiny",
    "model.overrides.vocab_size=1024",
    "model.overrides.max_seq_len=32",
    "train.global_batch=4",
    "train.micro_batch=2",
    "schedule.warmup_steps=1",
    "schedule.decay_steps=8",
    "checkpoint.every=2",
    "checkpoint.keep=0",
    "logging.tensorboard=false",
    "train.seed=3",
]


def train(data, run_dir, *extra, check=True, env=None):
    """`neoxray train --no-ray` in a fresh process, as a user runs it (`env`: its environment)."""
    args = ("train", "--no-ray", "--run-dir", str(run_dir), *SMALL, f"data.path={data}", *extra)
    return run_cli(*args, check=check, env=env)


def plan_here(data, run_dir, *extra) -> str:
    """The refusal of `train`'s run (`SMALL` and `extra`) by the driver's plan (`preflight.plan_run`, what
    `neoxray train` runs first, on Ray and without), in this process: its message, one line. For a test's further
    refusals once a fresh process has shown one as a user sees it."""
    from neoxray.errors import NeoxrayError
    from neoxray.platform.train.config import load_run_config
    from neoxray.platform.train.preflight import plan_run

    cfg = load_run_config(None, [*SMALL, f"data.path={data}", *extra])
    with pytest.raises(NeoxrayError) as e:
        plan_run(cfg, str(run_dir), lambda line: None)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` -> its sha256: to show a refused run touched nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error_line(proc, *needles) -> str:
    """The run failed with exactly one `neoxray: error:` line, no traceback, naming every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("neoxray: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def base_run(prepared, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4; tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(prepared, run, "train.steps=4")
    assert sorted(p.name for p in run.glob("checkpoint-step-*")) == [
        "checkpoint-step-0000002",
        "checkpoint-step-0000004",
    ]
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def flip_a_byte(path: Path) -> bytes:
    """A byte near the end of `path` inverted (same size, other content); returns the new bytes."""
    data = bytearray(path.read_bytes())
    data[-64] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


@contextlib.contextmanager
def cpu_hog(until=None, processes: int = 1, deadline_s: float = 900):
    """`processes` busy-looping processes (not niced, so each takes a core from Ray's workers, which are) while
    the block runs, or until `until()` holds (polled; `deadline_s` is only a guard). The hogs are ended by their
    own pids."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    done = threading.Event()

    def stop_when_until_holds() -> None:
        end = time.monotonic() + deadline_s
        while not done.wait(0.5) and time.monotonic() < end:
            with contextlib.suppress(Exception):  # a file being written: look again
                if until is not None and until():
                    break
        for hog in hogs:
            hog.kill()

    watcher = threading.Thread(target=stop_when_until_holds, daemon=True)
    watcher.start()
    try:
        yield hogs
    finally:
        done.set()
        watcher.join()
        for hog in hogs:
            hog.kill()
            hog.wait()
