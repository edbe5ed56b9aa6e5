"""Tensor parallelism against the plain single-process model.

The distributed checks run in real processes: one gloo world of 2 CPU ranks and one of 4 (where the 4-rank
world also runs tensor parallel over two 2-rank subgroups, so group-local ranks differ from global ones).
Each world is spawned once per module; every check runs on every rank and reports its own result, and each
check is one pytest test below. The reference is always the plain `GPTNeoX` in the same process, initialised
by `init_parameters` with the same seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.gptneox import GPTNeoX, Layer, cross_entropy, rotary_cos_sin
from neoxray.model.init import init_parameters, layer_offset
from neoxray.model.sharding import full_shape, shard
from neoxray.model.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    parallelize,
    reduce_from_tp_region,
    tp_loss,
    vocab_parallel_cross_entropy,
)
from tests.support.gloo import Soft, all_equal_across_ranks, assert_passed, spawn_world
from tests.support.tp_models import SEED, V, batch, local_slice, plain_model, tiny, tp_model

CONFIGS = {
    "parallel-rot0.25": dict(parallel_residual=True, rotary_pct=0.25),
    "sequential-rot1.0-ckpt": dict(parallel_residual=False, rotary_pct=1.0, activation_checkpointing=True),
}


# ---------------------------------------------------------------------------------------------------------
# checks run on every rank of a group
# ---------------------------------------------------------------------------------------------------------
def check_parity(group, cfg_kw):
    """TP model == plain model: init, loss, gathered logits, every gradient, one AdamW step."""
    cfg = tiny(**cfg_kw)
    size = group_size(group)
    plain, tp = plain_model(cfg).train(), tp_model(cfg, group).train()
    ref = dict(plain.named_parameters())
    assert [n for n, _ in tp.named_parameters()] == list(ref)
    # sharding attributes survived to_empty: embed_in, embed_out + per layer QKV w/b, dense w, h_to_4h w/b, 4h_to_h w
    assert sum(hasattr(p, "tp_dim") for p in tp.parameters()) == 2 + 6 * cfg.n_layers
    for name, p in tp.named_parameters():
        assert torch.equal(p, local_slice(ref[name], p)), f"init differs: {name}"

    inputs, labels = batch(cfg)
    soft = Soft()
    logits_p = plain(inputs)
    loss_p = cross_entropy(logits_p, labels)
    logits_t = tp(inputs)
    soft.true(logits_t.shape == (*inputs.shape, V // size), f"sharded logits have shape {tuple(logits_t.shape)}")
    loss_t = tp_loss(logits_t, labels, group)
    soft.close(loss_t, loss_p, "loss", rtol=1e-5, atol=0)
    soft.close(gather_from_tp_region(logits_t.detach(), group), logits_p.detach(), "logits", rtol=0, atol=1e-5)

    loss_p.backward()
    loss_t.backward()
    for name, p in tp.named_parameters():
        want = local_slice(ref[name].grad, p)
        soft.close(p.grad, want, f"grad {name}", rtol=1e-5, atol=1e-6)
        soft.true(float((p.grad - want).norm()) <= 1e-5 * float(want.norm()), f"grad {name}: relative error")
        if getattr(p, "tp_dim", None) is None:
            soft.true(all_equal_across_ranks(p.grad, group), f"replicated gradient differs across ranks: {name}")

    # Adam's first step is g / (|g| + eps) per element: with the default eps (1e-8) a gradient that is zero
    # but for rounding (the key bias outside the rotary dims) turns rounding noise into a step of +-lr. eps 1e-5
    # keeps the comparison well conditioned; 5e-6 is then 0.5% of a step (lr 1e-3).
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-5, weight_decay=0.1) for m in (plain, tp)]
    for o in opts:
        o.step()
    for name, p in tp.named_parameters():
        soft.close(p.detach(), local_slice(ref[name].detach(), p), f"after step {name}", rtol=0, atol=5e-6)
        if getattr(p, "tp_dim", None) is None:
            soft.true(all_equal_across_ranks(p.detach(), group), f"replicated parameter differs across ranks: {name}")
    with torch.no_grad():  # and the next forward still agrees
        soft.close(
            tp_loss(tp(inputs), labels, group),
            cross_entropy(plain(inputs), labels),
            "loss after step",
            rtol=1e-5,
            atol=0,
        )
    soft.check()


def check_materialised_rewrite(group):
    """parallelize() of a materialised model keeps this rank's slices (QKV by whole heads), the state_dict keys,
    the sharding attributes (also through .to() and load_state_dict(assign=True)) and the model's output."""
    cfg = tiny()
    rank, size = group_rank(group), group_size(group)
    model = plain_model(cfg)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    inputs, labels = batch(cfg)
    with torch.no_grad():
        before = model(inputs)
    assert parallelize(model, group) is model
    twin = copy.deepcopy(model)  # shares the process group
    with torch.no_grad():  # (collectives first, then the per-rank assertions)
        after = gather_from_tp_region(model(inputs), group)
        after_twin = gather_from_tp_region(twin(inputs), group)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert torch.equal(after_twin, after) and twin.embed_in.group is group and twin.embed_in.weight.tp_dim == 0
    assert list(model.state_dict()) == keys
    att, mlp = model.layers[0].attention, model.layers[0].mlp
    assert isinstance(att.query_key_value, ColumnParallelLinear) and isinstance(att.dense, RowParallelLinear)
    assert isinstance(mlp.dense_h_to_4h, ColumnParallelLinear) and isinstance(mlp.dense_4h_to_h, RowParallelLinear)
    assert isinstance(model.embed_in, VocabParallelEmbedding) and isinstance(model.embed_out, ColumnParallelLinear)
    assert model.embed_out.bias is None
    assert att.query_key_value.out_features == 3 * cfg.d_model // size and att.dense.in_features == cfg.d_model // size
    assert (
        mlp.dense_h_to_4h.out_features == cfg.ffn_dim // size and mlp.dense_4h_to_h.in_features == cfg.ffn_dim // size
    )
    assert model.embed_in.num_embeddings == V // size and model.embed_in.vocab_start == rank * V // size

    dims = {
        "embed_in.weight": 0,
        "embed_out.weight": 0,
        "query_key_value.weight": 0,
        "query_key_value.bias": 0,
        "dense_h_to_4h.weight": 0,
        "dense_h_to_4h.bias": 0,
        "attention.dense.weight": 1,
        "dense_4h_to_h.weight": 1,
    }
    for name, p in model.named_parameters():
        want = next((d for k, d in dims.items() if name.endswith(k)), None)
        assert getattr(p, "tp_dim", None) == want, name
        if want is None:
            assert not any(hasattr(p, a) for a in ("tp_rank", "tp_size")), name
            assert torch.equal(p, full[name]), name
        else:
            assert (p.tp_rank, p.tp_size) == (rank, size) and full_shape(p) == full[name].shape, name
            assert torch.equal(p, shard(full[name], want, rank, size)), name

    # QKV rows are [q_h | k_h | v_h] per head: this rank holds heads [rank H/tp, (rank+1) H/tp) whole
    h_local, hd = cfg.n_heads // size, cfg.head_dim
    per_head = full["layers.0.attention.query_key_value.weight"].view(cfg.n_heads, 3 * hd, cfg.d_model)
    mine = per_head[rank * h_local : (rank + 1) * h_local].reshape(-1, cfg.d_model)
    assert torch.equal(att.query_key_value.weight, mine)

    model.to(torch.bfloat16)
    assert model.embed_in.weight.dtype == torch.bfloat16 and model.embed_in.weight.tp_dim == 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert att.dense.weight.tp_dim == 1 and att.dense.weight.tp_size == size and not hasattr(att.dense.bias, "tp_dim")


