"""The limits of one request, without a server: the character bound that refuses a prompt before tokenizing
never refuses one that fits, what one request may hold, values the engine step cannot survive are refused up
front, and the serving arguments behind them (an empty API key refused; defaults)."""

from __future__ import annotations

import asyncio
import random
import unicodedata

import pytest

from neoxray.errors import NeoxrayError
from neoxray.model.tokenizer import Tokenizer
from neoxray.platform.inference.request import InvalidRequest, Request
from tests.conftest import SHARED_TOKENIZER


def test_nfc_turns_at_most_one_and_a_half_characters_into_one_byte():
    from neoxray.platform.serve.limits import NFC_CHARS_PER_BYTE

    worst = 0.0
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        decomposed = unicodedata.normalize("NFD", c)
        if unicodedata.normalize("NFC", decomposed) == c:  # c is what NFC makes of its decomposition
            worst = max(worst, len(decomposed) / len(c.encode("utf-8")))
    assert worst == NFC_CHARS_PER_BYTE


def tokenizers(sample_tokenizer_dir):
    yield Tokenizer.load(sample_tokenizer_dir)
    if SHARED_TOKENIZER.exists():  # GPT-NeoX-20B's, when ../shared has it
        yield Tokenizer.load(SHARED_TOKENIZER)


def test_the_character_bound_never_refuses_a_prompt_that_fits(sample_tokenizer_dir):
    from neoxray.platform.serve.limits import prompt_char_bound

    rng = random.Random(0)
    for tok in tokenizers(sample_tokenizer_dir):
        vocab = tok.backend.get_vocab(with_added_tokens=True)
        longest = max(vocab, key=len)
        texts = [
            tok.decode([vocab[longest]]) * 50,  # the longest token, again and again
            "U\u0308\u0304" * 300,  # three characters that NFC composes into one 2-byte character
            "\u1100\u1161\u11a8" * 300,  # Hangul jamo, composed into syllables
            "<|endoftext|>" * 40,
            "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(2000)),
            " " * 5000,
            "\U0001f600" * 500,
        ]
        for text in texts:
            n = len(tok.encode(text))
            assert len(text) <= prompt_char_bound(tok, n), (tok, text[:20], n)


def serving(model_tok, **limits):
    from neoxray.platform.inference.engine import InferenceEngine
    from neoxray.platform.serve.client import LocalEngineClient
    from neoxray.platform.serve.context import ServingContext
    from neoxray.platform.serve.limits import ServingLimits
    from neoxray.platform.serve.serving_embedding import EmbeddingServing

    return EmbeddingServing(
        ServingContext(LocalEngineClient(InferenceEngine(*model_tok)), limits=ServingLimits(**limits))
    )


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    from neoxray.model.hf import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir)


def test_embedding_requests_are_bounded(model_tok):
    from neoxray.platform.serve.api_errors import ApiError
    from neoxray.platform.serve.protocol import EmbeddingRequest

    s = serving(model_tok, max_embedding_inputs=3, max_embedding_tokens=10)
    for inputs, what in (([[5]] * 4, "4 items"), ([[5] * 6, [5] * 5], "11 tokens")):
        with pytest.raises(ApiError) as e:
            asyncio.run(s.embeddings(EmbeddingRequest(input=inputs)))
        assert e.value.status == 400 and e.value.param == "input" and what in e.value.message


def test_values_that_would_fail_the_engine_step_are_refused(model_tok):
    from neoxray.model.decoding import SamplingParams
    from neoxray.platform.inference.engine import InferenceEngine

    engine = InferenceEngine(*model_tok)
    for param, sampling in (
        ("seed", SamplingParams(seed=2**64)),
        ("temperature", SamplingParams(temperature=1e-300)),
        ("top_k", SamplingParams(top_k=2**63)),
    ):
        with pytest.raises(InvalidRequest) as e:
            engine.add_request(Request([3, 4], max_tokens=2, sampling=sampling), lambda o: None)
        assert e.value.param == param
    ok = engine.run_until_done([Request([3, 4], max_tokens=2, sampling=SamplingParams(seed=2**64 - 1))])
    assert len(ok[0].token_ids) == 2


def test_serve_args_refuse_an_empty_key_and_default_the_per_request_cap(tiny_model_dir, monkeypatch):
    from pydantic import ValidationError

    from neoxray.platform.serve.args import ServeArgs
    from neoxray.platform.serve.limits import ServingLimits

    with pytest.raises(ValidationError, match="must not be empty"):
        ServeArgs(model="m", api_key="")
    args = ServeArgs(model="m", max_num_seqs=32)
    assert args.engine_config().max_running_per_group == 16 and args.limits() == ServingLimits()
    assert ServeArgs(model="m", max_num_seqs=1).engine_config().max_running_per_group == 1
    monkeypatch.setenv("NEOXRAY_API_KEY", "")
    with pytest.raises(NeoxrayError, match="NEOXRAY_API_KEY is set but empty"):
        args.with_env_api_key()
    from neoxray.platform.serve.app import build_app

    with pytest.raises(NeoxrayError, match="NEOXRAY_API_KEY is set but empty"):
        build_app({"model": str(tiny_model_dir)})
    monkeypatch.setenv("NEOXRAY_API_KEY", "k")
    assert args.with_env_api_key().api_key == "k"
