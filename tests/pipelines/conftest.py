"""Shared by the tests of `neoxray.pipelines`: the tokenizer the data is prepared with, crafted inputs, a small
prepared dataset, and helpers that compute what `neoxray prepare` should write without neoxray's code (raw
`tokenizers`, `zstandard`, `pyarrow`). Helpers are imported as `from tests.pipelines.conftest import ...`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tokenizers
import zstandard

from neoxray.pipelines.prepare import prepare
from tests.conftest import ROOT, SAMPLE, SHARED_TOKENIZER

INSTRUCTIONS = ROOT / "neoxray" / "pipelines" / "sample" / "instructions.jsonl"


# ------------------------------------------------------------------------------------------------ helpers
def pile_line(text, name="Test") -> str:
    return json.dumps({"text": text, "meta": {"pile_set_name": name}}) + "\n"


def sample_docs() -> list[tuple[str, str]]:
    """The bundled sample, read without neoxray's reader."""
    with zstandard.ZstdDecompressor().stream_reader(open(SAMPLE, "rb"), closefd=True) as r:
        return [(o["text"], o["meta"]["pile_set_name"]) for o in map(json.loads, io.TextIOWrapper(r, "utf-8"))]


def is_validation(text: str, val_fraction: float) -> bool:
    digest = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return digest < round(val_fraction * 2**64)


def expected_streams(docs, raw: tokenizers.Tokenizer, val_fraction: float, by_component=False) -> dict:
    """{(split, component or None): token stream with EOD after each document}, computed with raw tokenizers."""
    eod = raw.token_to_id("<|endoftext|>")
    streams: dict = {}
    for (text, comp), enc in zip(docs, raw.encode_batch([t for t, _ in docs], add_special_tokens=False)):
        key = ("validation" if is_validation(text, val_fraction) else "train", comp if by_component else None)
        streams.setdefault(key, []).extend(enc.ids + [eod])
    return {k: np.array(v, dtype=np.int64) for k, v in streams.items()}


def pc_line(prompt, completion, name="Test") -> str:
    return json.dumps({"prompt": prompt, "completion": completion, "meta": {"pile_set_name": name}}) + "\n"


def instruction_docs() -> list[tuple[str, str, str]]:
    """The bundled prompt-completion sample as (prompt, completion, component), read without neoxray's reader."""
    with open(INSTRUCTIONS, encoding="utf-8") as f:
        return [(o["prompt"], o["completion"], o["meta"]["pile_set_name"]) for o in map(json.loads, f)]


def expected_pc_streams(docs, raw: tokenizers.Tokenizer, val_fraction: float, by_component=False) -> dict:
    """{(split, component or None): (ids, mask)} of prompt-completion documents, computed with raw tokenizers:
    prompt ids (mask 0), completion ids and EOD (mask 1), the split by the hash of prompt + completion."""
    eod = raw.token_to_id("<|endoftext|>")
    streams: dict = {}
    for prompt, completion, comp in docs:
        p, c = (raw.encode(t, add_special_tokens=False).ids if t else [] for t in (prompt, completion))
        key = (
            "validation" if is_validation(prompt + completion, val_fraction) else "train",
            comp if by_component else None,
        )
        ids, mask = streams.setdefault(key, ([], []))
        ids.extend(p + c + [eod])
        mask.extend([0] * len(p) + [1] * (len(c) + 1))
    return {k: (np.array(i, dtype=np.int64), np.array(m, dtype=np.uint8)) for k, (i, m) in streams.items()}


def read_masked_rows(out: Path, manifest: dict, split: str) -> dict:
    """{(input file index, component): (ids [n, N+1], masks [n, N+1])} read straight from the Parquet files."""
    got: dict = {}
    L = manifest["row_length"]
    for entry in manifest["splits"][split]["files"]:
        table = pq.read_table(out / entry["path"])
        assert table.schema.names == ["input_ids", "loss_mask", "trained_labels"]
        assert str(table.schema.field("loss_mask").type.value_type) == "uint8"
        ids = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(-1, L)
        masks = table.column("loss_mask").combine_chunks().flatten().to_numpy().reshape(-1, L)
        assert np.array_equal(table.column("trained_labels").to_numpy(), masks[:, 1:].sum(axis=1))
        assert ids.shape == masks.shape == (entry["rows"], L)
        key = (int(Path(entry["path"]).name.split("-")[1]), entry["component"])
        old = got.get(key, (ids[:0], masks[:0]))
        got[key] = (np.concatenate([old[0], ids]), np.concatenate([old[1], masks]))
    return got


