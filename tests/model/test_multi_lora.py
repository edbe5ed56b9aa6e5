"""Many adapters in one forward (`neoxray.model.multi_lora`), against the merged weights (`merge_into`: each
adapter folded into a copy of the base, W + scaling B A, no adapter layers at all): every row of a mixed batch
equals its own adapter's merged model, or the base for a row bound to none; binding is per row and per forward;
slots load (any rank up to max_rank, any target subset), reload and unload, and a refused load changes nothing;
`remove` gives the plain model back. In a 2-process gloo world the same holds for a tensor-parallel base. The
engine's use of it against peft itself: tests/platform/inference/test_multi_lora.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.lora import LoRAAdapter, merge_into
from neoxray.model.lora_spec import LoRASpec, target_shape
from neoxray.model.multi_lora import MultiLoRA
from neoxray.model.tensor_parallel import gather_from_tp_region
from tests.support.gloo import Soft, assert_passed, spawn_world
from tests.support.tp_models import plain_model, tiny, tp_model

CFG = tiny()
ADAPTERS = {  # name -> (spec, seed, per-module alphas)
    "a": (LoRASpec(r=8, alpha=16), 1, {}),
    "b": (LoRASpec(r=3, alpha=6, use_rslora=True, targets=("query_key_value", "dense_4h_to_h")), 2, {}),
    "c": (LoRASpec(r=5, alpha=4, targets=("dense", "dense_h_to_4h"), layers=(1,)), 3, {"layers.1.attention.dense": 9}),
}


def make_adapter(name: str, cfg=CFG) -> LoRAAdapter:
    """Random A and B (B nonzero, so the adapter changes the output) for the modules its spec selects."""
    spec, seed, alphas = ADAPTERS[name]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in spec.layers if spec.layers is not None else range(cfg.n_layers):
        for t in spec.targets:
            sub = "attention" if t in ("query_key_value", "dense") else "mlp"
            n_in, n_out = target_shape(cfg, t)
            path = f"layers.{layer}.{sub}.{t}"
            tensors[f"{path}.lora_A"] = torch.randn(spec.r, n_in, generator=g) / n_in**0.5
            tensors[f"{path}.lora_B"] = torch.randn(n_out, spec.r, generator=g) * 0.5
    return LoRAAdapter(spec, tensors, alphas, name)


def merged(base: nn.Module, name: str | None) -> nn.Module:
    return base if name is None else merge_into(copy.deepcopy(base), make_adapter(name))


def ids_for(b: int, s: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def refs():
    """The base and each adapter's merged model, and their logits on one batch of 5 rows."""
    base = plain_model(CFG).eval()
    models = {n: merged(base, n) for n in (None, *ADAPTERS)}
    ids = ids_for(5)
    with torch.no_grad():
        return base, ids, {n: m(ids) for n, m in models.items()}


def slots_model(base, **kw):
    model = copy.deepcopy(base)
    return model, MultiLoRA(model, **{"max_adapters": 3, "max_rank": 8, **kw})


@torch.no_grad()
def test_a_mixed_batch_equals_each_adapter_alone(refs):
    base, ids, want = refs
    model, lora = slots_model(base)
    for slot, name in enumerate(ADAPTERS):
        lora.load(slot, make_adapter(name))
    rows = [0, None, 2, 1, 0]  # two rows of one adapter, one without any
    lora.bind(rows)
    got = model(ids)
    names = [None if s is None else list(ADAPTERS)[s] for s in rows]
    for i, name in enumerate(names):
        torch.testing.assert_close(got[i], want[name][i], rtol=0, atol=2e-5, msg=f"row {i} ({name})")
        for other in ADAPTERS:
            if other != name:  # every adapter changes the answer: the comparison proves something
                assert (got[i] - want[other][i]).abs().max() > 1e-3, (i, name, other)
    assert lora.names == {0: "a", 1: "b", 2: "c"}


