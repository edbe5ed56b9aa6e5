"""Tokenizer loading/saving/training, the Pile line reader, and the bundled sample corpus."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from neoxray.errors import NeoxrayError
from neoxray.model.tokenizer import EOD_TOKEN, PAD_TOKEN, Tokenizer
from neoxray.pipelines.pile import iter_documents, open_text_lines
from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files as train_tokenizer

NEOX_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/tokenizers/gpt-neox-20b/tokenizer.json"
SAMPLE = Path(__file__).resolve().parents[1] / "neoxray/pipelines/sample/sample.jsonl.zst"
needs_neox = pytest.mark.skipif(not NEOX_TOKENIZER.exists(), reason=f"{NEOX_TOKENIZER} not present")

UNICODE_TEXT = "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🚀, tabs\tand  spaces\n\nend."


def _sample_docs(n: int) -> list[dict]:
    docs = []
    with zstandard.ZstdDecompressor().stream_reader(open(SAMPLE, "rb"), closefd=True) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            docs.append(json.loads(line))
            if len(docs) == n:
                break
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1024-token BPE trained on 300 sample documents (plus one unicode .txt document), and its folder."""
    src = tmp_path_factory.mktemp("corpus")
    with open(src / "part.jsonl", "w", encoding="utf-8") as f:
        for d in _sample_docs(300):
            f.write(json.dumps(d) + "\n")
    (src / "unicode.txt").write_text(UNICODE_TEXT * 3, encoding="utf-8")
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer([str(src)], 1024, str(out)), out


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


# --------------------------------------------------------------------------------------------------------- training


def test_trained_tokenizer_special_ids_and_round_trip(trained):
    tok, out = trained
    assert tok.backend.token_to_id(EOD_TOKEN) == 0 == tok.eod_id
    assert tok.backend.token_to_id(PAD_TOKEN) == 1 == tok.pad_id
    assert 300 < tok.vocab_size <= 1024
    for text in [UNICODE_TEXT, "def main():\n    return 0\n", "", " leading space", "a\u00a0b\u200bc"]:
        assert tok.decode(tok.encode(text)) == text
    # NFC: decomposed input comes back composed
    decomposed = unicodedata.normalize("NFD", UNICODE_TEXT)
    assert decomposed != UNICODE_TEXT
    assert tok.decode(tok.encode(decomposed)) == unicodedata.normalize("NFC", decomposed)
    assert tok.encode(decomposed) == tok.encode(UNICODE_TEXT)
    # saved, and loads back identically
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    again = Tokenizer.load(out)
    assert again.sha256 == tok.sha256
    assert again.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert tok.encode_batch(["a b", UNICODE_TEXT]) == [tok.encode("a b"), tok.encode(UNICODE_TEXT)]


def test_trained_tokenizer_loads_in_transformers(trained):
    transformers = pytest.importorskip("transformers")
    tok, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert "GPTNeoX" in type(hf).__name__
    assert hf.eos_token_id == hf.bos_token_id == 0 and hf.pad_token_id == 1
    text = "import os\nprint(os.getcwd())  # " + UNICODE_TEXT
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def _pile_line(text, name="Test"):
    return json.dumps({"text": text, "meta": {"pile_set_name": name}}) + "\n"


