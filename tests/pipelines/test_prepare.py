"""The data pipeline: `neoxray prepare` (Ray Data) checked against an independent computation with raw
`tokenizers`, its guarantees (determinism, no-op reruns, no half-finished datasets, clear errors), and the
training reader (deterministic order, disjoint dp shares, resume without replay, blending, Ray Train)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tokenizers
import zstandard

from neoxray.errors import NeoxrayError
from neoxray.pipelines import fs
from neoxray.pipelines.pile import iter_documents
from neoxray.pipelines.prepare import MANIFEST, prepare, token_dtype
from neoxray.pipelines.reader import (
    BatchSampler,
    BlendedDataset,
    PackedDataset,
    iter_batches,
    open_blend,
    permute,
    ray_dataset,
)
from tests.conftest import SAMPLE, SHARED_TOKENIZER, run_cli


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> str:
    """tokenizer.json: GPT-NeoX-20B's when ../shared has it, else a 1024-token BPE trained on the sample."""
    if SHARED_TOKENIZER.exists():
        return str(SHARED_TOKENIZER)
    from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer_from_files([str(SAMPLE)], 1024, str(out))
    return str(out / "tokenizer.json")


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
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_zst(path: Path, body: str) -> None:
    path.write_bytes(zstandard.ZstdCompressor().compress(body.encode("utf-8")))


# --------------------------------------------------------------------------------------------- Pile reader
def test_pile_reader_counts_empty_text_and_missing_meta(tmp_path):
    body = (pile_line("kept") + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "no meta"}) + "\n"
            + json.dumps({"text": "bad meta", "meta": "x"}) + "\n" + '{"text": "\\ud800 lone surrogate"}\n')
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
        "memory://nx-test/corpus/a.jsonl.zst", "memory://nx-test/corpus/sub/b.jsonl"]
    assert fs.expand_inputs(["memory://nx-test/corpus/*.zst"], (".jsonl.zst",)) == [
        "memory://nx-test/corpus/a.jsonl.zst"]
    assert list(iter_documents("memory://nx-test/corpus/a.jsonl.zst")) == [("remote one", "Test")]
    with pytest.raises(NeoxrayError, match="memory://nx-test/missing.jsonl"):
        fs.expand_inputs(["memory://nx-test/missing.jsonl"], (".jsonl",))


# ------------------------------------------------------------------------------------------- prepare: sample
@pytest.fixture(scope="module")
def sample_prepared(ray_local, tmp_path_factory, tok_file):
    out = tmp_path_factory.mktemp("prep") / "sample"
    result = prepare([str(SAMPLE)], tok_file, 256, str(out), val_fraction=0.05, workers=2, progress=False)
    return out, result.manifest


def test_prepare_sample_matches_raw_tokenizers(sample_prepared, tok_file):
    out, m = sample_prepared
    docs = sample_docs()
    raw = tokenizers.Tokenizer.from_file(tok_file)
    streams = expected_streams(docs, raw, 0.05)
    L = 257
    assert m["seq_len"] == 256 and m["row_length"] == L
    assert m["documents"] == len(docs) == 1410
    assert m["tokens"] == sum(len(s) for s in streams.values())
    assert m["bad_rows"] == {}
    assert m["dtype"] == token_dtype(raw.get_vocab_size()) == "uint16"
    # per component, with an independent tokenization
    comp: dict = {}
    for (text, name), enc in zip(docs, raw.encode_batch([t for t, _ in docs], add_special_tokens=False)):
        c = comp.setdefault(name, {"documents": 0, "tokens": 0})
        c["documents"] += 1
        c["tokens"] += len(enc.ids) + 1
    assert m["components"] == comp and set(comp) == {"Github", "Python-Docs", "Licenses"}
    assert m["tokenizer"]["vocab_size"] == raw.get_vocab_size() and m["tokenizer"]["eod_id"] == 0
    from neoxray.model.tokenizer import Tokenizer

    assert Tokenizer.load(out / "tokenizer").sha256 == m["tokenizer"]["sha256"]  # the dataset carries its tokenizer
    assert m["inputs"][0]["path"] == str(SAMPLE) and m["inputs"][0]["size"] == SAMPLE.stat().st_size
    assert m["options"]["seq_len"] == 256 and m["options"]["val_fraction"] == 0.05
    # packing: rows = floor(tokens / (N+1)) per file and split, and the rows are the stream, cut up
    for split in ("train", "validation"):
        stream = streams[(split, None)]
        rows = len(stream) // L
        assert m["splits"][split]["rows"] == rows > 0
        assert m["splits"][split]["dropped_tokens"] == len(stream) - rows * L <= 256
        assert m["splits"][split]["documents"] == sum(is_validation(t, 0.05) == (split == "validation")
                                                      for t, _ in docs)
        got = read_rows(out, m, split)
        assert list(got) == [(0, None)]
        assert np.array_equal(got[(0, None)].reshape(-1), stream[:rows * L])
        assert pq.read_schema(out / m["splits"][split]["files"][0]["path"]).field("input_ids").type.value_type \
            == "uint16"
    assert m["rows"] == m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------------------------------ prepare: crafted
