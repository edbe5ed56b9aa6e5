"""Shared fixtures: the GPT-NeoX-20B tokenizer when ../shared has it, a tokenizer trained on the bundled
sample, and tiny model directories in the Hugging Face format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
SAMPLE = ROOT / "neoxray" / "pipelines" / "sample" / "sample.jsonl.zst"


@pytest.fixture(scope="session")
def sample_tokenizer_dir(tmp_path_factory):
    """A 1024-token byte-level BPE trained on the bundled sample (the demo's recipe, smaller)."""
    from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer_from_files([str(SAMPLE)], 1024, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_tokenizer_dir):
    """A tiny random GPT-NeoX with the sample tokenizer, saved as a Hugging Face directory. The weights are
    scaled up so that logits are peaked: greedy decoding then has no near-ties for float noise to flip."""
    from neoxray.model.config import get_preset
    from neoxray.model.gptneox import build_model
    from neoxray.model.hf import save_pretrained
    from neoxray.model.tokenizer import Tokenizer

    tok = Tokenizer.load(sample_tokenizer_dir)
    model = build_model(get_preset("tiny", vocab_size=1024, max_seq_len=64), seed=0)
    with torch.no_grad():
        model.embed_out.weight.mul_(20.0)
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "tiny", tokenizer=tok)


def run_cli(*args, check=True, timeout=300, env=None):
    """Run the installed console script in a fresh process, as a user would (`env`: its environment, default
    this process's)."""
    exe = Path(sys.executable).with_name("neoxray")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "neoxray.cli"]), *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_here(*args) -> subprocess.CompletedProcess:
    """`neoxray ARGS` in this process, reported as `run_cli` reports a fresh one's (returncode, stdout, stderr;
    argparse's exit status as it exits): for a test's further calls, refusals included, once a fresh process has
    shown the command works as a user runs it. The environment and the signal handlers are restored after."""
    import contextlib
    import io
    import signal

    from neoxray.cli import main

    env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(env)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess(["neoxray", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli_here():
    """`neoxray ARGS` in this process -> its stdout (an exit status other than 0 fails the test, with stderr):
    for a test's further CLI calls once a fresh process has shown the command works as a user runs it (an
    interpreter start with torch costs seconds each). The environment is restored after each call."""
    import contextlib
    import io

    from neoxray.cli import main

    def run(*args) -> str:
        saved, out, err = dict(os.environ), io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert code == 0, f"neoxray {' '.join(map(str, args))} exited {code}:\n{err.getvalue()[-3000:]}"
        return out.getvalue()

    return run


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole session (8 logical CPUs on this 2-core machine: enough for
    dp x tp x pp = 8 tiny CPU workers). Tests that need Ray take this fixture."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never the newest `ray start` cluster on the machine, which Ray would join
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-protocol server on 127.0.0.1 (moto's server mode) for the module, its endpoint and credentials
    in this process's environment (drivers pass them on to their workers and replicas), and a model cache of the
    module's own (NEOXRAY_MODEL_CACHE)."""
    from tests.support.s3 import s3_server

    with s3_server() as server, pytest.MonkeyPatch.context() as m:
        for k, v in server.env.items():
            m.setenv(k, v)
        m.setenv("NEOXRAY_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        yield server


E2E_FIXTURES = {"ray_local", "s3"}
"""Tests that take these fixtures run real clusters or servers: they are end-to-end whatever their marks say."""


def pytest_collection_modifyitems(config, items):
    """Tiers: every test on a real Ray cluster is `e2e` (so `make test-fast` never starts one by accident);
    modules and tests that run real processes or servers mark themselves `e2e`."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
