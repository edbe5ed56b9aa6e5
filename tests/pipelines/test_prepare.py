"""`neoxray prepare` (Ray Data) checked against an independent computation with raw `tokenizers`, and its
guarantees: determinism, no-op reruns, no half-finished datasets (failed or interrupted runs), clear errors,
the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tokenizers
import zstandard

from neoxray.errors import NeoxrayError
from neoxray.pipelines.dataset_format import MANIFEST, token_dtype
from neoxray.pipelines.packed_dataset import PackedDataset
from neoxray.pipelines.prepare import prepare
from tests.conftest import SAMPLE, run_cli, run_here
from tests.pipelines.conftest import (
    expected_streams,
    first_two,
    is_validation,
    pile_line,
    read_rows,
    sample_docs,
    tree_hashes,
)


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
    assert m["content"] == "text" and m["loss_tokens"] == m["tokens"]  # every token of a text is trained
    assert m["dtype"] == token_dtype(raw.get_vocab_size()) == "uint16"
    # per component, with an independent tokenization
    comp: dict = {}
    for (_text, name), enc in zip(docs, raw.encode_batch([t for t, _ in docs], add_special_tokens=False)):
        c = comp.setdefault(name, {"documents": 0, "tokens": 0, "loss_tokens": 0})
        c["documents"] += 1
        c["tokens"] += len(enc.ids) + 1
        c["loss_tokens"] += len(enc.ids) + 1  # text: every token is trained
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
        assert m["splits"][split]["documents"] == sum(
            is_validation(t, 0.05) == (split == "validation") for t, _ in docs
        )
        got = read_rows(out, m, split)
        assert list(got) == [(0, None)]
        assert np.array_equal(got[(0, None)].reshape(-1), stream[: rows * L])
        assert (
            pq.read_schema(out / m["splits"][split]["files"][0]["path"]).field("input_ids").type.value_type == "uint16"
        )
    assert m["rows"] == m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"]
    assert m["trained_labels"] == m["rows"] * 256
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------------------------------ prepare: crafted
def test_prepare_crafted_inputs_glob_and_directory(ray_local, crafted, tok_file, tmp_path):
    root, files, bad = crafted
    out = tmp_path / "out"
    # a plain file, a glob and a directory (searched recursively; notes.md is ignored)
    result = prepare(
        [str(root / "a.jsonl"), str(root / "nested" / "*.gz"), str(root / "nested" / "deeper")],
        tok_file,
        64,
        str(out),
        val_fraction=0.1,
        workers=2,
        chunk_bytes=200_000,
        rows_per_file=50,
        progress=False,
    )
    m = result.manifest
    assert [Path(i["path"]).name for i in m["inputs"]] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    assert m["bad_rows"] == {k: v for k, v in bad.items() if k != "missing_meta"}  # dropped rows only
    assert m["documents_without_component"] == bad["missing_meta"] == 1  # kept, reported apart
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
                assert np.array_equal(got[(k, None)].reshape(-1), stream[: rows * 65]), (name, split)
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
    m = prepare(
        [str(root)], tok_file, 32, str(out), val_fraction=0.0, workers=2, by_component=True, progress=False
    ).manifest
    raw = tokenizers.Tokenizer.from_file(tok_file)
    got = read_rows(out, m, "train")
    expected_rows = 0
    for k, ds in enumerate(files.values()):
        for (_split, comp), stream in expected_streams(ds, raw, 0.0, by_component=True).items():
            rows = len(stream) // 33
            expected_rows += rows
            if rows:
                assert np.array_equal(got[(k, comp)].reshape(-1), stream[: rows * 33])
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
    cut.write_bytes(
        zstandard.ZstdCompressor().compress("".join(pile_line(f"document {i} " * 40) for i in range(400)).encode())[
            :-20
        ]
    )
    fresh = tmp_path / "fresh"
    with pytest.raises(NeoxrayError, match="zz-cut.jsonl.zst.*truncated"):
        prepare(
            [*first_two(root), str(cut)],
            tok_file,
            64,
            str(fresh),
            workers=2,
            progress=False,
        )
    assert not (fresh / MANIFEST).exists()
    assert not list(fresh.glob("*/*.parquet")) and not list(fresh.glob(".tmp*"))
    # over a finished dataset, a failing --overwrite run leaves the old one intact
    done = tmp_path / "done"
    prepare([str(root / "a.jsonl")], tok_file, 64, str(done), workers=1, progress=False)
    before = tree_hashes(done)
    with pytest.raises(NeoxrayError, match="zz-cut"):
        prepare([str(root / "a.jsonl"), str(cut)], tok_file, 64, str(done), workers=1, overwrite=True, progress=False)
    assert tree_hashes(done) == before


def test_uri_paths_give_the_same_dataset(ray_local, crafted, tok_file, tmp_path):
    """file:// URIs take the pyarrow-filesystem code path (as s3:// and gs:// do) and give the same rows."""
    root, _, _ = crafted
    local, remote = tmp_path / "local", tmp_path / "remote"
    prepare(
        first_two(root),
        tok_file,
        64,
        str(local),
        workers=1,
        progress=False,
    )
    m = prepare(
        [f"file://{root}/a.jsonl", f"file://{root}/nested/*.gz"],
        tok_file,
        64,
        f"file://{remote}",
        workers=2,
        progress=False,
    ).manifest
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
    m = prepare(
        [str(tmp_path / "in.jsonl")],
        str(tmp_path / "big.json"),
        4,
        str(tmp_path / "o"),
        val_fraction=0,
        workers=1,
        progress=False,
    ).manifest
    assert m["dtype"] == "int32" and m["rows"] == 5
    rows = PackedDataset(str(tmp_path / "o")).take(np.arange(5))
    assert rows.dtype == np.int32
    assert rows[0].tolist() == [70001, 3, 65602, 1, 0]