@pytest.fixture(scope="module")
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
    bad_lines = ["{not json\n", json.dumps([1, 2]) + "\n", json.dumps({"meta": {}}) + "\n",
                 json.dumps({"text": 7}) + "\n", json.dumps({"text": ""}) + "\n", "\n"]
    for name, ds in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(pile_line(t, c) for t, c in ds)
        if name == "a.jsonl":  # bad rows between good ones, a row without meta, and invalid UTF-8
            body = body + "".join(bad_lines) + json.dumps({"text": "a document without meta"}) + "\n"
            path.write_bytes(body.encode("utf-8") + b'{"text": "\xff\xfe broken"}\n' + pile_line("last", "Test").encode())
            files[name] = ds + [("a document without meta", "unknown"), ("last", "Test")]
        elif name.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(body)
        else:
            write_zst(path, body)
    (root / "nested" / "notes.md").write_text("not an input")
    bad = {"invalid_json": 1, "not_an_object": 1, "missing_text": 1, "text_not_string": 1, "empty_text": 1,
           "invalid_utf8": 1, "missing_meta": 1}
    return root, files, bad


def test_prepare_crafted_inputs_glob_and_directory(ray_local, crafted, tok_file, tmp_path):
    root, files, bad = crafted
    out = tmp_path / "out"
    # a plain file, a glob and a directory (searched recursively; notes.md is ignored)
    result = prepare([str(root / "a.jsonl"), str(root / "nested" / "*.gz"), str(root / "nested" / "deeper")],
                     tok_file, 64, str(out), val_fraction=0.1, workers=2, chunk_bytes=200_000, rows_per_file=50,
                     progress=False)
    m = result.manifest
    assert [Path(i["path"]).name for i in m["inputs"]] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    assert m["bad_rows"] == bad
    raw = tokenizers.Tokenizer.from_file(tok_file)
    all_docs = [d for ds in files.values() for d in ds]
    assert m["documents"] == len(all_docs)
    assert m["components"]["unknown"]["documents"] == 1 and m["components"]["Big"]["documents"] == 1
    assert m["components"]["Big"]["tokens"] > 500_000
    for split in ("train", "validation"):
        got = read_rows(out, m, split)
        total_rows = 0
        for k, (name, ds) in enumerate(files.items()):
            stream = expected_streams(ds, raw, 0.1).get((split, None), np.zeros(0, np.int64))
            rows = len(stream) // 65
            total_rows += rows
            assert m["inputs"][k]["documents"] == len(ds)
            if rows:
                assert np.array_equal(got[(k, None)].reshape(-1), stream[:rows * 65]), (name, split)
            else:
                assert (k, None) not in got
        assert m["splits"][split]["rows"] == total_rows
    # several part files per stream, named deterministically
    assert len([f for f in m["splits"]["train"]["files"] if f["path"].startswith("train/part-00002-")]) > 1
    assert all(f["rows"] <= 50 for f in m["splits"]["train"]["files"])