def check_vocab_parallel_cross_entropy(group):
    """Equals F.cross_entropy on the full logits (fp32 and bf16 inputs, ignore_index), gradient included."""
    rank, size = group_rank(group), group_size(group)
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 5, V, generator=g) * 4
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[1, 2:] = -100
    soft = Soft()
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-3)):
        for ignore_index in (-100, int(labels[0, 0])):
            labels = labels.masked_fill(labels == -100, ignore_index)  # the second time: another ignored id
            ref_in = full.to(dtype).clone().requires_grad_()
            ref = F.cross_entropy(ref_in.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
            (ref * 2.5).backward()
            mine_in = shard(full.to(dtype), 2, rank, size).requires_grad_()
            loss = vocab_parallel_cross_entropy(mine_in, labels, group, ignore_index=ignore_index)
            (loss * 2.5).backward()
            what = f"{dtype} ignore_index={ignore_index}"
            soft.true(loss.dtype == torch.float32 and mine_in.grad.dtype == dtype, f"{what}: dtypes")
            soft.close(loss, ref, f"{what}: loss", rtol=1e-6, atol=0)
            soft.close(
                mine_in.grad.float(), shard(ref_in.grad.float(), 2, rank, size), f"{what}: grad", rtol=0, atol=tol
            )
    x = shard(full, 2, rank, size)
    soft.close(tp_loss(x, labels, group), cross_entropy(full, labels), "tp_loss", rtol=1e-6, atol=0)
    soft.check()


def check_primitives(group):
    """copy / reduce / gather: forward values and backward gradients over the group."""
    rank, size = group_rank(group), group_size(group)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(100)).requires_grad_()  # replicated
    (copy_to_tp_region(x, group) * (rank + 1)).sum().backward()
    soft = Soft()
    soft.close(x.grad, torch.full_like(x, size * (size + 1) / 2), "copy: grad")

    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = reduce_from_tp_region(x, group)
    soft.true(torch.equal(y, torch.full((2, 3), size * (size + 1) / 2)), "reduce: sum")
    soft.true(bool(torch.all(x == rank + 1)), "reduce: input modified")  # out of place
    y.sum().backward()
    soft.true(torch.equal(x.grad, torch.ones(2, 3)), "reduce: grad")

    mine = lambda r: torch.randn(2, 3, generator=torch.Generator().manual_seed(200 + r))
    x = mine(rank).requires_grad_()
    y = gather_from_tp_region(x, group)
    soft.true(torch.equal(y, torch.cat([mine(r) for r in range(size)], dim=-1)), "gather: values")
    w = torch.randn(2, 3 * size, generator=torch.Generator().manual_seed(300))
    (y * w).sum().backward()
    soft.true(torch.equal(x.grad, w.chunk(size, dim=-1)[rank]), "gather: grad")

    lin = nn.Linear(6, 4 * size)  # the same on every rank (seeded below)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4 * size, 6, generator=torch.Generator().manual_seed(400)))
        lin.bias.copy_(torch.randn(4 * size, generator=torch.Generator().manual_seed(401)))
    col = ColumnParallelLinear.from_linear(lin, group, gather_output=True)
    x1, x2 = (torch.randn(3, 6, generator=torch.Generator().manual_seed(500)).requires_grad_() for _ in range(2))
    (col(x1) ** 2).sum().backward()
    (lin(x2) ** 2).sum().backward()
    soft.close(x1.grad, x2.grad, "gather_output: input grad", rtol=1e-5, atol=1e-6)
    soft.close(
        col.weight.grad, shard(lin.weight.grad, 0, rank, size), "gather_output: weight grad", rtol=1e-5, atol=1e-6
    )
    soft.check()


