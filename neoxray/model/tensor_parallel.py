"""Megatron-style tensor parallelism (Shoeybi et al., 2019), applied by rewriting the plain model's modules.

`parallelize(model, group)` swaps, in place, the linears and embeddings of `neoxray.model.gptneox` for the
sharded layers below; the model code itself is untouched and every state_dict key stays the same.

    Attention.query_key_value, MLP.dense_h_to_4h  -> ColumnParallelLinear   weight [out/tp, in], bias [out/tp]
    Attention.dense, MLP.dense_4h_to_h            -> RowParallelLinear      weight [out, in/tp], bias replicated
    embed_in                                      -> VocabParallelEmbedding weight [V/tp, d]
    embed_out                                     -> ColumnParallelLinear   weight [V/tp, d], logits stay sharded

Per layer that is two all-reduces forward (after attention and after the MLP) and two backward (before the
QKV and the first MLP projection), as in Megatron. The loss is taken on the vocab-sharded logits by
`vocab_parallel_cross_entropy`, so the full [b, s, V] logits never exist on one rank.

Groups are passed explicitly. `group=None` (or any group of size 1) means "no tensor parallelism": every
layer then computes exactly what the plain nn.Linear / nn.Embedding computes and issues no collective.
Note that this differs from torch.distributed, where None means the default (world) group.

Sharded parameters carry `tp_dim` (the dim they are split on), `tp_rank`, `tp_size`, and
`tensor_model_parallel = True` (the attribute Megatron and DeepSpeed read); replicated parameters (the
row-parallel bias, LayerNorms) carry none. The layers re-attach these attributes after `to_empty` / `.to()` /
`load_state_dict(assign=True)` / `copy.deepcopy`, which replace parameter objects (a meta -> cpu/cuda
`to_empty` always does); other attributes set on their parameters are carried over by `to_empty` / `.to()`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.gptneox import MLP, Attention, cross_entropy
from neoxray.model.sharding import shard


# ---------------------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------------------
def group_size(group) -> int:
    """Number of ranks in the tensor-parallel group; 1 for `None`."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside the tensor-parallel group; 0 for `None`."""
    if group is None:
        return 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise NeoxrayError("this process is not a member of the tensor-parallel group it was given")
    return rank


# ---------------------------------------------------------------------------------------------------------
# autograd primitives
# ---------------------------------------------------------------------------------------------------------
def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out of place: never modifies `x`, which autograd may still hold."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.size = group, group_rank(group), group_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward. Marks where a replicated activation enters
    a sharded computation, so each rank's partial input-gradient is summed."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward. Sums the partial outputs of a row-parallel layer."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim (rank order) forward; take this rank's slice of the gradient backward.
    [..., n/tp] -> [..., n]: full logits for generation and tests."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)


# ---------------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------------
class _GroupRef:
    """Holds a process group; deep copies of a module share it (a ProcessGroup cannot be copied)."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


def _retag_after_load(module, _incompatible_keys) -> None:
    module._tag()


class _TPModule(nn.Module):
    """Keeps the sharding attributes on its parameters through to_empty / .to() / load_state_dict / deepcopy."""

    _tp_dims: dict[str, int] = {}  # parameter name -> dim it is split on (set per instance)

    def _init_group(self, group) -> None:
        self._group = _GroupRef(group)
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.register_load_state_dict_post_hook(_retag_after_load)

    @property
    def group(self):
        return self._group.group

    def _tag(self) -> None:
        for name, dim in self._tp_dims.items():
            p = self._parameters.get(name)
            if p is not None:
                p.tp_dim, p.tp_rank, p.tp_size, p.tensor_model_parallel = dim, self.tp_rank, self.tp_size, True

    def __setstate__(self, state):  # copy.deepcopy: copied Parameters lose their attributes
        super().__setstate__(state)
        self._tag()

    def _apply(self, fn, recurse=True):
        extra = {k: dict(p.__dict__) for k, p in self._parameters.items() if p is not None}
        out = super()._apply(fn, recurse)
        for k, attrs in extra.items():
            p = self._parameters.get(k)
            if p is not None:
                for a, v in attrs.items():
                    if not hasattr(p, a):
                        setattr(p, a, v)
        self._tag()
        return out

    def _copy_from(self, sources: dict[str, torch.Tensor | None]) -> None:
        """Fill this rank's shards from full (unsharded) tensors; nothing to do for meta tensors."""
        with torch.no_grad():
            for name, full in sources.items():
                p = self._parameters[name]
                if full is None:
                    continue
                p.requires_grad_(full.requires_grad)
                if not p.is_meta:
                    dim = self._tp_dims.get(name)
                    p.copy_(full if dim is None else shard(full, dim, self.tp_rank, self.tp_size))


def _check_divisible(n: int, size: int, what: str, where: str = "") -> None:
    if n % size:
        raise NeoxrayError(f"{what} ({n}) must be divisible by the tensor-parallel size ({size}){where}")


