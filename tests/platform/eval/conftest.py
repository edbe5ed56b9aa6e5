"""Fixtures of the `neoxray eval` tests: the local task folders (tests/data/eval), a tiny model with a longer
context for the model card's stand-ins, and each backend's results on the four local tasks, computed once.

The task YAMLs name their data files relative to the repository root (lm-eval passes `data_files` to
`datasets.load_dataset` as they are), so whatever reads a task's dataset runs there."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from tests.conftest import ROOT

DATA = ROOT / "tests" / "data" / "eval"
TASKS_DIR = DATA / "tasks"
CARD_DIR = DATA / "model_card"
TASKS = ["neoxray_test_lastword", "neoxray_test_choice", "neoxray_test_gen", "neoxray_test_rolling"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
"""No test reaches the Hugging Face hub."""


@contextlib.contextmanager
def at_root():
    """Run in the repository root (where the task YAMLs' data_files are relative to), offline."""
    before, env = os.getcwd(), {k: os.environ.get(k) for k in OFFLINE}
    os.chdir(ROOT)
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        os.chdir(before)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def local_tm():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory, sample_tokenizer_dir):
    """The tiny model of tests/conftest.py with a 512-token context: room for lm-eval's default generation
    budget (256 new tokens), which the TriviaQA stand-in keeps."""
    from neoxray.model.config import get_preset
    from neoxray.model.gptneox import build_model
    from neoxray.model.hf import save_pretrained
    from neoxray.model.tokenizer import Tokenizer

    tok = Tokenizer.load(sample_tokenizer_dir)
    model = build_model(get_preset("tiny", vocab_size=1024, max_seq_len=512), seed=0)
    with torch.no_grad():
        model.embed_out.weight.mul_(20.0)
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "tiny512", tokenizer=tok)


def evaluate(model, model_args, tm, **kw) -> dict:
    import lm_eval

    import neoxray.platform.eval  # noqa: F401 (registers the backend)

    with at_root():
        return lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=TASKS,
            task_manager=tm,
            log_samples=True,
            bootstrap_iters=0,
            batch_size=8,
            **kw,
        )


@pytest.fixture(scope="session")
def hf_results(tiny_model_dir, local_tm):
    """lm-eval's own `hf` backend (transformers) on the tiny model: the reference."""
    return evaluate("hf", f"pretrained={tiny_model_dir},device=cpu,dtype=float32", local_tm)


@pytest.fixture(scope="session")
def neoxray_results(tiny_model_dir, local_tm):
    return evaluate("neoxray", f"pretrained={tiny_model_dir},device=cpu", local_tm)
