"""The checkpoint rules on their own, without training (fast tier): where a run resumes in a run directory of
hand-made checkpoints (damaged, incomplete, unverified ones; a start over), what a reader checks against
meta.json, the probe forward that keeps diverged weights from being served or exported, and the row length a
prepared dataset's files hold. The end-to-end tests in tests/platform/train/test_checkpoint_safety.py show the
same rules on real runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from neoxray.errors import NeoxrayError
from neoxray.platform.checkpoint import FORMAT, META, list_checkpoints, verify_files
from neoxray.platform.train.resume import find_resume_point


def fake_checkpoint(run: Path, name: str, step: int, meta: bool = True) -> Path:
    """A checkpoint folder holding one listed file (and its meta.json unless `meta` is False)."""
    folder = run / name
    folder.mkdir(parents=True)
    data = f"weights of step {step}".encode()
    (folder / "w.bin").write_bytes(data)
    if meta:
        listed = {"w.bin": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        (folder / META).write_text(json.dumps({"format": FORMAT, "step": step, "shards": [], "files": listed}))
    return folder


def damage(folder: Path) -> None:
    data = bytearray((folder / "w.bin").read_bytes())
    data[0] ^= 0xFF
    (folder / "w.bin").write_bytes(bytes(data))


def names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def test_the_newest_intact_checkpoint_wins_and_newer_unusable_ones_are_set_aside_only_when_applied(tmp_path):
    fake_checkpoint(tmp_path, "checkpoint-step-0000002", 2)
    damage(fake_checkpoint(tmp_path, "checkpoint-step-0000004", 4))
    fake_checkpoint(tmp_path, "checkpoint-step-0000006", 6, meta=False)
    point = find_resume_point(tmp_path)
    assert point.checkpoint == tmp_path / "checkpoint-step-0000002" and point.verified
    assert len(names(tmp_path)) == 3, "nothing is renamed before every check has passed"
    said: list[str] = []
    point.apply(said.append)
    assert names(tmp_path) == [
        "checkpoint-step-0000002",
        "damaged-checkpoint-step-0000004",
        "incomplete-checkpoint-step-0000006",
    ]
    assert "checkpoint-step-0000006 has no meta.json" in said[0] and "w.bin do not match" in said[1]
    assert said[-1].endswith("resuming from " + str(tmp_path / "checkpoint-step-0000002"))


def test_a_run_directory_without_a_usable_checkpoint_is_refused_touching_nothing(tmp_path):
    damage(fake_checkpoint(tmp_path, "checkpoint-step-0000002", 2))
    fake_checkpoint(tmp_path, "checkpoint-step-0000004", 4, meta=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(NeoxrayError) as e:
        find_resume_point(tmp_path)
    for needle in ("checkpoint-step-0000002 is damaged", "checkpoint-step-0000004 has no meta.json", "--start-over"):
        assert needle in str(e.value)
    assert names(tmp_path) == ["checkpoint-step-0000002", "checkpoint-step-0000004", "metrics.jsonl"]

    point = find_resume_point(tmp_path, start_over=True, metrics_file="metrics.jsonl")
    assert point.checkpoint is None
    point.apply(lambda _: None)
    assert names(tmp_path) == [
        "before-start-over-metrics.jsonl",
        "damaged-checkpoint-step-0000002",
        "incomplete-checkpoint-step-0000004",
    ]


def test_an_unverified_checkpoint_is_resumed_saying_so_and_never_listed_as_verified(tmp_path):
    fake_checkpoint(tmp_path, "checkpoint-step-0000002", 2)
    fake_checkpoint(tmp_path, "unverified-checkpoint-step-0000004", 4)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-step-0000002"]  # rotation, --model RUN_DIR
    point = find_resume_point(tmp_path)
    assert point.checkpoint == tmp_path / "unverified-checkpoint-step-0000004" and not point.verified
    assert point.newest_verified == tmp_path / "checkpoint-step-0000002"  # what a stop names
    said: list[str] = []
    point.apply(said.append)
    assert "unverified" in said[-1]


def test_a_reader_checks_the_files_it_uses_against_meta_json(tmp_path):
    folder = fake_checkpoint(tmp_path, "checkpoint-step-0000002", 2)
    meta = json.loads((folder / META).read_text())
    verify_files(folder, meta, ["w.bin"])
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(NeoxrayError, match="tokenizer.json not listed in meta.json"):
        verify_files(folder, meta, ["tokenizer.json"])
    damage(folder)
    with pytest.raises(NeoxrayError, match="w.bin do not match the checksums"):
        verify_files(folder, meta, ["w.bin"])


def test_the_probe_forward_refuses_weights_that_are_huge_but_finite(tmp_path):
    from neoxray.model.config import get_preset
    from neoxray.model.gptneox import build_model
    from neoxray.platform.model_loading import check_forward_finite

    model = build_model(get_preset("tiny", vocab_size=1024, max_seq_len=32), seed=0)
    check_forward_finite(model, "fine")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e12)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # a per-tensor check lets them pass
    with pytest.raises(NeoxrayError, match="diverged: the model.s forward on a probe batch"):
        check_forward_finite(model, "diverged")


def test_the_row_length_a_datasets_files_hold_is_read_from_the_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from neoxray.pipelines.dataset_format import stored_row_length

    rows = pa.array([list(range(33)), list(range(33))], pa.list_(pa.uint16()))
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "train" / "part-0.parquet")
    manifest = {"seq_len": 16, "splits": {"train": {"files": [{"path": "train/part-0.parquet"}]}}}
    assert stored_row_length(str(tmp_path), manifest) == 33
    assert stored_row_length(str(tmp_path), {"splits": {"train": {"files": []}}}) is None