def test_prepare_is_byte_identical_across_reruns_and_workers(ray_local, crafted, tok_file, tmp_path):
    root, _, _ = crafted
    a, b = tmp_path / "a", tmp_path / "b"
    prepare([str(root)], tok_file, 64, str(a), workers=1, rows_per_file=40, progress=False)
    prepare([str(root)], tok_file, 64, str(b), workers=3, rows_per_file=40, chunk_bytes=50_000, progress=False)
    ha, hb = tree_hashes(a), tree_hashes(b)
    assert ha == hb and len(ha) > 5
    assert (a / MANIFEST).is_file()


def test_by_component_packs_each_component_apart(ray_local, crafted, tok_file, tmp_path):
    root, files, _ = crafted
    out = tmp_path / "bc"
    m = prepare([str(root)], tok_file, 32, str(out), val_fraction=0.0, workers=2, by_component=True,
                progress=False).manifest
    raw = tokenizers.Tokenizer.from_file(tok_file)
    got = read_rows(out, m, "train")
    expected_rows = 0
    for k, ds in enumerate(files.values()):
        for (split, comp), stream in expected_streams(ds, raw, 0.0, by_component=True).items():
            rows = len(stream) // 33
            expected_rows += rows
            if rows:
                assert np.array_equal(got[(k, comp)].reshape(-1), stream[:rows * 33])
    assert m["splits"]["train"]["rows"] == expected_rows
    gh = PackedDataset(str(out), component="Github")
    assert len(gh) == sum(len(v) for (k, c), v in got.items() if c == "Github")
    assert PackedDataset(str(out)).components == sorted({c for _, c in got})
    with pytest.raises(NeoxrayError, match="Nope.*available"):
        PackedDataset(str(out), component="Nope")


def test_rerun_is_a_noop_overwrite_rebuilds_and_conflicts_are_errors(ray_local, crafted, tok_file, tmp_path):
    root, _, _ = crafted
    out = tmp_path / "out"
    inputs = [str(root / "a.jsonl")]
    first = prepare(inputs, tok_file, 64, str(out), workers=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare(inputs, tok_file, 64, str(out), workers=2, progress=False)
    assert again.skipped and again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(NeoxrayError, match="other inputs or options.*--overwrite"):
        prepare(inputs, tok_file, 32, str(out), workers=1, progress=False)
    # stale leftovers of a run that was killed are cleaned up by the next one
    (out / ".tmp-deadbeef" / "train").mkdir(parents=True)
    (out / ".tmp-deadbeef" / "train" / "part-00000-00000.parquet").write_bytes(b"half")
    rebuilt = prepare(inputs, tok_file, 32, str(out), workers=1, overwrite=True, progress=False)
    assert not rebuilt.skipped and rebuilt.manifest["seq_len"] == 32
    assert json.loads((out / MANIFEST).read_text())["seq_len"] == 32
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "tokenizer", "train", "validation"]
    assert all(f.name.endswith(".parquet") for f in (out / "train").iterdir())


def test_failed_run_leaves_no_manifest_and_keeps_the_old_dataset(ray_local, crafted, tok_file, tmp_path):
    root, _, _ = crafted
    cut = tmp_path / "zz-cut.jsonl.zst"
    cut.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(pile_line(f"document {i} " * 40) for i in range(400)).encode())[:-20])
    fresh = tmp_path / "fresh"
    with pytest.raises(NeoxrayError, match="zz-cut.jsonl.zst.*truncated"):
        prepare([str(root / "a.jsonl"), str(root / "nested" / "b.jsonl.gz"), str(cut)], tok_file, 64, str(fresh),
                workers=2, progress=False)
    assert not (fresh / MANIFEST).exists()
    assert not list(fresh.glob("*/*.parquet")) and not list(fresh.glob(".tmp*"))
    # over a finished dataset, a failing --overwrite run leaves the old one intact
    done = tmp_path / "done"
    prepare([str(root / "a.jsonl")], tok_file, 64, str(done), workers=1, progress=False)
    before = tree_hashes(done)
    with pytest.raises(NeoxrayError, match="zz-cut"):
        prepare([str(root / "a.jsonl"), str(cut)], tok_file, 64, str(done), workers=1, overwrite=True,
                progress=False)
    assert tree_hashes(done) == before


