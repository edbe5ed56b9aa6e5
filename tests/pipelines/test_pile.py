"""The Pile reader (`neoxray.pipelines.pile`: bad rows counted by reason), paths and URIs through
`neoxray.pipelines.fs`, and the bundled sample corpus."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import zstandard

from neoxray.errors import NeoxrayError
from neoxray.pipelines import fs
from neoxray.pipelines.pile import iter_documents
from tests.conftest import SAMPLE
from tests.pipelines.conftest import pile_line


def test_pile_reader_counts_empty_text_and_missing_meta(tmp_path):
    body = (
        pile_line("kept")
        + json.dumps({"text": ""})
        + "\n"
        + json.dumps({"text": "no meta"})
        + "\n"
        + json.dumps({"text": "bad meta", "meta": "x"})
        + "\n"
        + '{"text": "\\ud800 lone surrogate"}\n'
    )
    (tmp_path / "a.jsonl").write_text(body)
    bad, labelled = Counter(), Counter()
    docs = list(iter_documents(tmp_path / "a.jsonl", bad=bad, labelled=labelled))
    assert docs == [("kept", "Test"), ("no meta", None), ("bad meta", None)]
    assert bad == Counter(empty_text=1, invalid_utf8=1)
    assert labelled == Counter(missing_meta=2)


def test_filesystem_uris_through_fsspec():
    """Non-local paths go through pyarrow / fsspec: listing folders and globs, and streaming zstd."""
    import fsspec

    mem = fsspec.filesystem("memory")
    with mem.open("/nx-test/corpus/a.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(pile_line("remote one").encode()))
    with mem.open("/nx-test/corpus/sub/b.jsonl", "wb") as f:
        f.write(pile_line("remote two", "Other").encode())
    assert fs.expand_inputs(["memory://nx-test/corpus"], (".jsonl", ".jsonl.zst")) == [
        "memory://nx-test/corpus/a.jsonl.zst",
        "memory://nx-test/corpus/sub/b.jsonl",
    ]
    assert fs.expand_inputs(["memory://nx-test/corpus/*.zst"], (".jsonl.zst",)) == [
        "memory://nx-test/corpus/a.jsonl.zst"
    ]
    assert list(iter_documents("memory://nx-test/corpus/a.jsonl.zst")) == [("remote one", "Test")]
    with pytest.raises(NeoxrayError, match="memory://nx-test/missing.jsonl"):
        fs.expand_inputs(["memory://nx-test/missing.jsonl"], (".jsonl",))


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