def check_pipeline_pieces(group):
    """Pieces of a pipeline stage, parallelised and initialised alone, equal their part of the full model:
    a module list holding layer 1 as its item 0, a single Layer with a prefix, and embedding / head pieces
    (children named embed_in / embed_out outside any GPTNeoX)."""
    cfg = tiny(parallel_residual=False)
    ref = dict(plain_model(cfg).named_parameters())

    def build(make, **init_kw):
        with torch.device("meta"):
            m = make()
        parallelize(m, group).to_empty(device="cpu")
        init_parameters(m, SEED, **init_kw)
        return m

    stage = build(lambda: nn.ModuleList([Layer(cfg, 1)]), config=cfg, name_map=layer_offset(1))
    # one tensor-parallel layer computes what the plain layer computes (collectives first)
    plain_layer = plain_model(cfg).layers[1]
    x = torch.randn(2, 8, cfg.d_model, generator=torch.Generator().manual_seed(5))
    cos, sin = rotary_cos_sin(torch.arange(8)[None].expand(2, 8), cfg.rotary_dim, cfg.rotary_base, x.dtype)
    with torch.no_grad():
        torch.testing.assert_close(stage[0](x, cos, sin), plain_layer(x, cos, sin), rtol=0, atol=1e-5)
    for name, p in stage.named_parameters():
        assert torch.equal(p, local_slice(ref["layers.1." + name[2:]], p)), name
    layer = build(lambda: Layer(cfg, 1), config=cfg, prefix="layers.1.")
    for name, p in layer.named_parameters():
        assert torch.equal(p, local_slice(ref["layers.1." + name], p)), name

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_in = nn.Embedding(V, cfg.d_model)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.final_layer_norm = nn.LayerNorm(cfg.d_model)
            self.embed_out = nn.Linear(cfg.d_model, V, bias=False)

    for piece in (build(Embed), build(Head)):
        assert any(isinstance(m, (VocabParallelEmbedding, ColumnParallelLinear)) for m in piece.modules())
        for name, p in piece.named_parameters():
            assert torch.equal(p, local_slice(ref[name], p)), name


