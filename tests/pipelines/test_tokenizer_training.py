"""Training a tokenizer from files and shards (`neoxray.pipelines.tokenizer_training`): every input format, the
trained tokenizer's special ids, round trip and transformers loading, malformed lines skipped and counted, and
errors that name the input."""

from __future__ import annotations

import gzip
import io
import json
import unicodedata
from collections import Counter

import pytest
import zstandard

from neoxray.errors import NeoxrayError
from neoxray.model.tokenizer import EOD_TOKEN, PAD_TOKEN, Tokenizer
from neoxray.pipelines.pile import iter_documents, open_text_lines
from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files as train_tokenizer
from tests.conftest import SAMPLE
from tests.pipelines.conftest import pile_line

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


def test_reads_all_input_formats(tmp_path):
    lines = [pile_line(f"document number {i} in the {fmt} shard", fmt) for i, fmt in enumerate("abc")]
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
    good = [pile_line("the first good document"), pile_line("the second good document")]
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
    body = "".join(pile_line(f"document {i} " * 50) for i in range(200)).encode()
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
