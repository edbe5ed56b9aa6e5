"""A URI (`s3://bucket/x`) never becomes a local folder named `s3:` (issue 18: `neoxray train --run-dir
s3://bucket/run` used to exit 0 having trained into ./s3:/bucket/run): where only a local path makes sense
(`checkpoint.staging_dir`, this node's disk) it is refused in one line naming the key, and a URI that holds
nothing usable is one line naming the option and the URI, before anything is written. What does live there is
tested against a real S3-protocol server (tests/platform/train/test_object_storage.py,
tests/platform/train/test_lora_training.py, tests/pipelines/test_prepare.py)."""

from __future__ import annotations

import os

import pytest

from neoxray.cli import main

URI = "s3://neoxray-bucket/run"
TRAIN = ["train", "--no-ray", "model.preset=tiny", "train.steps=1"]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """`neoxray ARGS` in this process, in an empty working directory; -> (exit code, the error line)."""
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)

    def run(*args) -> tuple[int, str]:
        code = main([*args, "--address", "auto"] if args[0] == "serve" else list(args))
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("neoxray: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        return code, errors[0]

    yield run
    os.environ.clear()
    os.environ.update(saved)
    assert list(tmp_path.iterdir()) == [], "nothing is written where the command ran"


def test_a_staging_dir_named_by_a_uri_is_one_line_naming_the_key(cli):
    code, line = cli(*TRAIN, "--run-dir", "run", f"checkpoint.staging_dir={URI}")
    assert code == 1 and f"checkpoint.staging_dir {URI}" in line and "not s3://" in line, line


NOWHERE = "file:///neoxray-nowhere/run"  # a URI with nothing there (file://: no network, no retries)


@pytest.mark.parametrize(
    "args, named",
    [
        (["report", NOWHERE], ""),
        (["score", "--model", NOWHERE, "--text", "x"], "--model"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_uri_with_nothing_there_is_one_line_naming_the_option(cli, args, named):
    code, line = cli(*args)
    assert code == 1 and f"{named} {NOWHERE}".strip() in line, line


def test_a_run_starting_from_a_uri_with_nothing_there_is_refused_naming_the_key(tmp_path):
    # the run's plan (what `neoxray train` makes first, on the driver), before any worker or process group
    from neoxray.errors import NeoxrayError
    from neoxray.platform.train.config import load_run_config
    from neoxray.platform.train.preflight import plan_run

    cfg = load_run_config(None, ["model.preset=tiny", f"data.path={tmp_path}", f"model.init_from={NOWHERE}"])
    with pytest.raises(NeoxrayError, match=f"^model.init_from {NOWHERE}: nothing there"):
        plan_run(cfg, str(tmp_path / "run"), lambda line: None)
    assert not (tmp_path / "run").exists()


def test_a_lora_adapter_named_by_a_uri_with_no_adapter_there_is_one_line(cli, tiny_model_dir):
    code, line = cli("generate", "--model", str(tiny_model_dir), "--lora", NOWHERE, "--prompt", "x")
    assert code == 1 and f"--lora {NOWHERE}: nothing there" in line, line
    code, line = cli("serve", "--model", str(tiny_model_dir), "--lora", f"a={NOWHERE}")
    assert code == 1 and f"--lora a= {NOWHERE}: nothing there" in line, line
