"""LoRA layers (`neoxray.model.lora`): the spec's checks; a fresh adapter leaves the model's output unchanged and
is initialised from (seed, name) whatever the layout; only adapters train; merging and removing; and, in a
2-process gloo world, tensor-parallel adapters (applied after `parallelize`) give the forward output and the
adapter gradients of the single-process model, dropout included. peft parity: tests/model/test_peft_format.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.gptneox import cross_entropy
from neoxray.model.init import layer_offset
from neoxray.model.lora import (
    LoRAAdapter,
    LoRASpec,
    adapter_from_model,
    apply_lora,
    init_lora,
    iter_lora_parameters,
    load_lora,
    lora_sites,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_into,
    merge_lora,
    remove_lora,
)
from neoxray.model.sharding import full_shape
from neoxray.model.tensor_parallel import gather_from_tp_region, group_size, tp_loss
from tests.support.gloo import Soft, all_equal_across_ranks, assert_passed, spawn_world
from tests.support.tp_models import batch, local_slice, plain_model, tiny, tp_model

SEED = 7


def randomize_b(model: nn.Module, seed: int = 5) -> None:
    """Nonzero lora_B (a fresh adapter's B is zero, which hides A's gradient): full tensors from (seed, module
    index), this rank's slice of them."""
    with torch.no_grad():
        for i, s in enumerate(lora_sites(model)):
            b = s.module.lora_B
            full = torch.randn(full_shape(b), generator=torch.Generator().manual_seed(seed * 1000 + i)) * 0.5
            b.copy_(local_slice(full, b))


# ---------------------------------------------------------------------------------------------------------
# single process
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(r=0), "lora.r"),
        (dict(r=2.0), "lora.r"),
        (dict(alpha=0), "lora.alpha"),
        (dict(alpha=float("nan")), "lora.alpha"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(targets=("query_key_value", "lm_head")), "lora.targets"),
        (dict(targets=()), "lora.targets"),
        (dict(targets=("dense", "dense")), "lora.targets"),
        (dict(use_rslora="yes"), "lora.use_rslora"),
        (dict(layers=(-1,)), "lora.layers"),
    ],
)
def test_spec_errors_name_the_field(kw, field):
    with pytest.raises(NeoxrayError, match=rf"^{field}:"):
        LoRASpec(**kw)


def test_spec_dict_round_trip_and_scaling():
    spec = LoRASpec(r=16, alpha=8, targets="dense", layers=[1], use_rslora=True)
    assert spec.targets == ("dense",) and spec.layers == (1,)
    assert spec.scaling == 8 / math.sqrt(16) and LoRASpec(r=16, alpha=8).scaling == 0.5
    assert LoRASpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(NeoxrayError, match="^lora.rank: unknown key"):
        LoRASpec.from_dict({"rank": 4})


def test_fresh_adapter_keeps_the_output_and_draws_a_from_seed_and_name():
    cfg = tiny()
    base, model = plain_model(cfg).eval(), plain_model(cfg).eval()
    paths = apply_lora(model, LoRASpec(r=4, alpha=8, targets=("query_key_value", "dense_4h_to_h"), layers=(1,)), SEED)
    assert paths == ["layers.1.attention.query_key_value", "layers.1.mlp.dense_4h_to_h"]
    ids, _ = batch(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B is zero
    a = model.layers[1].mlp.dense_4h_to_h.lora_A.detach().clone()
    assert a.shape == (4, cfg.ffn_dim) and a.abs().max() <= 1 / math.sqrt(cfg.ffn_dim) and a.std() > 0
    # a pipeline stage holding layers 1.. (numbered from 0) draws the same numbers from the same seed
    stage = nn.ModuleList([plain_model(cfg).layers[1]])
    apply_lora(stage, LoRASpec(r=4, targets=("dense_4h_to_h",)), SEED, name_map=layer_offset(1))
    assert torch.equal(stage[0].mlp.dense_4h_to_h.lora_A, a)
    init_lora(model, SEED + 1)
    assert not torch.equal(model.layers[1].mlp.dense_4h_to_h.lora_A, a)
    with pytest.raises(NeoxrayError, match="layers.1.attention.query_key_value already has adapters"):
        apply_lora(model, LoRASpec(), SEED)


def test_only_adapters_train_and_the_state_dict_holds_only_them():
    cfg = tiny()
    model = plain_model(cfg).train()
    spec = LoRASpec(r=2, alpha=4, targets=("dense", "dense_h_to_4h"))
    apply_lora(model, spec, SEED)
    randomize_b(model)
    n = mark_only_lora_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    want = {f"layers.{i}.{m}.{k}" for i in range(2) for m in ("attention.dense", "mlp.dense_h_to_4h") for k in "AB"}
    want = {w[:-1] + "lora_" + w[-1] for w in want}
    assert trainable == want == set(lora_state_dict(model)) == {name for name, _ in iter_lora_parameters(model)}
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in want)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, labels = batch(cfg)
    cross_entropy(model(ids), labels).backward()
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != (k in want), k  # adapters moved, nothing else did


