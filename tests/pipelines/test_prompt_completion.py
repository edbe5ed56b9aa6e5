"""Instruction data: `neoxray prepare --format prompt-completion` (prompt and completion keys -> rows with a per-token
loss mask that trains only the completion and its EOD), checked against raw `tokenizers`; the packing of masks;
the training reader's `loss_mask`; the bundled licence-clean sample."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tokenizers

from neoxray.errors import NeoxrayError
from neoxray.pipelines.dataset_format import MANIFEST
from neoxray.pipelines.packed_dataset import PackedDataset, ray_dataset
from neoxray.pipelines.packing import ChunkStreams, pack_file
from neoxray.pipelines.pile import PROMPT_COMPLETION_BAD_ROW_REASONS, iter_prompt_completions
from neoxray.pipelines.prepare import prepare
from neoxray.pipelines.reader import BlendedDataset, iter_batches
from tests.conftest import ROOT, run_cli, run_here
from tests.pipelines.conftest import (
    INSTRUCTIONS,
    expected_pc_streams,
    instruction_docs,
    pc_line,
    read_masked_rows,
    tree_hashes,
    write_zst,
)

EOD = 0  # <|endoftext|> in GPT-NeoX-20B's tokenizer and in the one trained on the sample


# ------------------------------------------------------------------------------------------ reading the rows
BAD_PC_LINES = {
    "invalid_json": '{"prompt": "x", \n',
    "not_an_object": json.dumps(["prompt", "completion"]) + "\n",
    "missing_prompt": json.dumps({"completion": " 1", "meta": {"pile_set_name": "Test"}}) + "\n",
    "missing_completion": json.dumps({"prompt": "Q:", "meta": {"pile_set_name": "Test"}}) + "\n",
    "prompt_not_string": json.dumps({"prompt": ["Q:"], "completion": " 1"}) + "\n",
    "completion_not_string": json.dumps({"prompt": "Q:", "completion": 1}) + "\n",
    "empty_completion": pc_line("Q: nothing follows", ""),
    "invalid_utf8": '{"prompt": "Q:", "completion": " \\ud800 lone surrogate"}\n',
}


def test_prompt_completion_rows_are_parsed_and_bad_rows_counted_by_reason(tmp_path):
    assert set(BAD_PC_LINES) == set(PROMPT_COMPLETION_BAD_ROW_REASONS)
    body = (
        pc_line("Q: 1 + 1 =", " 2")
        + "".join(BAD_PC_LINES.values())
        + "\n"  # blank: no row, not counted
        + pc_line("", " an empty prompt is allowed")
        + json.dumps({"prompt": "no meta", "completion": " kept"})
        + "\n"
    )
    (tmp_path / "a.jsonl").write_text(body)
    bad, labelled = Counter(), Counter()
    rows = list(iter_prompt_completions(tmp_path / "a.jsonl", bad=bad, labelled=labelled))
    assert rows == [
        ("Q: 1 + 1 =", " 2", "Test"),
        ("", " an empty prompt is allowed", "Test"),
        ("no meta", " kept", None),
    ]
    assert bad == Counter(dict.fromkeys(BAD_PC_LINES, 1))
    assert labelled == Counter(missing_meta=1)


def test_bad_format_options_are_one_line_errors(tok_file, tmp_path):
    (tmp_path / "a.jsonl").write_text(pc_line("Q:", " A"))
    with pytest.raises(NeoxrayError, match=r"--format 'csv': unknown input format \(expected one of text, prompt-"):
        prepare([str(tmp_path / "a.jsonl")], tok_file, 8, str(tmp_path / "o"), content="csv")
    with pytest.raises(NeoxrayError, match="--text-key applies to --format text only"):
        prepare(
            [str(tmp_path / "a.jsonl")], tok_file, 8, str(tmp_path / "o"), content="prompt-completion", text_key="x"
        )


# --------------------------------------------------------------------------------------------------- packing
def _doc(n_prompt: int, n_completion: int, start: int) -> tuple[list[int], list[int]]:
    """Prompt ids in [100, 200), completion ids in [200, 300): a token's mask can be told from its id."""
    return [100 + (start + i) % 100 for i in range(n_prompt)], [200 + (start + i) % 100 for i in range(n_completion)]


