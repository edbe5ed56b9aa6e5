"""The tokenizer (`neoxray.model.tokenizer`): GPT-NeoX-20B's encodes like the reference and round-trips through
transformers; loading errors name the path. Training one from files is tested in
tests/pipelines/test_tokenizer_training.py."""

from __future__ import annotations

import hashlib

import pytest

from neoxray.errors import NeoxrayError
from neoxray.model.tokenizer import EOD_TOKEN, Tokenizer
from tests.conftest import SHARED_TOKENIZER

NEOX_TOKENIZER = SHARED_TOKENIZER
needs_neox = pytest.mark.skipif(not NEOX_TOKENIZER.exists(), reason=f"{NEOX_TOKENIZER} not present")

UNICODE_TEXT = "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🚀, tabs\tand  spaces\n\nend."


# ---------------------------------------------------------------------------------------------------- GPT-NeoX-20B


@needs_neox
def test_neox20b_encodes_like_the_reference():
    tok = Tokenizer.load(NEOX_TOKENIZER)
    assert tok.encode("Hello, my dog is cute") == [12092, 13, 619, 4370, 310, 20295]
    assert tok.eod_id == 0 and tok.pad_id == 1
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True) > 50000
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    # a folder holding tokenizer.json works too
    assert Tokenizer.load(NEOX_TOKENIZER.parent).encode("Hello") == tok.encode("Hello")


@needs_neox
def test_neox20b_round_trips_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.load(NEOX_TOKENIZER)
    out = tok.save(tmp_path / "neox", model_max_length=2048)
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == tok.sha256
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert "GPTNeoX" in type(hf).__name__
    assert hf.model_max_length == 2048
    assert hf.bos_token == hf.eos_token == hf.unk_token == EOD_TOKEN
    texts = ["Hello, my dog is cute", UNICODE_TEXT, "def f(x):\n        return    x\n\n\n"]
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text)
    assert [hf(t)["input_ids"] for t in texts] == tok.encode_batch(texts)
    assert Tokenizer.load(out).sha256 == tok.sha256


# ----------------------------------------------------------------------------------------------------------- errors


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(NeoxrayError, match="missing-tokenizer.json"):
        Tokenizer.load(tmp_path / "missing-tokenizer.json")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(NeoxrayError, match="emptydir.*tokenizer.json"):
        Tokenizer.load(tmp_path / "emptydir")
    bad = tmp_path / "bad.json"
    bad.write_text("{this is not json")
    with pytest.raises(NeoxrayError, match="bad.json"):
        Tokenizer.load(bad)
    (tmp_path / "baddir").mkdir()
    (tmp_path / "baddir" / "tokenizer.json").write_text("[]")
    with pytest.raises(NeoxrayError, match="baddir"):
        Tokenizer.load(tmp_path / "baddir")


def test_tokenizer_without_endoftext_is_rejected(tmp_path):
    import tokenizers
    from tokenizers import models

    path = tmp_path / "noeod.json"
    tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(path))
    with pytest.raises(NeoxrayError, match="noeod.json.*<\\|endoftext\\|>"):
        Tokenizer.load(path)


def test_hub_id_unreachable_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(NeoxrayError, match="some-owner/some-tokenizer.*no such file.*hub could not be reached"):
        Tokenizer.load("some-owner/some-tokenizer")
    # something that does not look like owner/name never reaches the hub
    with pytest.raises(NeoxrayError, match="no such file or directory"):
        Tokenizer.load("./not/a/hub/id.json")