def test_merge_remove_and_merge_into_agree():
    cfg = tiny(parallel_residual=False)
    ids, _ = batch(cfg)
    model = plain_model(cfg).eval()
    with torch.no_grad():
        base_out = model(ids)
    apply_lora(model, LoRASpec(r=3, alpha=5, use_rslora=True), SEED)
    randomize_b(model)
    adapter = adapter_from_model(model, LoRASpec(r=3, alpha=5, use_rslora=True))
    with torch.no_grad():
        out = model(ids)
        assert (out - base_out).abs().max() > 1e-2
        merged = merge_lora(model)
        assert not list(iter_lora_parameters(merged))
        torch.testing.assert_close(merged(ids), out, rtol=0, atol=1e-5)
        other = merge_into(plain_model(cfg).eval(), adapter)
        torch.testing.assert_close(other(ids), out, rtol=0, atol=1e-5)
        again = plain_model(cfg).eval()
        load_lora(again, adapter)
        torch.testing.assert_close(again(ids), out, rtol=0, atol=1e-5)
        assert torch.equal(remove_lora(again)(ids), base_out)
        assert type(again.layers[0].mlp.dense_h_to_4h) is nn.Linear


def test_dropout_only_in_training_and_drawn_from_the_global_generator():
    cfg = tiny()
    ids, _ = batch(cfg)
    model = plain_model(cfg)
    apply_lora(model, LoRASpec(r=4, dropout=0.3), SEED)
    randomize_b(model)
    with torch.no_grad():
        ref = model.eval()(ids)
        model.train()
        torch.manual_seed(1)
        a = model(ids)
        torch.manual_seed(1)
        b = model(ids)
        torch.manual_seed(2)
        c = model(ids)
    assert torch.equal(a, b) and not torch.equal(a, c) and (a - ref).abs().max() > 1e-3


def test_apply_lora_leaves_loaded_adapters_alone():
    """A second apply_lora (other targets) initialises only the adapters it adds."""
    cfg = tiny()
    model = plain_model(cfg)
    apply_lora(model, LoRASpec(r=2, targets=("query_key_value",)), SEED)
    randomize_b(model)
    adapter = adapter_from_model(model, LoRASpec(r=2, targets=("query_key_value",)))
    model = plain_model(cfg)
    load_lora(model, adapter)
    apply_lora(model, LoRASpec(r=2, targets=("dense",)), SEED + 3)
    for k, t in adapter.tensors.items():
        assert torch.equal(lora_state_dict(model)[k], t), k
    assert len(lora_sites(model)) == 2 * cfg.n_layers


def test_adapter_checks_its_own_tensors():
    spec = LoRASpec(r=2, targets=("dense",))
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)
    with pytest.raises(NeoxrayError, match="but no partner"):
        LoRAAdapter(spec, {"layers.0.attention.dense.lora_A": a})
    with pytest.raises(NeoxrayError, match="outside lora.targets"):
        LoRAAdapter(spec, {"layers.0.mlp.dense_4h_to_h.lora_A": a, "layers.0.mlp.dense_4h_to_h.lora_B": b})
    with pytest.raises(NeoxrayError, match="not .r, in. and .out, r. of one rank"):
        LoRAAdapter(spec, {"layers.0.attention.dense.lora_A": a, "layers.0.attention.dense.lora_B": b.T})
    adapter = LoRAAdapter(spec, {"layers.5.attention.dense.lora_A": a, "layers.5.attention.dense.lora_B": b})
    with pytest.raises(NeoxrayError, match="the model does not have"):
        load_lora(plain_model(tiny()), adapter)