@torch.no_grad()
def test_binding_is_per_row_and_per_forward(refs):
    base, ids, want = refs
    model, lora = slots_model(base)
    lora.load(0, make_adapter("a"))
    lora.load(1, make_adapter("b"))
    lora.bind([1, 1, 0, -1, 0])  # -1, like None: the base
    first = model(ids)
    lora.bind([0, None, 1, 1, None])
    second = model(ids)
    for i, (x, y) in enumerate(zip(["b", "b", "a", None, "a"], ["a", None, "b", "b", None])):
        torch.testing.assert_close(first[i], want[x][i], rtol=0, atol=2e-5)
        torch.testing.assert_close(second[i], want[y][i], rtol=0, atol=2e-5)
    lora.bind([None] * 5)
    assert torch.equal(model(ids), want[None])  # no bound adapter: every linear runs the base's own forward
    lora.unbind()
    assert torch.equal(model(ids), want[None])
    lora.bind([0, 1])
    with pytest.raises(NeoxrayError, match="2 rows bound, but the forward has 5 rows"):
        model(ids)


@torch.no_grad()
def test_slots_load_reload_and_unload(refs):
    base, ids, want = refs
    model, lora = slots_model(base)
    lora.load(0, make_adapter("a"))
    lora.load(0, make_adapter("c"))  # reloading a slot replaces what it held (rank 8 -> 5, other targets)
    lora.bind([0] * 5)
    torch.testing.assert_close(model(ids), want["c"], rtol=0, atol=2e-5)
    lora.unload(0)
    assert lora.names == {}
    with pytest.raises(NeoxrayError, match="slot 0 holds no adapter"):
        lora.bind([0])
    with pytest.raises(NeoxrayError, match="out of range"):
        lora.load(3, make_adapter("a"))
    lora.load(1, make_adapter("b"))
    lora.bind([1] * 5)
    torch.testing.assert_close(model(ids), want["b"], rtol=0, atol=2e-5)


@torch.no_grad()
def test_a_refused_load_changes_nothing(refs):
    base, ids, want = refs
    model, lora = slots_model(base, max_rank=5, targets=("query_key_value", "dense_4h_to_h"))
    lora.load(0, make_adapter("b"))
    with pytest.raises(NeoxrayError, match="rank 8, more than max_rank 5"):
        lora.load(0, make_adapter("a"))
    with pytest.raises(NeoxrayError, match="has no adapter slots"):
        lora.load(0, make_adapter("c"))  # dense, dense_h_to_4h: not given slots here
    lora.bind([0] * 5)
    torch.testing.assert_close(model(ids), want["b"], rtol=0, atol=2e-5)
    assert lora.names == {0: "b"}


@torch.no_grad()
def test_remove_gives_the_plain_model_back(refs):
    base, ids, want = refs
    model, lora = slots_model(base)
    lora.load(0, make_adapter("a"))
    lora.bind([0] * 5)
    assert list(model.state_dict()) == list(base.state_dict())  # the slots are not in the state dict
    lora.remove()
    assert all(type(m) is type(b) for m, b in zip(model.modules(), base.modules()))
    assert torch.equal(model(ids), want[None])
    MultiLoRA(model, max_adapters=1, max_rank=2)  # and it takes slots again


# ---------------------------------------------------------------------------------------------------------
# a tensor-parallel base: 2 gloo processes against the merged plain models in each
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_tp_mixed_batch(group) -> None:
    base = plain_model(CFG).eval()
    ids = ids_for(4, seed=1)
    rows = [2, 0, None, 1]
    names = [None if s is None else list(ADAPTERS)[s] for s in rows]
    tp = tp_model(CFG, group).eval()
    lora = MultiLoRA(tp, max_adapters=3, max_rank=8)
    for slot, name in enumerate(ADAPTERS):
        lora.load(slot, make_adapter(name))
    lora.bind(rows)
    got = gather_from_tp_region(tp(ids), group)
    soft = Soft()
    for i, name in enumerate(names):
        soft.close(got[i], merged(base, name)(ids)[i], f"row {i} ({name})", rtol=0, atol=2e-5)
    soft.check()


def _checks(rank: int, world: int) -> dict:
    return {"tp-mixed-batch": (check_tp_mixed_batch, dist.new_group(list(range(world))))}


def test_tensor_parallel_slots_equal_the_merged_plain_models():
    assert_passed(spawn_world(2, _checks, deadline_s=400), "tp-mixed-batch")