def test_uri_paths_give_the_same_dataset(ray_local, crafted, tok_file, tmp_path):
    """file:// URIs take the pyarrow-filesystem code path (as s3:// and gs:// do) and give the same rows."""
    root, _, _ = crafted
    local, remote = tmp_path / "local", tmp_path / "remote"
    prepare([str(root / "a.jsonl"), str(root / "nested" / "b.jsonl.gz")], tok_file, 64, str(local), workers=1,
            progress=False)
    m = prepare([f"file://{root}/a.jsonl", f"file://{root}/nested/*.gz"], tok_file, 64, f"file://{remote}",
                workers=2, progress=False).manifest
    assert m["inputs"][0]["path"] == f"file://{root}/a.jsonl"
    parts = {k: v for k, v in tree_hashes(local).items() if k != MANIFEST}
    assert parts == {k: v for k, v in tree_hashes(remote).items() if k != MANIFEST} and parts
    a, b = PackedDataset(str(local)), PackedDataset(f"file://{remote}")
    assert np.array_equal(a.take(np.arange(len(a))), b.take(np.arange(len(b))))


def test_input_errors_name_the_input(tok_file, tmp_path):
    with pytest.raises(NeoxrayError, match="nope.jsonl.zst: no such file"):
        prepare([str(tmp_path / "nope.jsonl.zst")], tok_file, 64, str(tmp_path / "o"))
    with pytest.raises(NeoxrayError, match=r"nothing-\*\.jsonl: the pattern matches no files"):
        prepare([str(tmp_path / "nothing-*.jsonl")], tok_file, 64, str(tmp_path / "o"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(NeoxrayError, match="x.txt: unsupported file type"):
        prepare([str(tmp_path / "x.txt")], tok_file, 64, str(tmp_path / "o"))
    with pytest.raises(NeoxrayError, match="seq-len"):
        prepare([str(tmp_path / "x.txt")], tok_file, 0, str(tmp_path / "o"))
    with pytest.raises(NeoxrayError, match="val-fraction"):
        prepare([str(tmp_path / "x.txt")], tok_file, 8, str(tmp_path / "o"), val_fraction=1.0)


def test_large_vocabularies_are_stored_as_int32(ray_local, tmp_path):
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "in.jsonl").write_text(pile_line("w69999 w1 w65600 zzz") * 5)
    m = prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "big.json"), 4, str(tmp_path / "o"), val_fraction=0,
                workers=1, progress=False).manifest
    assert m["dtype"] == "int32" and m["rows"] == 5
    rows = PackedDataset(str(tmp_path / "o")).take(np.arange(5))
    assert rows.dtype == np.int32
    assert rows[0].tolist() == [70001, 3, 65602, 1, 0]


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_prepare_runs_and_errors_are_one_line(ray_local, crafted, tok_file, tmp_path, monkeypatch):
    root, _, _ = crafted
    # the CLI joins the test's cluster, as it does when it runs as a Ray job entrypoint
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    out = tmp_path / "cli"
    proc = run_cli("prepare", "--input", str(root / "a.jsonl"), "--tokenizer", tok_file, "--seq-len", "64",
                   "--output", str(out), "--workers", "1", "--json")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(out) and not summary["skipped"] and summary["rows"] > 0
    assert "documents" in proc.stderr and "tokens/s" in proc.stderr  # progress and the final rate
    assert json.loads((out / MANIFEST).read_text())["rows"] == summary["rows"]
    again = run_cli("prepare", "--input", str(root / "a.jsonl"), "--tokenizer", tok_file, "--seq-len", "64",
                    "--output", str(out))
    assert "nothing to do" in again.stderr
    missing = run_cli("prepare", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", tok_file,
                      "--seq-len", "64", "--output", str(tmp_path / "o"), check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing.jsonl" in lines[0], missing.stderr


def test_interrupted_cli_run_leaves_nothing_that_looks_finished(ray_local, tok_file, tmp_path):
    """Ctrl-C (SIGINT) in the middle of a run: no manifest, no temporary folder left behind."""
    src = tmp_path / "big.jsonl"
    src.write_text("".join(pile_line(t, c) for t, c in sample_docs()[:600]))
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("neoxray")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([str(exe), "prepare", "--input", str(src), "--tokenizer", tok_file, "--seq-len", "64",
                             "--output", str(out), "--workers", "1"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob(".tmp-*/chunks/*.arrow")):
        time.sleep(0.1)
    assert list(out.glob(".tmp-*/chunks/*.arrow")), "the run never started tokenizing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (out / MANIFEST).exists()
    assert not list(out.glob(".tmp-*")), err


# --------------------------------------------------------------------------------------------------- reader
@pytest.fixture(scope="module")
def small(ray_local, crafted, tok_file, tmp_path_factory):
    """A prepared dataset of a few hundred rows, with components packed apart, and its row count."""
    root, _, _ = crafted
    out = tmp_path_factory.mktemp("reader") / "ds"
    prepare([str(root / "a.jsonl"), str(root / "nested" / "b.jsonl.gz")], tok_file, 16, str(out), val_fraction=0.1,
            workers=2, by_component=True, rows_per_file=2048, progress=False)
    return str(out)


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 100, 1000, 4097, 65_537):
        p = permute(np.arange(n), n, key=12345)
        assert np.array_equal(np.sort(p), np.arange(n))
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))


