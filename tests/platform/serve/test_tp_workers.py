"""A tensor-parallel replica's placement: its bundles, and the one-line refusal of a placement group the cluster
cannot place (Serve would otherwise wait for it for ever)."""

from __future__ import annotations

import pytest

from neoxray.errors import NeoxrayError
from neoxray.platform.serve.tp_workers import check_placement, placement_bundles


def node(cpus, gpus=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_bundles_are_the_replica_then_one_per_worker():
    assert placement_bundles(2, 1, 1, 2) == [{"CPU": 1}, {"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}]
    assert placement_bundles(2, 0, 0, 0) == [{"CPU": 0.01}, {"CPU": 0.01}, {"CPU": 0.01}]  # Ray refuses all-zero


def test_a_placement_the_cluster_cannot_give_is_one_line():
    bundles = placement_bundles(2, 1, 1, 1)
    check_placement(bundles, "PACK", [node(4, 1), node(4, 1)])  # spread over two nodes: fine with PACK
    with pytest.raises(NeoxrayError, match="STRICT_PACK") as e:
        check_placement(bundles, "STRICT_PACK", [node(4, 1), node(4, 1)])
    assert "\n" not in str(e.value)
    check_placement(bundles, "STRICT_PACK", [node(4, 2)])
    with pytest.raises(NeoxrayError, match="needs 2 GPUs, the cluster has 1"):
        check_placement(bundles, "PACK", [node(8, 1), node(8, 4, alive=False)])
    with pytest.raises(NeoxrayError, match="no node has the GPUs one tensor-parallel worker asks for"):
        check_placement(placement_bundles(2, 1, 2, 1), "PACK", [node(4, 1), node(4, 1), node(4, 1), node(4, 1)])