class ColumnParallelLinear(_TPModule):
    """y = x W^T + b with W split by output rows: weight [out/tp, in], bias [out/tp]. The input is replicated
    (copy-to-region: its gradient is all-reduced); the output stays sharded on its last dim unless
    `gather_output`. `out_features` is the LOCAL number of outputs, `full_out_features` the total.
    Parameters are left uninitialised (fill them with `neoxray.model.init.init_parameters` or a checkpoint),
    or use `from_linear` to shard an existing nn.Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group=None,
        gather_output: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._init_group(group)
        _check_divisible(out_features, self.tp_size, "output features")
        self.in_features, self.full_out_features = in_features, out_features
        self.out_features = out_features // self.tp_size
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._tp_dims = {"weight": 0, "bias": 0}
        self._tag()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, gather_output: bool = False) -> ColumnParallelLinear:
        w = linear.weight
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group,
            gather_output,
            device=w.device,
            dtype=w.dtype,
        )
        m._copy_from({"weight": w, "bias": linear.bias})
        return m.train(linear.training)

    def forward(self, x):  # [..., in] -> [..., out/tp]  (or [..., out] with gather_output)
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)
        return gather_from_tp_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (of {self.full_out_features}), "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )


class RowParallelLinear(_TPModule):
    """y = sum over ranks of x_r W_r^T, + b: weight [out, in/tp] split by input columns, bias [out] replicated.
    The input is already sharded on its last dim (a column-parallel output); the partial products are
    all-reduced, then the bias is added once. `in_features` is the LOCAL number of inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, device=None, dtype=None):
        super().__init__()
        self._init_group(group)
        _check_divisible(in_features, self.tp_size, "input features")
        self.full_in_features, self.out_features = in_features, out_features
        self.in_features = in_features // self.tp_size
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._tp_dims = {"weight": 1}
        self._tag()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group) -> RowParallelLinear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group, device=w.device, dtype=w.dtype)
        m._copy_from({"weight": w, "bias": linear.bias})
        return m.train(linear.training)

    def forward(self, x):  # [..., in/tp] -> [..., out]
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (of {self.full_in_features}), out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )


class VocabParallelEmbedding(_TPModule):
    """Embedding with its rows split by vocabulary: weight [V/tp, d], rank r holding ids
    [vocab_start, vocab_start + V/tp). Ids outside that range look up row 0 and are zeroed; the all-reduce
    then gives every rank the full embedding. `num_embeddings` is the LOCAL row count."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, device=None, dtype=None):
        super().__init__()
        self._init_group(group)
        _check_divisible(num_embeddings, self.tp_size, "vocabulary rows")
        self.full_num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings = num_embeddings // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings
        self.weight = nn.Parameter(torch.empty(self.num_embeddings, embedding_dim, device=device, dtype=dtype))
        self._tp_dims = {"weight": 0}
        self._tag()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group) -> VocabParallelEmbedding:
        if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise NeoxrayError(
                "VocabParallelEmbedding supports plain embeddings only "
                "(no padding_idx, max_norm, sparse or scale_grad_by_freq)"
            )
        w = emb.weight
        m = cls(emb.num_embeddings, emb.embedding_dim, group, device=w.device, dtype=w.dtype)
        m._copy_from({"weight": w})
        return m.train(emb.training)

    def forward(self, ids):  # [...] -> [..., d]
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.num_embeddings)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(x, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (of {self.full_num_embeddings}, from id {self.vocab_start}), "
            f"{self.embedding_dim}, tp={self.tp_rank}/{self.tp_size}"
        )


# ---------------------------------------------------------------------------------------------------------
# loss on vocab-sharded logits
# ---------------------------------------------------------------------------------------------------------
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits sharded on the vocab dim (0 when every label is ignored), in fp32, without
    gathering them: a max all-reduce for stability, then one all-reduce of [sum of exp, target logit] (the target
    logit is found on the rank that holds it and zero elsewhere). Backward: (softmax - onehot) on the local
    shard."""

    @staticmethod
    def forward(ctx, logits, labels, group, ignore_index):
        size, rank = group_size(group), group_rank(group)
        x = logits.to(torch.float32, copy=True)  # [b, s, V/tp], becomes the softmax in place
        v = x.shape[-1]
        start = rank * v
        m = x.amax(dim=-1)  # [b, s]
        if size > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        x.sub_(m.unsqueeze(-1))
        outside = (labels < start) | (labels >= start + v)  # ignored labels (-100) are outside every shard
        local = (labels - start).masked_fill(outside, 0)
        target = x.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)  # [b, s]
        x.exp_()
        stats = torch.stack((x.sum(dim=-1), target))  # [2, b, s]
        if size > 1:
            dist.all_reduce(stats, group=group)
        sum_exp, target = stats[0], stats[1]
        valid = labels != ignore_index
        count = valid.sum().clamp(min=1)  # no label to train: a loss of 0 (no NaN), decided without a host sync
        loss = (sum_exp.log() - target).masked_fill(~valid, 0.0).sum() / count
        x.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(x, local, outside, valid, count)
        ctx.logits_dtype, ctx.done = logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.done:
            raise RuntimeError("vocab_parallel_cross_entropy: backward may run only once (it reuses its buffer)")
        ctx.done = True
        softmax, local, outside, valid, count = ctx.saved_tensors
        grad = softmax  # [b, s, V/tp], reused in place
        flat = grad.view(-1, grad.shape[-1])
        rows = torch.arange(flat.shape[0], device=flat.device)
        flat[rows, local.reshape(-1)] -= (~outside).reshape(-1).to(flat.dtype)
        grad.mul_((valid.to(grad.dtype) * (grad_loss / count)).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token loss from this rank's vocab shard of the logits [b, s, V/tp] (rank r holding vocab
    columns [r V/tp, (r+1) V/tp)) and the full labels [b, s]; labels equal to `ignore_index` are left out.
    Computed in fp32; with a size-1 group it equals F.cross_entropy on the full logits."""
    return _VocabParallelCrossEntropy.apply(logits, labels, group, ignore_index)


def tp_loss(logits: torch.Tensor, labels: torch.Tensor, group, ignore_index: int = -100) -> torch.Tensor:
    """The training loss for logits from a (possibly) tensor-parallel model: vocab-parallel cross-entropy on
    sharded logits when the group has more than one rank, else the plain model's `cross_entropy`."""
    if group_size(group) > 1:
        return vocab_parallel_cross_entropy(logits, labels, group, ignore_index)
    return cross_entropy(logits, labels, ignore_index)