# ------------------------------------------------------------------------------------------------------ CLI
def prepare_argv(source, tokenizer, output, *more: str, seq_len: int = 64) -> list[str]:
    """`neoxray prepare`'s arguments: one input, a tokenizer, a --seq-len and an output, then `more`."""
    return [
        "prepare",
        *("--input", str(source), "--tokenizer", str(tokenizer), "--seq-len", str(seq_len), "--output", str(output)),
        *more,
    ]


def test_cli_prepare_runs_and_errors_are_one_line(ray_local, crafted, tok_file, tmp_path, monkeypatch):
    root, _, _ = crafted
    # the CLI joins the test's cluster, as it does when it runs as a Ray job entrypoint
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    out = tmp_path / "cli"
    proc = run_cli(*prepare_argv(root / "a.jsonl", tok_file, out, "--workers", "1", "--json"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(out) and not summary["skipped"] and summary["rows"] > 0
    assert "documents" in proc.stderr and "tokens/s" in proc.stderr  # progress and the final rate
    # a newcomer sees neoxray's own lines only: no Ray line that reads like a failure (such as the core worker's
    # error about actors that may restart with constructor arguments in the object store)
    foreign = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("prepare: ")]
    assert not foreign, proc.stderr
    assert json.loads((out / MANIFEST).read_text())["rows"] == summary["rows"]
    # the same command again, and with a missing input, in this process
    again = run_here(*prepare_argv(root / "a.jsonl", tok_file, out))
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    missing = run_here(*prepare_argv(tmp_path / "missing.jsonl", tok_file, tmp_path / "o"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing.jsonl" in lines[0], missing.stderr


def test_a_corrupt_input_is_one_line_not_buried_in_rays_retry_output(ray_local, sample_tokenizer_dir, tmp_path):
    """A truncated .zst shard: the CLI's error names the file in one line; no traceback, no retry report."""
    shard = tmp_path / "truncated.jsonl.zst"
    shard.write_bytes(SAMPLE.read_bytes()[:200_000])
    proc = run_cli(
        *prepare_argv(shard, sample_tokenizer_dir, tmp_path / "out", seq_len=32),
        check=False,
        env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Failed to apply UDF" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("neoxray: error:")]
    assert errors == [
        f"neoxray: error: {shard}: corrupt or truncated file (compressed file ended before the "
        f"end-of-frame marker was reached)"
    ]
    assert not (tmp_path / "out" / MANIFEST).exists()


# `neoxray prepare` in a process of its own, as the console script runs it, with one change: after the first
# tokenized chunk reaches the driver (its progress update), it writes a marker file and then waits for the test's
# SIGINT. The signal thus arrives in the middle of the run however fast the machine is: chunks are tokenized and
# written to DIR/.tmp-*/chunks/, and nothing is packed or committed yet.
STOP_AFTER_FIRST_CHUNK = """
import sys
import time
from pathlib import Path

from neoxray import cli
from neoxray.pipelines import prepare

marker = Path(sys.argv[1])
update = prepare._Progress.update


def update_then_wait(self, docs, nbytes, tokens, force=False):
    update(self, docs, nbytes, tokens, force)
    marker.write_text(f"{self.docs} documents tokenized")
    while True:  # until SIGINT (KeyboardInterrupt) ends the run
        time.sleep(0.05)


prepare._Progress.update = update_then_wait
sys.exit(cli.main(sys.argv[2:]))
"""


def test_interrupted_cli_run_leaves_nothing_that_looks_finished(ray_local, tok_file, tmp_path):
    """Ctrl-C (SIGINT) in the middle of a run: no manifest, no temporary folder left behind."""
    src = tmp_path / "big.jsonl"
    src.write_text("".join(pile_line(t, c) for t, c in sample_docs()[:600]))
    out = tmp_path / "out"
    driver, marker, log = tmp_path / "prepare_driver.py", tmp_path / "in-the-middle", tmp_path / "stderr.log"
    driver.write_text(STOP_AFTER_FIRST_CHUNK)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(driver), str(marker), *prepare_argv(src, tok_file, out, "--workers", "1")],
            env=env,
            stderr=stderr,
            text=True,
            # as a terminal's Ctrl-C finds it: a test runner started in the background (`make test &` from a
            # script) hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 300  # only a guard against a hang: the loop ends on the marker
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"no chunk was tokenized (exit code {proc.poll()}):\n{log.read_text()[-4000:]}"
        assert proc.poll() is None, log.read_text()[-4000:]
        assert list(out.glob(".tmp-*/chunks/*.arrow")), "the run never started tokenizing"
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"prepare did not stop after SIGINT:\n{log.read_text()[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode != 0
    assert not (out / MANIFEST).exists()
    assert not list(out.glob(".tmp-*")), err