# ---------------------------------------------------------------------------------------------------------
# tensor parallel: 2 gloo processes against the plain model in each
# ---------------------------------------------------------------------------------------------------------
def gather_full(t: torch.Tensor, like: torch.Tensor, group) -> torch.Tensor:
    """The full tensor of which `t` is this rank's shard (shaped like parameter `like`)."""
    dim = getattr(like, "tp_dim", None)
    if dim is None:
        return t
    parts = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


TP_CASES = {
    "parallel": (dict(parallel_residual=True, rotary_pct=0.25), LoRASpec(r=4, alpha=8)),
    "sequential-ckpt-dropout": (
        dict(parallel_residual=False, rotary_pct=1.0, activation_checkpointing=True),
        LoRASpec(r=3, alpha=5, dropout=0.25, use_rslora=True, targets=("query_key_value", "dense_4h_to_h", "dense")),
    ),
}


def check_tp_lora(group, case: str) -> None:
    cfg_kw, spec = TP_CASES[case]
    cfg = tiny(**cfg_kw)
    plain, tp = plain_model(cfg), tp_model(cfg, group)
    apply_lora(plain, spec, SEED)
    apply_lora(tp, spec, SEED)
    soft = Soft()
    sites_p, sites_t = lora_sites(plain), lora_sites(tp)
    soft.true([s.path for s in sites_p] == [s.path for s in sites_t], "the same modules carry adapters")
    sharded = 0
    for sp, st in zip(sites_p, sites_t):
        for k in ("lora_A", "lora_B"):
            p_t = getattr(st.module, k)
            sharded += getattr(p_t, "tp_dim", None) is not None
            soft.true(torch.equal(gather_full(p_t.detach(), p_t, group), getattr(sp.module, k)), f"init {st.path}.{k}")
    soft.true(sharded == len(sites_t), f"one of A, B is sharded per module ({sharded} of {len(sites_t)})")
    randomize_b(plain)
    randomize_b(tp)
    ids, labels = batch(cfg)
    with torch.no_grad():
        eval_out = plain.eval()(ids)
    for m in (plain, tp):
        mark_only_lora_trainable(m)
        m.train()
    torch.manual_seed(11)  # the same generator state in both models and on both ranks: the same dropout
    logits_p = plain(ids)
    loss_p = cross_entropy(logits_p, labels)
    torch.manual_seed(11)
    logits_t = tp(ids)
    loss_t = tp_loss(logits_t, labels, group)
    soft.close(loss_t, loss_p, "loss", rtol=1e-5, atol=0)
    soft.close(gather_from_tp_region(logits_t.detach(), group), logits_p.detach(), "logits", rtol=0, atol=1e-5)
    if spec.dropout:
        soft.true((eval_out - logits_p.detach()).abs().max() > 1e-3, "dropout changes the training output")
    else:
        soft.close(logits_p.detach(), eval_out, "no dropout: training output = eval output", rtol=0, atol=1e-6)
    loss_p.backward()
    loss_t.backward()
    for sp, st in zip(sites_p, sites_t):
        for k in ("lora_A", "lora_B"):
            p_t, p_p = getattr(st.module, k), getattr(sp.module, k)
            soft.close(gather_full(p_t.grad, p_t, group), p_p.grad, f"grad {st.path}.{k}", rtol=1e-4, atol=1e-6)
            soft.true(float(p_p.grad.norm()) > 0, f"grad {st.path}.{k} is nonzero")
            if getattr(p_t, "tp_dim", None) is None:
                soft.true(all_equal_across_ranks(p_t.grad, group), f"replicated grad differs across ranks: {k}")
    soft.true(all(p.grad is None for n, p in tp.named_parameters() if "lora_" not in n), "the base has no grads")
    # merging on each rank's own slices: the plain model's merged weights, sliced
    with torch.no_grad():
        merge_lora(plain.eval())
        merge_lora(tp.eval())
        ref = dict(plain.named_parameters())
        for name, p in tp.named_parameters():
            soft.close(p, local_slice(ref[name], p), f"merged {name}", rtol=0, atol=1e-6)
    with pytest.raises(NeoxrayError, match="tensor-parallel"):
        apply_lora(tp, spec, SEED)
        adapter_from_model(tp, spec)
    soft.check()


def _checks(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    return {case: (check_tp_lora, group, case) for case in TP_CASES}


@pytest.fixture(scope="module")
def tp_world():
    """Every TP_CASES check on both ranks of one 2-process world, spawned once: each rank's results."""
    return spawn_world(2, _checks, deadline_s=400)


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_equals_single_process(tp_world, case):
    assert_passed(tp_world, case)
