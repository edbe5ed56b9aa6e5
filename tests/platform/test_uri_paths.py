"""A checkpoint, a base model or an adapter named by a URI (`s3://bucket/x`) where only local paths work yet is
refused in one line naming the option, before anything is written: never a local folder named `s3:` holding what
the user meant to put in a bucket (issue 18: `neoxray train --run-dir s3://bucket/run` used to exit 0 having
trained into ./s3:/bucket/run). Run directories, `--model`, export and prepared datasets do live there
(tests/platform/train/test_object_storage.py, tests/pipelines/test_prepare.py)."""

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


@pytest.mark.parametrize(
    "args, named",
    [
        ([*TRAIN, "--run-dir", "run", f"checkpoint.staging_dir={URI}"], "checkpoint.staging_dir"),
        ([*TRAIN, "--run-dir", "run", f"checkpoint.load_from={URI}"], "checkpoint.load_from"),
        ([*TRAIN, "--run-dir", "run", f"model.init_from={URI}", "lora.rank=4"], "model.init_from"),
        (["report", URI], "report"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_uri_where_only_local_paths_work_is_one_line_naming_the_option(cli, args, named):
    code, line = cli(*args)
    assert code == 1 and f"{named} {URI}" in line and "not s3:// yet" in line, line


def test_a_lora_adapter_named_by_a_uri_is_refused(cli, tiny_model_dir):
    code, line = cli("generate", "--model", str(tiny_model_dir), "--lora", URI, "--prompt", "x")
    assert code == 1 and f"--lora {URI}" in line, line
    code, line = cli("serve", "--model", str(tiny_model_dir), "--lora", f"a={URI}")
    assert code == 1 and f"--lora a={URI}" in line, line