def check_size_errors(group):
    """Sizes that do not divide by the group name the config key, and leave the model untouched."""
    size = group_size(group)
    assert size in (2, 4)
    for kw, key in (
        (dict(d_model=48, n_heads=3), "model.n_heads"),
        (dict(vocab_size=511), "model.vocab_size"),
        (dict(intermediate_size=129), "model.intermediate_size"),
    ):
        with torch.device("meta"):
            m = GPTNeoX(tiny(**kw))
        try:
            parallelize(m, group)
        except NeoxrayError as e:
            assert key in str(e), str(e)
        else:
            raise AssertionError(f"no NeoxrayError for {kw}")
        assert not any(
            isinstance(x, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)) for x in m.modules()
        ), "model changed before the error"
    try:
        shard(torch.zeros(6, 5), 1, 0, size)
    except NeoxrayError as e:
        assert "dim 1" in str(e)
    else:
        raise AssertionError("shard() did not refuse an uneven split")


def _worker_checks(groups: dict):
    checks = {}
    for label, group in groups.items():
        for cname, kw in CONFIGS.items():
            checks[f"{label}-parity-{cname}"] = (check_parity, group, kw)
        if label == "tp2-sub":
            continue
        for fn in (
            check_materialised_rewrite,
            check_vocab_parallel_cross_entropy,
            check_primitives,
            check_pipeline_pieces,
            check_size_errors,
        ):
            checks[f"{label}-{fn.__name__[6:]}"] = (fn, group)
    return checks


def check_names(world: int) -> list[str]:
    labels = {2: ["tp2"], 4: ["tp4", "tp2-sub"]}[world]
    return list(_worker_checks(dict.fromkeys(labels)))


def _checks(rank: int, world: int) -> dict:
    groups = {f"tp{world}": dist.new_group(list(range(world)))}
    if world == 4:  # two tensor-parallel groups of 2: [0, 1] and [2, 3] (every rank creates every group)
        subs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups["tp2-sub"] = subs[rank // 2]
    return _worker_checks(groups)


@pytest.fixture(scope="module")
def worlds():
    """Each world is spawned once, by the first test that needs it."""
    cache: dict[int, list[dict]] = {}
    return lambda n: cache[n] if n in cache else cache.setdefault(n, spawn_world(n, _checks))


@pytest.mark.parametrize(
    "n, check",
    [(n, c) for n in (2, 4) for c in check_names(n)],
    ids=[f"world{n}-{c}" for n in (2, 4) for c in check_names(n)],
)
def test_distributed(worlds, n, check):
    assert_passed(worlds(n), check)


# ---------------------------------------------------------------------------------------------------------
# single process: group=None is the plain model exactly; init; helpers
# ---------------------------------------------------------------------------------------------------------
def test_group_none_layers_equal_plain_modules_exactly():
    torch.manual_seed(0)
    lin, emb = nn.Linear(16, 24), nn.Embedding(50, 16)
    x = torch.randn(3, 5, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 5))
    for make in (ColumnParallelLinear.from_linear, RowParallelLinear.from_linear):
        par = make(lin, None)
        x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        a, b = lin(x1), par(x2)
        assert torch.equal(a, b)
        a.square().sum().backward()
        b.square().sum().backward()
        assert torch.equal(x1.grad, x2.grad) and torch.equal(lin.weight.grad, par.weight.grad)
        assert torch.equal(lin.bias.grad, par.bias.grad)
        lin.zero_grad()
    par = VocabParallelEmbedding.from_embedding(emb, None)
    assert torch.equal(par(ids), emb(ids))
    for t in (x, ids):
        for prim in (copy_to_tp_region, reduce_from_tp_region, gather_from_tp_region):
            assert prim(t, None) is t


def test_parallelize_with_no_group_is_the_plain_model_exactly():
    cfg = tiny()
    plain, par = plain_model(cfg), parallelize(plain_model(cfg), None)
    assert isinstance(par.layers[1].mlp.dense_4h_to_h, RowParallelLinear)
    inputs, labels = batch(cfg)
    lp, lt = plain(inputs), par(inputs)
    assert torch.equal(lp, lt)
    cross_entropy(lp, labels).backward()
    tp_loss(lt, labels, None).backward()
    for (n, p), q in zip(plain.named_parameters(), par.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_vocab_parallel_cross_entropy_single_rank_equals_f_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 7, 33, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 33, (2, 7), generator=g)
    labels[0, :4] = -100
    ref_in = logits.detach().clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, labels, None)
    ref = F.cross_entropy(ref_in.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.backward(retain_graph=True)
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_in.grad, rtol=0, atol=1e-7)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    assert tp_loss(ref_in, labels, None) == cross_entropy(ref_in, labels)
