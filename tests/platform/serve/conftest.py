"""Fixtures of the serving tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory, sample_tokenizer_dir):
    """A tiny random GPT-NeoX (context 256) with the sample tokenizer; peaked logits, as in conftest."""
    from neoxray.model.config import get_preset
    from neoxray.model.gptneox import build_model
    from neoxray.model.hf import save_pretrained
    from neoxray.model.tokenizer import Tokenizer

    tok = Tokenizer.load(sample_tokenizer_dir)
    model = build_model(get_preset("tiny", vocab_size=1024, max_seq_len=256), seed=1)
    with torch.no_grad():
        model.embed_out.weight.mul_(20.0)
    return save_pretrained(model, tmp_path_factory.mktemp("serve") / "tiny-serve", tokenizer=tok)
