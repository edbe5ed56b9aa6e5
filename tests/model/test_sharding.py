"""Tensor-parallel slicing of plain tensors (`neoxray.model.sharding`) and the sharding attributes the
tensor-parallel layers keep on their parameters."""

from __future__ import annotations

import pytest
import torch

from neoxray.errors import NeoxrayError
from neoxray.model.sharding import full_shape, read_shard, shard
from neoxray.model.tensor_parallel import ColumnParallelLinear


def test_sharding_attributes_survive_to_empty_and_helpers():
    with torch.device("meta"):
        m = ColumnParallelLinear(8, 6)
    m.weight.custom = "kept"  # e.g. an attribute an optimizer wrapper reads
    m.to_empty(device="cpu")
    assert (m.weight.tp_dim, m.weight.tp_rank, m.weight.tp_size, m.weight.custom) == (0, 0, 1, "kept")
    assert m.weight.device.type == "cpu"
    with pytest.raises(NeoxrayError, match="dim 0"):
        shard(torch.zeros(5, 4), 0, 0, 2)
    p = torch.zeros(3, 8)
    p.tp_dim, p.tp_rank, p.tp_size = 0, 1, 2
    assert full_shape(p) == (6, 8) and full_shape(torch.zeros(2)) == (2,)


def test_read_shard_reads_only_the_rank_slice_from_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    full = torch.arange(48.0).view(6, 8)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    rows, cols = torch.zeros(3, 8), torch.zeros(6, 4)
    rows.tp_dim, rows.tp_rank, rows.tp_size = 0, 1, 2
    cols.tp_dim, cols.tp_rank, cols.tp_size = 1, 0, 2
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert torch.equal(read_shard(rows, f.get_slice("w")), full[3:])
        assert torch.equal(read_shard(cols, f.get_slice("w")), full[:, :4])
        assert torch.equal(read_shard(torch.zeros(6, 8), f.get_slice("w")), full)
        with pytest.raises(NeoxrayError, match="shape"):
            read_shard(torch.zeros(3, 3), f.get_slice("w"))
