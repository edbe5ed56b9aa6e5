"""The training reader (`neoxray.pipelines.reader`): deterministic order, disjoint data-parallel shares, resume
without replay, blending, and Ray Data / Ray Train."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from neoxray.errors import NeoxrayError
from neoxray.pipelines.packed_dataset import PackedDataset, ray_dataset
from neoxray.pipelines.reader import BatchSampler, BlendedDataset, iter_batches, open_blend, permute


# --------------------------------------------------------------------------------------------------- reader
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
        assert np.array_equal(np.sort(rows[e * n : (e + 1) * n]), np.arange(n))
    assert not np.array_equal(rows[:n], rows[n : 2 * n])  # a new shuffle every epoch
    _, again = BlendedDataset([PackedDataset(small)], seed=7).locate(np.arange(3 * n))
    assert np.array_equal(rows, again)
    _, other = BlendedDataset([data], seed=8).locate(np.arange(n))
    assert not np.array_equal(rows[:n], other)
    assert np.array_equal(order.take([5, 0]), data.take(rows[[5, 0]]))


def test_dp_ranks_get_disjoint_shares_of_each_global_batch(small):
    G, D = 12, 3
    per_rank = [
        list(iter_batches(small, G, dp_rank=r, dp_size=D, micro_batch_size=2, seed=1, num_steps=4, as_torch=False))
        for r in range(D)
    ]
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
    full = list(iter_batches(small, G, dp_rank=1, dp_size=2, micro_batch_size=2, seed=3, num_steps=6, as_torch=False))
    data = PackedDataset(small)
    read: list = []
    original = PackedDataset.take

    def spy(self, rows):
        read.extend(np.asarray(rows).tolist())
        return original(self, rows)

    monkeypatch.setattr(PackedDataset, "take", spy)
    tail = list(
        iter_batches(
            data,
            G,
            dp_rank=1,
            dp_size=2,
            micro_batch_size=2,
            seed=3,
            consumed_samples=4 * G,
            num_steps=2,
            as_torch=False,
        )
    )
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
        mine = rows[ds == d][: len(data)]
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
    dp = [
        b["sample_idx"].tolist() for b in iter_batches(config["path"], 8, dp_rank=rank, dp_size=2, seed=5, num_steps=3)
    ]
    tp = [
        b["input_ids"].sum().item() for b in iter_batches(config["path"], 8, dp_rank=0, dp_size=1, seed=5, num_steps=3)
    ]
    shard_rows = []
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=1024):
        assert batch["input_ids"].shape[1] == config["seq_len"]
        assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
        shard_rows.extend(batch["input_ids"][:, :4].tolist())
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"dp": dp, "tp": tp, "shard": shard_rows}))


def test_ray_train_workers_get_their_shares(ray_local, small, tmp_path, monkeypatch):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from neoxray.platform.train.driver import RAY_TRAIN_TOLERANCE

    for name, value in RAY_TRAIN_TOLERANCE.items():  # Ray Train's health checks as neoxray's runs set them: a
        monkeypatch.setenv(name, value)  # worker starved by another process on this 2-core machine is left be
    data = PackedDataset(small)
    ds = ray_dataset(small)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"path": small, "out": str(tmp_path), "seq_len": data.seq_len},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={"train": ds},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="data"),
    )
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