def _pack(tmp_path: Path, chunks, seq_len: int, rows_per_file: int, masked: bool = True):
    """Write `chunks` (lists of (prompt, completion) documents) as a tokenizer actor would, and pack them."""
    (tmp_path / "chunks").mkdir()
    (tmp_path / "train").mkdir()
    paths = []
    for c, docs in enumerate(chunks):
        streams = ChunkStreams(EOD, "uint16", masked)
        for prompt, completion in docs:
            streams.add((0, ""), prompt, completion)
        path = str(tmp_path / "chunks" / f"c{c}.arrow")
        assert streams.write(path)
        paths.append(path)
    return pack_file(0, paths, str(tmp_path), seq_len, rows_per_file, min(2, rows_per_file))


def _read_parts(tmp_path: Path, parts, row_len: int):
    tables = [pq.read_table(tmp_path / p["path"]) for p in parts]
    ids = np.concatenate([t.column("input_ids").combine_chunks().flatten().to_numpy() for t in tables])
    return tables, ids.reshape(-1, row_len)


def test_packing_keeps_the_mask_aligned_across_documents_rows_chunks_and_files(tmp_path):
    # documents shorter and much longer than a row (seq_len 6: rows of 7), an empty prompt, over three chunks
    chunks = [
        [_doc(3, 2, 0), _doc(9, 1, 10), _doc(0, 4, 20)],
        [_doc(2, 15, 30)],
        [_doc(5, 5, 50), _doc(1, 1, 60), _doc(4, 3, 70)],
    ]
    stream = [t for docs in chunks for p, c in docs for t in (*p, *c, EOD)]
    expected_mask = [m for docs in chunks for p, c in docs for m in [0] * len(p) + [1] * (len(c) + 1)]
    [result] = _pack(tmp_path, chunks, seq_len=6, rows_per_file=3)
    L = 7
    rows = len(stream) // L
    assert result["rows"] == rows and result["dropped_tokens"] == len(stream) - rows * L
    assert len(result["parts"]) == -(-rows // 3) > 2 and [p["rows"] for p in result["parts"]][:-1] == [3] * (rows // 3)
    tables, ids = _read_parts(tmp_path, result["parts"], L)
    for t in tables:
        assert t.schema.names == ["input_ids", "loss_mask", "trained_labels"]
    masks = np.concatenate([t.column("loss_mask").combine_chunks().flatten().to_numpy() for t in tables]).reshape(-1, L)
    assert masks.dtype == np.uint8
    assert np.array_equal(ids.reshape(-1), stream[: rows * L])
    assert np.array_equal(masks.reshape(-1), expected_mask[: rows * L])
    # every prompt token is masked, every completion token and every EOD trained, wherever the cuts fall
    assert np.array_equal(masks, ((ids >= 200) | (ids == EOD)).astype(np.uint8))
    # the fourth document (2 prompt ids, 15 completion ids, EOD) runs over three rows and keeps its mask
    start = sum(len(p) + len(c) + 1 for p, c in chunks[0])
    assert (start + 17) // L - start // L == 2
    assert masks.reshape(-1)[start : start + 18].tolist() == [0, 0] + [1] * 16
    trained = np.concatenate([t.column("trained_labels").to_numpy() for t in tables])
    assert np.array_equal(trained, masks[:, 1:].sum(axis=1)) and result["trained_labels"] == trained.sum()


def test_text_streams_are_packed_without_a_mask(tmp_path):
    chunks = [[_doc(0, 10, 0), _doc(0, 7, 10)], [_doc(0, 12, 20)]]
    [result] = _pack(tmp_path, chunks, seq_len=4, rows_per_file=100, masked=False)
    tables, ids = _read_parts(tmp_path, result["parts"], 5)
    assert [t.schema.names for t in tables] == [["input_ids"]]
    stream = [t for docs in chunks for _, c in docs for t in (*c, EOD)]
    assert np.array_equal(ids.reshape(-1), stream[: len(ids) * 5])
    assert result["trained_labels"] == len(ids) * 4


# ---------------------------------------------------------------------------------------- prepare end to end
@pytest.fixture(scope="module")
def pc_crafted(tmp_path_factory):
    """Two prompt-completion files (plain and zstd), bad rows of every reason, an empty prompt, a row without
    meta and a document far longer than a row. Returns (root, {file: [(prompt, completion, component)]})."""
    root = tmp_path_factory.mktemp("pc")
    docs = instruction_docs()
    long_doc = (" ".join(p for p, _, _ in docs[:12]), " ".join(c for _, c, _ in docs[:40]), "Long")
    a = docs[:100] + [("", " no prompt at all", "Test"), ("Q: where is the meta?", " gone", "unknown")]
    body = "".join(pc_line(p, c, n) for p, c, n in docs[:60]) + "".join(BAD_PC_LINES.values()) + "\n"
    body += "".join(pc_line(p, c, n) for p, c, n in docs[60:100] + a[100:101])
    body += json.dumps({"prompt": a[101][0], "completion": a[101][1]}) + "\n"
    (root / "a.jsonl").write_text(body)
    b = docs[100:220] + [long_doc] + docs[220:260]
    write_zst(root / "b.jsonl.zst", "".join(pc_line(p, c, n) for p, c, n in b))
    return root, {"a.jsonl": a, "b.jsonl.zst": b}


@pytest.fixture(scope="module")
def pc_prepared(ray_local, pc_crafted, tok_file, tmp_path_factory):
    root, _ = pc_crafted
    out = tmp_path_factory.mktemp("pcprep") / "ds"
    kwargs = dict(val_fraction=0.2, content="prompt-completion", rows_per_file=20, progress=False)
    result = prepare([str(root)], tok_file, 16, str(out), workers=2, chunk_bytes=1500, **kwargs)
    return out, result, kwargs


def test_prepare_prompt_completion_matches_raw_tokenizers(pc_prepared, pc_crafted, tok_file):
    out, result, _ = pc_prepared
    _, files = pc_crafted
    m = result.manifest
    assert m["content"] == "prompt-completion" and json.loads((out / MANIFEST).read_text())["content"] == m["content"]
    assert m["options"]["text_key"] is None and "prompt + completion" in m["options"]["split_hash"]
    assert m["bad_rows"] == dict.fromkeys(sorted(BAD_PC_LINES), 1)
    assert m["documents_without_component"] == 1 and m["components"]["unknown"]["documents"] == 1
    raw = tokenizers.Tokenizer.from_file(tok_file)
    all_docs = [d for ds in files.values() for d in ds]
    assert m["documents"] == len(all_docs)
    streams = [expected_pc_streams(ds, raw, 0.2) for ds in files.values()]
    assert m["tokens"] == sum(len(i) for s in streams for i, _ in s.values())
    assert m["loss_tokens"] == sum(int(k.sum()) for s in streams for _, k in s.values())
    assert m["components"]["Long"]["tokens"] > 4 * 17  # one document over several rows
    trained = 0
    for split in ("train", "validation"):
        got = read_masked_rows(out, m, split)
        total = 0
        for k, s in enumerate(streams):
            ids, mask = s.get((split, None), (np.zeros(0, np.int64), np.zeros(0, np.uint8)))
            rows = len(ids) // 17
            total += rows
            if rows:
                assert np.array_equal(got[(k, None)][0].reshape(-1), ids[: rows * 17]), (k, split)
                assert np.array_equal(got[(k, None)][1].reshape(-1), mask[: rows * 17]), (k, split)
                trained += int(got[(k, None)][1][:, 1:].sum())
        assert m["splits"][split]["rows"] == total > 0
        assert m["splits"][split]["trained_labels"] == sum(int(v[1][:, 1:].sum()) for v in got.values())
    assert m["trained_labels"] == trained < m["rows"] * 16
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_prompt_completion_reruns_are_noops_byte_identical_and_format_changes_conflict(
    pc_prepared, pc_crafted, tok_file, tmp_path
):
    out, first, kwargs = pc_prepared
    root, _ = pc_crafted
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare([str(root)], tok_file, 16, str(out), workers=1, **kwargs)
    assert again.skipped and again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(NeoxrayError, match="other inputs or options.*--overwrite"):
        prepare([str(root)], tok_file, 16, str(out), workers=1, val_fraction=0.2, rows_per_file=20, progress=False)
    # other workers and chunking give the same bytes (masks cross chunk boundaries differently)
    other = tmp_path / "other"
    prepare([str(root)], tok_file, 16, str(other), workers=1, chunk_bytes=1 << 20, **kwargs)
    assert tree_hashes(other) == tree_hashes(out)


# ------------------------------------------------------------------------------------------- bundled sample
def test_bundled_sample_is_what_its_generator_writes():
    spec = importlib.util.spec_from_file_location(
        "make_instruction_sample", ROOT / "tools" / "make_instruction_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.build()
    assert INSTRUCTIONS.read_text(encoding="utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert len(rows) == 400 and Counter(r["meta"]["pile_set_name"] for r in rows) == dict.fromkeys(
        ("Arithmetic", "Units", "Reverse", "Uppercase"), 100
    )
    docs = (ROOT / "docs" / "data.md").read_text()
    assert "instructions.jsonl" in docs and "tools/make_instruction_sample.py" in docs
    assert "generated" in docs and "Apache-2.0" in docs  # the licence statement


@pytest.fixture(scope="module")
def sample_pc(ray_local, tok_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pcsample") / "ds"
    return out, prepare(
        [str(INSTRUCTIONS)], tok_file, 16, str(out), content="prompt-completion", val_fraction=0.05, progress=False
    ).manifest


def test_bundled_sample_prepares_cleanly(sample_pc, tok_file):
    out, m = sample_pc
    assert m["bad_rows"] == {} and m["documents_without_component"] == 0
    assert m["documents"] == 400 and {c: v["documents"] for c, v in m["components"].items()} == dict.fromkeys(
        ("Arithmetic", "Reverse", "Units", "Uppercase"), 100
    )
    raw = tokenizers.Tokenizer.from_file(tok_file)
    for (split, _), (ids, mask) in expected_pc_streams(instruction_docs(), raw, 0.05).items():
        rows = len(ids) // 17
        got_ids, got_mask = read_masked_rows(out, m, split)[(0, None)]
        assert np.array_equal(got_ids.reshape(-1), ids[: rows * 17])
        assert np.array_equal(got_mask.reshape(-1), mask[: rows * 17])
        assert 0 < got_mask.mean() < 0.5  # short answers after longer questions


# ---------------------------------------------------------------------------------------------- the reader
def _stored(out: Path, m: dict, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(ids, masks) [rows, N + 1] of a split in storage order, read straight from Parquet."""
    tables = [pq.read_table(out / e["path"]) for e in m["splits"][split]["files"]]
    L = m["row_length"]
    ids = np.concatenate([t.column("input_ids").combine_chunks().flatten().to_numpy() for t in tables])
    masks = np.concatenate([t.column("loss_mask").combine_chunks().flatten().to_numpy() for t in tables])
    return ids.reshape(-1, L), masks.reshape(-1, L)


def test_reader_yields_masks_aligned_with_labels(pc_prepared):
    out, result, _ = pc_prepared
    ids, masks = _stored(out, result.manifest)
    data = PackedDataset(str(out))
    assert data.masked and data.content == "prompt-completion"
    order = BlendedDataset([data], seed=4)
    G, D, steps = 8, 2, 5
    per_rank = [
        list(
            iter_batches(str(out), G, dp_rank=r, dp_size=D, micro_batch_size=2, seed=4, num_steps=steps, as_torch=False)
        )
        for r in range(D)
    ]
    for step in range(steps):
        micro = [b for r in range(D) for b in per_rank[r] if b["step"] == step]
        assert len({b["global_trained_labels"] for b in micro}) == 1  # the same divisor on every rank
        assert micro[0]["global_trained_labels"] == sum(int(b["loss_mask"].sum()) for b in micro) > 0
        for b in micro:
            _, rows = order.locate(b["sample_idx"])
            assert b["loss_mask"].dtype == np.bool_ and b["loss_mask"].shape == b["labels"].shape == (2, 16)
            assert np.array_equal(b["labels"], ids[rows, 1:]) and np.array_equal(b["input_ids"], ids[rows, :-1])
            # the convention: loss_mask[:, t] is the stored mask of token t + 1, i.e. of labels[:, t]
            assert np.array_equal(b["loss_mask"], masks[rows, 1:].astype(bool))
            assert b["loss_mask"][b["labels"] == EOD].all()  # every EOD ends a completion: trained
            assert not b["loss_mask"].all()
    t = next(iter_batches(str(out), G, seed=4, num_steps=1))
    import torch

    assert t["loss_mask"].dtype == torch.bool and tuple(t["loss_mask"].shape) == (G, 16)
    # resuming gives the same masks
    tail = list(
        iter_batches(
            str(out),
            G,
            dp_rank=1,
            dp_size=D,
            micro_batch_size=2,
            seed=4,
            consumed_samples=3 * G,
            num_steps=2,
            as_torch=False,
        )
    )
    for a, b in zip(per_rank[1][-4:], tail):
        assert (
            np.array_equal(a["loss_mask"], b["loss_mask"]) and a["global_trained_labels"] == b["global_trained_labels"]
        )
    rows_ids, rows_mask = data.take_with_mask([3, 0])
    assert np.array_equal(rows_ids, ids[[3, 0]]) and np.array_equal(rows_mask, masks[[3, 0]])
    assert np.array_equal(data.trained_labels([3, 0]), masks[[3, 0], 1:].sum(axis=1))


def test_text_datasets_read_as_before_and_blend_with_masked_ones(small, sample_pc):
    text = PackedDataset(small)
    assert not text.masked and text.content == "text"
    batch = next(iter_batches(small, 8, seed=2, num_steps=1, as_torch=False))
    assert "loss_mask" not in batch  # text data: no mask, every label is trained
    assert batch["global_trained_labels"] == 8 * 16
    ids, mask = text.take_with_mask([0, 1])
    assert np.array_equal(ids, text.take([0, 1])) and (mask == 1).all()
    # a blend of text and prompt-completion rows: a mask for every row, all ones on the text rows
    out, m = sample_pc
    pc_ids, pc_masks = _stored(out, m)
    blend = BlendedDataset([text, PackedDataset(str(out))], weights=[0.5, 0.5], seed=2)
    assert blend.masked
    b = next(iter_batches(blend, 16, num_steps=1, as_torch=False))
    ds, rows = blend.locate(b["sample_idx"])
    assert set(ds.tolist()) == {0, 1}
    assert b["loss_mask"][ds == 0].all()
    assert np.array_equal(b["loss_mask"][ds == 1], pc_masks[rows[ds == 1], 1:].astype(bool))
    assert np.array_equal(b["input_ids"][ds == 1], pc_ids[rows[ds == 1], :-1])
    assert b["global_trained_labels"] == int(b["loss_mask"].sum())


def test_cli_prepare_format_prompt_completion(ray_local, tok_file, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    args = ("prepare", "--input", str(INSTRUCTIONS), "--tokenizer", tok_file, "--seq-len", "32", "--workers", "1")
    proc = run_cli(*args, "--format", "prompt-completion", "--output", str(tmp_path / "o"), "--json", env=env)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["format"] == "prompt-completion" and summary["documents"] == 400 and summary["bad_rows"] == {}
    bad = run_here(*args, "--format", "csv", "--output", str(tmp_path / "p"))  # the same command, in this process
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 1 and len(lines) == 1 and "--format 'csv'" in lines[0], bad.stderr


def test_ray_dataset_carries_the_mask_of_the_labels(sample_pc):
    out, m = sample_pc
    ids, masks = _stored(out, m)
    rows = ray_dataset(str(out)).take_all()
    assert len(rows) == len(ids) and {"input_ids", "labels", "loss_mask"} <= set(rows[0])
    got = Counter((tuple(r["input_ids"].tolist()), tuple(r["loss_mask"].tolist())) for r in rows)
    assert got == Counter((tuple(i[:-1].tolist()), tuple(k[1:].astype(bool).tolist())) for i, k in zip(ids, masks))