def test_reads_all_input_formats(tmp_path):
    lines = [_pile_line(f"document number {i} in the {fmt} shard", fmt) for i, fmt in enumerate("abc")]
    body = "".join(lines).encode()
    (tmp_path / "a.jsonl").write_bytes(body)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(body)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("a whole text file\nis one document\n")
    (tmp_path / "sub" / "ignored.md").write_text("not an input")

    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        docs = list(iter_documents(tmp_path / name))
        assert docs == [(f"document number {i} in the {fmt} shard", fmt) for i, fmt in enumerate("abc")]
    assert list(iter_documents(tmp_path / "sub" / "d.txt")) == [("a whole text file\nis one document\n", None)]
    assert "".join(open_text_lines(tmp_path / "c.jsonl.zst")) == body.decode()

    # a folder (recursive), a glob and a plain file all work; the .md file is not read
    tok = train_tokenizer([str(tmp_path / "sub"), str(tmp_path / "*.jsonl*")], 300, str(tmp_path / "tok"), 1)
    assert tok.decode(tok.encode("document number 2 in the c shard")) == "document number 2 in the c shard"
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def test_malformed_lines_are_skipped_and_counted(tmp_path, capsys):
    good = [_pile_line("the first good document"), _pile_line("the second good document")]
    bad = [
        "{not json\n",
        json.dumps({"meta": {}}) + "\n",
        json.dumps({"text": 42}) + "\n",
        json.dumps(["text"]) + "\n",
        "\n",
    ]
    body = (good[0] + "".join(bad) + good[1]).encode() + b'{"text": "\xff\xfe"}\n'
    path = tmp_path / "mixed.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(body))

    counter: Counter = Counter()
    docs = list(iter_documents(path, bad=counter))
    assert [t for t, _ in docs] == ["the first good document", "the second good document"]
    assert counter == Counter(invalid_json=1, missing_text=1, text_not_string=1, not_an_object=1, invalid_utf8=1)

    tok = train_tokenizer([str(path)], 300, str(tmp_path / "tok"), 1)
    assert tok.eod_id == 0
    assert "skipped 5 malformed lines" in capsys.readouterr().err


def test_truncated_shard_is_an_error_naming_it(tmp_path):
    path = tmp_path / "cut.jsonl.zst"
    body = "".join(_pile_line(f"document {i} " * 50) for i in range(200)).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(body)[:-20])
    with pytest.raises(NeoxrayError, match="cut.jsonl.zst"):
        train_tokenizer([str(path)], 300, str(tmp_path / "tok"))


# ----------------------------------------------------------------------------------------------------------- errors


def test_training_input_errors_name_the_input(tmp_path):
    with pytest.raises(NeoxrayError, match="nope.jsonl"):
        train_tokenizer([str(tmp_path / "nope.jsonl")], 300, str(tmp_path / "tok"))
    with pytest.raises(NeoxrayError, match=r"nothing-\*\.jsonl"):
        train_tokenizer([str(tmp_path / "nothing-*.jsonl")], 300, str(tmp_path / "tok"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeoxrayError, match="no training input files found in .*empty"):
        train_tokenizer([str(tmp_path / "empty")], 300, str(tmp_path / "tok"))
    (tmp_path / "only-bad.jsonl").write_text("{oops\n")
    with pytest.raises(NeoxrayError, match="no documents"):
        train_tokenizer([str(tmp_path / "only-bad.jsonl")], 300, str(tmp_path / "tok"))
    with pytest.raises(NeoxrayError, match="vocab_size"):
        train_tokenizer([str(tmp_path / "only-bad.jsonl")], 100, str(tmp_path / "tok"))


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


# --------------------------------------------------------------------------------------------------- bundled sample


def test_bundled_sample_is_valid_pile():
    assert SAMPLE.is_file()
    assert 100_000 < SAMPLE.stat().st_size < 3_000_000
    components: Counter = Counter()
    with zstandard.ZstdDecompressor().stream_reader(open(SAMPLE, "rb"), closefd=True) as r:
        for n, line in enumerate(io.TextIOWrapper(r, encoding="utf-8"), 1):
            obj = json.loads(line)
            assert set(obj) == {"text", "meta"}, f"line {n}"
            assert isinstance(obj["text"], str) and obj["text"].strip(), f"line {n}"
            assert isinstance(obj["meta"]["pile_set_name"], str), f"line {n}"
            components[obj["meta"]["pile_set_name"]] += 1
    assert len(components) >= 3, components
    assert sum(components.values()) >= 1000
    # the streaming reader agrees and finds nothing malformed
    bad: Counter = Counter()
    assert sum(1 for _ in iter_documents(SAMPLE, bad=bad)) == sum(components.values())
    assert not bad