def read_rows(out: Path, manifest: dict, split: str) -> dict:
    """{(input file index, component): rows [n, N+1]} read straight from the Parquet files of the manifest."""
    got: dict = {}
    for entry in manifest["splits"][split]["files"]:
        table = pq.read_table(out / entry["path"])
        assert table.schema.names == ["input_ids"]
        rows = table.column(0).combine_chunks().flatten().to_numpy().reshape(-1, manifest["row_length"])
        assert rows.shape == (entry["rows"], manifest["seq_len"] + 1)
        file_idx = int(Path(entry["path"]).name.split("-")[1])
        key = (file_idx, entry["component"])
        got[key] = np.concatenate([got[key], rows]) if key in got else rows
    return got


def tree_hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def first_two(root: Path) -> list[str]:
    """The first two of the crafted inputs (`crafted`): a.jsonl and nested/b.jsonl.gz."""
    return [str(root / "a.jsonl"), str(root / "nested" / "b.jsonl.gz")]


def write_zst(path: Path, body: str) -> None:
    path.write_bytes(zstandard.ZstdCompressor().compress(body.encode("utf-8")))


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tok_file(tmp_path_factory) -> str:
    """tokenizer.json: GPT-NeoX-20B's when ../shared has it, else a 1024-token BPE trained on the sample."""
    if SHARED_TOKENIZER.exists():
        return str(SHARED_TOKENIZER)
    from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer_from_files([str(SAMPLE)], 1024, str(out))
    return str(out / "tokenizer.json")


@pytest.fixture(scope="session")
def crafted(tmp_path_factory):
    """Inputs in every format, with bad rows of each kind, a missing meta and a 3 MB document.

    Returns (root, {file name: [(text, component)] of its good documents}, expected bad-row counts)."""
    root = tmp_path_factory.mktemp("crafted")
    docs = sample_docs()
    big = "".join(t for t, _ in docs[:400])[:3_000_000]
    files = {
        "a.jsonl": docs[0:40],
        "nested/b.jsonl.gz": docs[40:90],
        "nested/deeper/c.jsonl.zst": docs[90:150] + [(big, "Big")],
    }
    bad_lines = [
        "{not json\n",
        json.dumps([1, 2]) + "\n",
        json.dumps({"meta": {}}) + "\n",
        json.dumps({"text": 7}) + "\n",
        json.dumps({"text": ""}) + "\n",
        "\n",
    ]
    for name, ds in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(pile_line(t, c) for t, c in ds)
        if name == "a.jsonl":  # bad rows between good ones, a row without meta, and invalid UTF-8
            body = body + "".join(bad_lines) + json.dumps({"text": "a document without meta"}) + "\n"
            broken = b'{"text": "\xff\xfe broken"}\n'
            path.write_bytes(body.encode("utf-8") + broken + pile_line("last", "Test").encode())
            files[name] = ds + [("a document without meta", "unknown"), ("last", "Test")]
        elif name.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(body)
        else:
            write_zst(path, body)
    (root / "nested" / "notes.md").write_text("not an input")
    bad = {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_text": 1,
        "text_not_string": 1,
        "empty_text": 1,
        "invalid_utf8": 1,
        "missing_meta": 1,
    }
    return root, files, bad


@pytest.fixture(scope="module")
def small(ray_local, crafted, tok_file, tmp_path_factory):
    """A prepared dataset of a few hundred rows, with components packed apart, and its row count."""
    root, _, _ = crafted
    out = tmp_path_factory.mktemp("reader") / "ds"
    prepare(
        first_two(root),
        tok_file,
        16,
        str(out),
        val_fraction=0.1,
        workers=2,
        by_component=True,
        rows_per_file=2048,
        progress=False,
    )
    return str(out)