def test_order_is_deterministic_and_each_epoch_covers_every_row_once(small):
    data = PackedDataset(small)
    n = len(data)
    assert n > 100
    order = BlendedDataset([data], seed=7)
    _, rows = order.locate(np.arange(3 * n))
    for e in range(3):
        assert np.array_equal(np.sort(rows[e * n:(e + 1) * n]), np.arange(n))
    assert not np.array_equal(rows[:n], rows[n:2 * n])  # a new shuffle every epoch
    _, again = BlendedDataset([PackedDataset(small)], seed=7).locate(np.arange(3 * n))
    assert np.array_equal(rows, again)
    _, other = BlendedDataset([data], seed=8).locate(np.arange(n))
    assert not np.array_equal(rows[:n], other)
    assert np.array_equal(order.take([5, 0]), data.take(rows[[5, 0]]))


def test_dp_ranks_get_disjoint_shares_of_each_global_batch(small):
    G, D = 12, 3
    per_rank = [list(iter_batches(small, G, dp_rank=r, dp_size=D, micro_batch_size=2, seed=1, num_steps=4,
                                  as_torch=False)) for r in range(D)]
    whole = BlendedDataset([PackedDataset(small)], seed=1)
    for step in range(4):
        seen = []
        for r in range(D):
            micro = [b for b in per_rank[r] if b["step"] == step]
            assert len(micro) == G // D // 2 and all(len(b["sample_idx"]) == 2 for b in micro)
            idx = np.concatenate([b["sample_idx"] for b in micro])
            assert np.array_equal(idx, np.arange(step * G + r * G // D, step * G + (r + 1) * G // D))
            rows = whole.take(idx)
            assert np.array_equal(np.concatenate([b["input_ids"] for b in micro]), rows[:, :-1])
            assert np.array_equal(np.concatenate([b["labels"] for b in micro]), rows[:, 1:])
            seen.extend(idx.tolist())
        assert sorted(seen) == list(range(step * G, (step + 1) * G))
    t = next(iter_batches(small, G, dp_rank=0, dp_size=D, seed=1, num_steps=1))
    assert t["input_ids"].dtype.is_floating_point is False and tuple(t["input_ids"].shape) == (4, 16)


def test_resume_continues_without_replay(small, monkeypatch):
    G = 8
    full = list(iter_batches(small, G, dp_rank=1, dp_size=2, micro_batch_size=2, seed=3, num_steps=6,
                             as_torch=False))
    data = PackedDataset(small)
    read: list = []
    original = PackedDataset.take

    def spy(self, rows):
        read.extend(np.asarray(rows).tolist())
        return original(self, rows)

    monkeypatch.setattr(PackedDataset, "take", spy)
    tail = list(iter_batches(data, G, dp_rank=1, dp_size=2, micro_batch_size=2, seed=3, consumed_samples=4 * G,
                             num_steps=2, as_torch=False))
    assert len(tail) == 4 and [b["step"] for b in tail] == [4, 4, 5, 5]
    for a, b in zip(full[-4:], tail):
        assert np.array_equal(a["sample_idx"], b["sample_idx"]) and np.array_equal(a["input_ids"], b["input_ids"])
    # only the rows of the resumed samples were read, none of the skipped ones
    _, wanted = BlendedDataset([data], seed=3).locate(np.concatenate([b["sample_idx"] for b in tail]))
    assert sorted(read) == sorted(wanted.tolist())
    with pytest.raises(NeoxrayError, match="multiple of the global batch"):
        BatchSampler(G, consumed_samples=5)


def test_blend_follows_its_weights_in_every_prefix(small):
    comps = {c: PackedDataset(small, component=c) for c in ("Github", "Python-Docs")}
    blend = BlendedDataset(list(comps.values()), weights=[0.7, 0.3], seed=0)
    draws = int(max(len(comps["Github"]) / 0.7, len(comps["Python-Docs"]) / 0.3)) + 100  # a full epoch of each
    ds, rows = blend.locate(np.arange(draws))
    counts = np.cumsum(np.stack([ds == 0, ds == 1], axis=1), axis=0)
    n = np.arange(1, draws + 1)[:, None]
    assert np.abs(counts - n * np.array([0.7, 0.3])).max() <= 1.0
    # each dataset walks its own shuffled epochs: its first len(d) draws cover it exactly once
    for d, (name, data) in enumerate(comps.items()):
        mine = rows[ds == d][:len(data)]
        assert np.array_equal(np.sort(mine), np.arange(len(data))), name
    same = open_blend([f"{small}#Github", f"{small}#Python-Docs"], weights=[7, 3], seed=0)
    assert np.array_equal(same.locate(np.arange(1000))[1], rows[:1000])
    batch = next(iter_batches(blend, 10, num_steps=1, as_torch=False))
    assert np.array_equal(batch["input_ids"], blend.take(np.arange(10))[:, :-1])


def test_reader_errors(small, tmp_path):
    with pytest.raises(NeoxrayError, match="not a prepared dataset"):
        PackedDataset(str(tmp_path))
    with pytest.raises(NeoxrayError, match="not divisible"):
        BatchSampler(10, dp_rank=0, dp_size=3)
    with pytest.raises(NeoxrayError, match="dp rank"):
        BatchSampler(12, dp_rank=3, dp_size=3)


# ------------------------------------------------------------------------------------------ Ray Data / Train
def _train_loop(config):
    import ray.train

    from neoxray.pipelines.reader import iter_batches

    rank = ray.train.get_context().get_world_rank()
    # layout A: 2 data-parallel replicas; layout B: 1 replica split over 2 tensor-parallel peers (dp rank 0)
    dp = [b["sample_idx"].tolist() for b in iter_batches(config["path"], 8, dp_rank=rank, dp_size=2,
                                                          seed=5, num_steps=3)]
    tp = [b["input_ids"].sum().item() for b in iter_batches(config["path"], 8, dp_rank=0, dp_size=1, seed=5,
                                                             num_steps=3)]
    shard_rows = []
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=16):
        assert batch["input_ids"].shape[1] == config["seq_len"]
        assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
        shard_rows.extend(batch["input_ids"][:, :4].tolist())
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"dp": dp, "tp": tp, "shard": shard_rows}))


def test_ray_train_workers_get_their_shares(ray_local, small, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = PackedDataset(small)
    ds = ray_dataset(small)
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"path": small, "out": str(tmp_path), "seq_len": data.seq_len},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False), datasets={"train": ds},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="data"))
    trainer.fit()
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):  # the explicit per-replica split: rank r's samples of each global batch
        assert got[r]["dp"] == [list(range(s * 8 + r * 4, s * 8 + r * 4 + 4)) for s in range(3)]
    assert got[0]["tp"] == got[1]["tp"]  # peers of one replica get identical batches
    # get_dataset_shard: disjoint shares that together are every row once (Ray's equal split may leave out
    # up to workers - 1 rows so that the shards have the same length)
    shard = [tuple(r) for g in got for r in g["shard"]]
    every = Counter(tuple(r) for r in data.take(np.arange(len(data)))[:, :4].tolist())
    assert len(data) - 1 <= len(shard) <= len(data)
    assert not Counter(shard) - every, "a row that is not in the dataset, or one given twice"