# ---------------------------------------------------------------------------------------------------------
# the rewrite
# ---------------------------------------------------------------------------------------------------------
_PARALLEL = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def parallelize(module: nn.Module, group) -> nn.Module:
    """Rewrite `module` in place for tensor parallelism over `group` and return it.

    Wherever they occur inside `module` (a GPTNeoX, a Layer, a pipeline stage's pieces or module list):
    every `Attention`'s `query_key_value` (column) and `dense` (row), every `MLP`'s `dense_h_to_4h` (column) and
    `dense_4h_to_h` (row), any child named `embed_in` that is an nn.Embedding (vocab-parallel) and any child
    named `embed_out` that is an nn.Linear (column, logits left sharded). Meta-device modules get meta shards
    (nothing allocated: then `to_empty` and initialise or load); materialised ones get this rank's slice of
    their current weights. Everything is checked before anything is changed: a size that does not divide
    raises NeoxrayError naming the config key (model.n_heads, model.vocab_size, model.intermediate_size).
    Layers already parallel (for the same group size) are left alone. A `None` / size-1 group still rewrites
    (layers that compute exactly what the plain ones do), so every layout has the same module types."""
    size = group_size(group)
    group_rank(group)  # membership check
    plan: list[tuple[nn.Module, str, Any]] = []

    def already(name: str, child: nn.Module) -> bool:
        if isinstance(child, _PARALLEL):
            if child.tp_size != size:
                raise NeoxrayError(f"{name} is already tensor-parallel over {child.tp_size} ranks, not {size}")
            return True
        return False

    for path, mod in module.named_modules():
        where = f" (at {path or type(module).__name__})"  # e.g. "(at layers.0.attention)"
        if isinstance(mod, Attention):
            qkv, dense = mod.query_key_value, mod.dense
            if not already(f"{path}.query_key_value", qkv):
                heads = qkv.out_features // (3 * mod.head_dim)
                _check_divisible(heads, size, "model.n_heads", where)
                plan.append((mod, "query_key_value", lambda m: ColumnParallelLinear.from_linear(m, group)))
            if not already(f"{path}.dense", dense):
                plan.append((mod, "dense", lambda m: RowParallelLinear.from_linear(m, group)))
        elif isinstance(mod, MLP):
            up = mod.dense_h_to_4h
            if not already(f"{path}.dense_h_to_4h", up):
                _check_divisible(up.out_features, size, "model.intermediate_size (the MLP width)", where)
                plan.append((mod, "dense_h_to_4h", lambda m: ColumnParallelLinear.from_linear(m, group)))
            if not already(f"{path}.dense_4h_to_h", mod.dense_4h_to_h):
                plan.append((mod, "dense_4h_to_h", lambda m: RowParallelLinear.from_linear(m, group)))
        emb = mod._modules.get("embed_in")
        if isinstance(emb, nn.Embedding):
            _check_divisible(emb.num_embeddings, size, "model.vocab_size", where)
            plan.append((mod, "embed_in", lambda m: VocabParallelEmbedding.from_embedding(m, group)))
        head = mod._modules.get("embed_out")
        if isinstance(head, nn.Linear):
            _check_divisible(head.out_features, size, "model.vocab_size", where)
            plan.append((mod, "embed_out", lambda m: ColumnParallelLinear.from_linear(m, group)))

    for parent, attr, make in plan:
        setattr(parent, attr, make(getattr(parent, attr)))
    return module
