"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for GPT-NeoX.

A target linear y = x W^T + b gains a low-rank update:

    y = x W^T + b + scaling * B(A(dropout(x)))      A [r, in], B [out, r]
    scaling = alpha / r      (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

Targets are the four linears of each GPT-NeoX layer; what an adapter is (`LoRASpec`: rank, alpha, dropout,
targets, rsLoRA, layers), the targets and the checks are in `neoxray.model.lora_spec`, without torch. `apply_lora`
rewrites a model (a `GPTNeoX`, a `Layer`, or a pipeline stage's pieces) in place, like
`neoxray.model.tensor_parallel.parallelize`: each target module keeps its class's behaviour and its parameter
names and gains two parameters, so

    layers.3.attention.query_key_value.weight   (unchanged: checkpoints and loaders keep working)
    layers.3.attention.query_key_value.lora_A   [r, in]
    layers.3.attention.query_key_value.lora_B   [out, r]

(`neoxray.model.peft_format` maps these names to peft's, 1:1). Apply LoRA after `parallelize`, never before: the
tensor-parallel rewrite would drop the adapter. Sharding follows the base weight:

    column-parallel base (query_key_value, dense_h_to_4h): A replicated, B split by output rows (tp_dim 0) like W,
        which keeps the fused QKV's per-head [q_h | k_h | v_h] rows right. The backward all-reduce of the
        input's gradient carries the rank-r gradient of A x too (one collective, as before).
    row-parallel base (attention.dense, dense_4h_to_h): A split by input columns (tp_dim 1) like W, B replicated.
        The partial x_r A_r^T goes through the base's single forward all-reduce, concatenated with x_r W_r^T:
        y = allreduce([x_r W_r^T | x_r A_r^T]) -> base part + scaling * (sum_r x_r A_r^T) B^T + b, which is
        allreduce(x_r W_r^T + scaling * (x_r A_r^T) B^T) + b with B's gradient complete on every rank.

Sharded adapter parameters carry `tp_dim/tp_rank/tp_size` like the base's (`neoxray.model.sharding`).
Initialisation does not depend on the layout: A is drawn full-size (kaiming-uniform with a = sqrt(5), nn.Linear's
and peft's default: U(-1/sqrt(in), 1/sqrt(in))) from a generator seeded by (seed, the plain-model name of A, e.g.
"layers.3.mlp.dense_h_to_4h.lora_A"), as `neoxray.model.init` does, then sliced; B is zero. Dropout (training mode
only) draws the mask of the full input on every rank and keeps this rank's slice, so with the same generator
state on every tensor-parallel rank (neoxray's training engine seeds them alike) every layout drops the same units.

Build recipes:
    fresh adapter on a base:   build -> parallelize -> to_empty -> load/init the base -> apply_lora(m, spec, seed)
    resume a LoRA checkpoint:  build -> parallelize -> apply_lora (meta is fine) -> to_empty -> load every tensor
then `mark_only_lora_trainable(m)`. Serving many adapters at once: `neoxray.model.multi_lora`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.gptneox import MLP, Attention
from neoxray.model.init import param_seed
from neoxray.model.lora_spec import LORA_PARAMS, MODULE_PATH, TARGETS, LoRASpec, lora_scaling, target_shape
from neoxray.model.sharding import full_shape, shard
from neoxray.model.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
)


# ---------------------------------------------------------------------------------------------------------
# an adapter's weights (what an adapter is, its targets and checks: neoxray.model.lora_spec)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LoRAAdapter:
    """An adapter's weights as full (unsharded) tensors under plain-model names,
    "layers.N.attention.query_key_value.lora_A" [r, in] and ".lora_B" [out, r]. Ranks come from the tensors
    (they may differ per module, as peft's rank_pattern allows); `alphas` holds per-module alphas (peft's
    alpha_pattern) by module path where they differ from spec.alpha."""

    spec: LoRASpec
    tensors: dict[str, torch.Tensor]
    alphas: dict[str, float] = field(default_factory=dict)
    name: str = "adapter"

    def __post_init__(self):
        paths = set()
        for key in self.tensors:
            path, _, kind = key.rpartition(".")
            m = MODULE_PATH.fullmatch(path)
            if m is None or kind not in LORA_PARAMS:
                raise NeoxrayError(f"{self.name}: {key!r} is not a GPT-NeoX LoRA tensor name")
            if m.group(2).split(".")[1] not in self.spec.targets:
                raise NeoxrayError(
                    f"{self.name}: {key} targets a module outside lora.targets {list(self.spec.targets)}"
                )
            if self.spec.layers is not None and int(m.group(1)) not in self.spec.layers:
                raise NeoxrayError(f"{self.name}: {key} is in a layer outside lora.layers {list(self.spec.layers)}")
            paths.add(path)
        for path in paths:
            a, b = self.tensors.get(f"{path}.lora_A"), self.tensors.get(f"{path}.lora_B")
            if a is None or b is None:
                raise NeoxrayError(f"{self.name}: {path} has {'lora_A' if b is None else 'lora_B'} but no partner")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise NeoxrayError(
                    f"{self.name}: {path}.lora_A {tuple(a.shape)} and .lora_B {tuple(b.shape)} are not [r, in] and "
                    "[out, r] of one rank"
                )
        unknown = sorted(set(self.alphas) - paths)
        if unknown:
            raise NeoxrayError(f"{self.name}: alpha given for {unknown[0]}, which has no weights")

    def modules(self) -> list[str]:
        """Module paths with weights, in model order."""
        paths = {k.rpartition(".")[0] for k in self.tensors}
        return sorted(paths, key=lambda p: (int(MODULE_PATH.fullmatch(p).group(1)), TARGETS.index(p.split(".")[-1])))

    def rank(self, path: str) -> int:
        return self.tensors[f"{path}.lora_A"].shape[0]

    def alpha(self, path: str) -> float:
        return self.alphas.get(path, self.spec.alpha)

    def scaling(self, path: str) -> float:
        return lora_scaling(self.alpha(path), self.rank(path), self.spec.use_rslora)

    def check_shapes(self, config, where: str | None = None, key=None) -> None:
        """Every tensor against a GPT-NeoX of `config` (a ModelConfig): a NeoxrayError naming the first that does
        not fit (`key(name)`: how to name it, e.g. peft's tensor name)."""
        where, key = where or self.name, key or (lambda n: n)
        for name, t in self.tensors.items():
            path, _, kind = name.rpartition(".")
            layer, target = int(MODULE_PATH.fullmatch(path).group(1)), path.split(".")[-1]
            if layer >= config.n_layers:
                raise NeoxrayError(f"{where}: tensor {key(name)} is for layer {layer}; the base has {config.n_layers}")
            n_in, n_out = target_shape(config, target)
            want = (t.shape[0], n_in) if kind == "lora_A" else (n_out, t.shape[1])
            if tuple(t.shape) != want:
                raise NeoxrayError(
                    f"{where}: tensor {key(name)} has shape {tuple(t.shape)}, the base model expects {want}"
                )


# ---------------------------------------------------------------------------------------------------------
# the forward, shared by the single adapter here and the batched adapters of neoxray.model.multi_lora
# ---------------------------------------------------------------------------------------------------------
def lora_linear_forward(m: nn.Module, x: torch.Tensor, down, up) -> torch.Tensor:
    """y = base(x) + up(down(x)) for a plain or tensor-parallel linear `m`, where down: [..., in_local] ->
    [..., r] (linear in x, partial per rank for a row-parallel base) and up: [..., r] -> [..., out_local].
    `down` returning None means no adapter: the base's own forward."""
    tp = getattr(m, "tp_size", 1)
    if tp > 1 and isinstance(m, RowParallelLinear):
        h = down(x)
        if h is None:
            return m.base_forward(x)
        y = F.linear(x, m.weight)
        both = reduce_from_tp_region(torch.cat((y, h.to(y.dtype)), dim=-1), m.group)  # the base's one all-reduce
        y = both[..., : y.shape[-1]] + up(both[..., y.shape[-1] :])
        return y if m.bias is None else y + m.bias
    if tp > 1 and isinstance(m, ColumnParallelLinear):
        h = down(x)
        if h is None:
            return m.base_forward(x)
        n = x.shape[-1]
        both = copy_to_tp_region(torch.cat((x, h.to(x.dtype)), dim=-1), m.group)  # backward: one all-reduce
        y = F.linear(both[..., :n], m.weight, m.bias) + up(both[..., n:])
        return gather_from_tp_region(y, m.group) if m.gather_output else y
    h = down(x)
    if h is None:
        return m.base_forward(x)
    return F.linear(x, m.weight, m.bias) + up(h)


def row_sharded_input(m: nn.Module) -> bool:
    return isinstance(m, RowParallelLinear) and m.tp_size > 1


def lora_dropout(m: nn.Module, x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout whose mask does not depend on the layout: the full input's mask is drawn, and a
    row-parallel rank keeps its slice of it."""
    if not m.training or p == 0:
        return x
    n = x.shape[-1]
    sharded = row_sharded_input(m)
    keep = torch.empty((*x.shape[:-1], n * m.tp_size if sharded else n), device=x.device, dtype=x.dtype)
    keep.bernoulli_(1 - p)
    if sharded:
        keep = keep.narrow(-1, m.tp_rank * n, n)
    return x * keep * (1.0 / (1 - p))


class LoRAMixin:
    """A target linear with one adapter: `lora_A` [r, in_local], `lora_B` [out_local, r]; `lora_r`,
    `lora_scaling`, `lora_dropout`. Made by `apply_lora` / `load_lora`, which swap the module's class (as
    torch.nn.utils.parametrize does), so the base's parameters and names stay where they are."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def base_forward(self, x):
        return super().forward(x)

    def _setup_lora(self, r: int, scaling: float, dropout: float) -> None:
        w = self.weight
        self.lora_r, self.lora_scaling, self.lora_dropout = int(r), float(scaling), float(dropout)
        self.lora_A = nn.Parameter(torch.zeros(r, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=w.dtype))
        if isinstance(self, ColumnParallelLinear):
            self._tp_dims = {**self._tp_dims, "lora_B": 0}
        elif isinstance(self, RowParallelLinear):
            self._tp_dims = {**self._tp_dims, "lora_A": 1}
        if hasattr(self, "_tag"):
            self._tag()

    def _teardown_lora(self) -> None:
        del self.lora_A, self.lora_B, self.lora_r, self.lora_scaling, self.lora_dropout
        if hasattr(self, "_tp_dims"):
            self._tp_dims = {k: v for k, v in self._tp_dims.items() if k not in LORA_PARAMS}

    def _down(self, x):
        return F.linear(lora_dropout(self, x, self.lora_dropout), self.lora_A)

    def _up(self, h):
        return F.linear(h, self.lora_B) * self.lora_scaling

    def forward(self, x):
        return lora_linear_forward(self, x, self._down, self._up)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_r={self.lora_r}, lora_scaling={self.lora_scaling:g}"


class LoRALinear(LoRAMixin, nn.Linear):
    pass


class LoRAColumnParallelLinear(LoRAMixin, ColumnParallelLinear):
    pass


class LoRARowParallelLinear(LoRAMixin, RowParallelLinear):
    pass


LORA_CLASSES: dict[type, type] = {
    nn.Linear: LoRALinear,
    ColumnParallelLinear: LoRAColumnParallelLinear,
    RowParallelLinear: LoRARowParallelLinear,
}


# ---------------------------------------------------------------------------------------------------------
# finding targets; the rewrite
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Site:
    """One target linear: its plain-model path, layer index, name, parent module and the module itself."""

    path: str
    layer: int
    target: str
    parent: nn.Module
    module: nn.Module


NameMap = Callable[[str], str] | Mapping[str, str] | None


def find_sites(module: nn.Module, prefix: str = "", name_map: NameMap = None) -> list[Site]:
    """Every target linear in `module` (any Attention's query_key_value and dense, any MLP's two linears).
    `prefix + name_map(local path)` turns local module paths into plain-model ones, as for
    `neoxray.model.init.init_parameters` (e.g. `name_map=neoxray.model.init.layer_offset(4)` for a stage)."""
    mapper = name_map.__getitem__ if isinstance(name_map, Mapping) else (name_map or (lambda n: n))
    sites = []
    for path, mod in module.named_modules():
        names = ("query_key_value", "dense") if isinstance(mod, Attention) else None
        names = ("dense_h_to_4h", "dense_4h_to_h") if isinstance(mod, MLP) else names
        for attr in names or ():
            local = f"{path}.{attr}" if path else attr
            try:
                plain = prefix + mapper(local)
            except (KeyError, AttributeError) as e:
                raise NeoxrayError(f"lora: name_map has no entry for module {local!r}") from e
            m = MODULE_PATH.fullmatch(plain)
            if m is None:
                raise NeoxrayError(
                    f"lora: module {local!r} maps to {plain!r}, not a GPT-NeoX module path such as "
                    "'layers.3.attention.query_key_value' (pass prefix= or name_map=)"
                )
            sites.append(Site(plain, int(m.group(1)), attr, mod, getattr(mod, attr)))
    return sites


def check_wrappable(sites: list[Site], classes: Mapping[type, type]) -> None:
    """A NeoxrayError naming the first site whose module cannot be given adapters (checked before any change)."""
    for s in sites:
        if type(s.module) not in classes:
            wrapped = hasattr(s.module, "lora_r") or hasattr(s.module, "_binding")
            what = "already has adapters" if wrapped else f"is a {type(s.module).__name__}, not a linear LoRA can wrap"
            raise NeoxrayError(f"lora: {s.path} {what}")


def swap_class(site: Site, classes: Mapping[type, type]) -> None:
    """Turn the site's linear into its adapter-carrying subclass (as torch.nn.utils.parametrize does)."""
    site.module.__class__ = classes[type(site.module)]


def apply_lora(module: nn.Module, spec: LoRASpec, seed: int | None = 0, *, prefix="", name_map: NameMap = None):
    """Give every target linear of `module` that `spec` selects (targets, layers) a fresh adapter, in place;
    returns their plain module paths. Materialised modules are initialised from `seed` (see the module
    docstring; seed None: A and B zero); meta ones stay meta (load or `init_lora` after `to_empty`)."""
    sites = [
        s
        for s in find_sites(module, prefix, name_map)
        if s.target in spec.targets and (spec.layers is None or s.layer in spec.layers)
    ]
    check_wrappable(sites, LORA_CLASSES)
    for s in sites:
        swap_class(s, LORA_CLASSES)
        s.module._setup_lora(spec.r, spec.scaling, spec.dropout)
    if seed is not None and not any(s.module.weight.is_meta for s in sites):
        _init_sites(sites, seed)  # only these: adapters the model already carried keep their weights
    return [s.path for s in sites]


def lora_sites(module: nn.Module, prefix: str = "", name_map: NameMap = None) -> list[Site]:
    """The target linears of `module` that carry one adapter."""
    return [s for s in find_sites(module, prefix, name_map) if isinstance(s.module, LoRAMixin)]


@torch.no_grad()
def init_lora(module: nn.Module, seed: int = 0, *, prefix="", name_map: NameMap = None) -> None:
    """(Re)initialise every adapter of `module`: A kaiming-uniform(a = sqrt 5) drawn full-size from
    (seed, plain name), sliced for this rank; B zero."""
    _init_sites(lora_sites(module, prefix, name_map), seed)


@torch.no_grad()
def _init_sites(sites: list[Site], seed: int) -> None:
    for s in sites:
        a = s.module.lora_A
        if a.is_meta:
            raise NeoxrayError(f"init_lora: {s.path} is on the meta device; materialise first (to_empty)")
        shape = full_shape(a)
        bound = 1.0 / math.sqrt(shape[1])
        gen = torch.Generator(device="cpu").manual_seed(param_seed(seed, f"{s.path}.lora_A"))
        full = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        a.copy_(_local(full, a))
        s.module.lora_B.zero_()


def _local(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    dim = getattr(p, "tp_dim", None)
    return full if dim is None else shard(full, dim, p.tp_rank, p.tp_size)


def _check_against_base(adapter: LoRAAdapter, path: str, base: nn.Module) -> None:
    out_full, in_full = full_shape(base.weight)
    a, b = adapter.tensors[f"{path}.lora_A"], adapter.tensors[f"{path}.lora_B"]
    if a.shape[1] != in_full or b.shape[0] != out_full:
        bad, got = (f"{path}.lora_A", a) if a.shape[1] != in_full else (f"{path}.lora_B", b)
        want = (a.shape[0], in_full) if bad.endswith("A") else (out_full, b.shape[1])
        raise NeoxrayError(f"{adapter.name}: tensor {bad} has shape {tuple(got.shape)}, the base expects {want}")


@torch.no_grad()
def load_lora(
    module: nn.Module, adapter: LoRAAdapter, *, prefix="", name_map: NameMap = None, strict: bool = True
) -> list[str]:
    """Wrap the modules `adapter` has weights for and fill them (this rank's slices), in place; returns their
    paths. `strict`: every module of the adapter must be in `module` (False for a pipeline stage, which holds
    only some layers). Checked before anything changes."""
    sites = {s.path: s for s in find_sites(module, prefix, name_map)}
    chosen = []
    for path in adapter.modules():
        if path not in sites:
            if strict:
                raise NeoxrayError(f"{adapter.name}: the adapter has weights for {path}, which the model does not have")
            continue
        _check_against_base(adapter, path, sites[path].module)
        chosen.append(sites[path])
    check_wrappable(chosen, LORA_CLASSES)
    for s in chosen:
        swap_class(s, LORA_CLASSES)
        s.module._setup_lora(adapter.rank(s.path), adapter.scaling(s.path), adapter.spec.dropout)
        for kind in LORA_PARAMS:
            p = getattr(s.module, kind)
            if not p.is_meta:
                p.copy_(_local(adapter.tensors[f"{s.path}.{kind}"], p))
    return [s.path for s in chosen]


def mark_only_lora_trainable(module: nn.Module) -> int:
    """requires_grad on the adapters' parameters only; returns how many elements are trainable."""
    n = 0
    for name, p in module.named_parameters():
        trainable = name.rpartition(".")[2] in LORA_PARAMS
        p.requires_grad_(trainable)
        n += p.numel() if trainable else 0
    return n


def lora_state_dict(module: nn.Module, *, prefix="", name_map: NameMap = None) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors under their plain names ("layers.3.mlp.dense_4h_to_h.lora_A", ...)."""
    return {f"{s.path}.{k}": getattr(s.module, k) for s in lora_sites(module, prefix, name_map) for k in LORA_PARAMS}


def adapter_from_model(module: nn.Module, spec: LoRASpec, name: str = "adapter", **names) -> LoRAAdapter:
    """The adapters of a single-process (tensor parallel size 1) model as a LoRAAdapter (copies on the CPU).
    Per-module alphas are recovered from each module's scaling where they differ from spec.alpha."""
    tensors, alphas = {}, {}
    for s in lora_sites(module, **names):
        if getattr(s.module, "tp_size", 1) != 1:
            raise NeoxrayError("adapter_from_model: the model is tensor-parallel; read the adapter from a checkpoint")
        for k in LORA_PARAMS:
            tensors[f"{s.path}.{k}"] = getattr(s.module, k).detach().to("cpu", copy=True)
        r = s.module.lora_r
        alpha = s.module.lora_scaling * (math.sqrt(r) if spec.use_rslora else r)
        if not math.isclose(alpha, spec.alpha, rel_tol=1e-9):
            alphas[s.path] = alpha
    return LoRAAdapter(spec, tensors, alphas, name)


# ---------------------------------------------------------------------------------------------------------
# merging and removing
# ---------------------------------------------------------------------------------------------------------
def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update an adapter adds to W: (B @ A) * scaling, [out, in] (or this rank's part of it)."""
    return (b @ a) * scaling


def _unwrap(s: Site) -> None:
    s.module._teardown_lora()
    s.module.__class__ = next(base for base, cls in LORA_CLASSES.items() if cls is type(s.module))


@torch.no_grad()
def merge_lora(module: nn.Module, **names) -> nn.Module:
    """Fold every adapter into its base weight (W += (B @ A) * scaling, on every rank's own slices) and turn the
    modules back into plain linears: peft's `merge_and_unload`."""
    for s in lora_sites(module, **names):
        m = s.module
        m.weight.add_(delta_weight(m.lora_A.float(), m.lora_B.float(), m.lora_scaling).to(m.weight.dtype))
        _unwrap(s)
    return module


def remove_lora(module: nn.Module, **names) -> nn.Module:
    """Drop every adapter without merging: the base model again."""
    for s in lora_sites(module, **names):
        _unwrap(s)
    return module


@torch.no_grad()
def merge_into(model: nn.Module, adapter: LoRAAdapter, *, prefix="", name_map: NameMap = None) -> nn.Module:
    """Fold `adapter` straight into a model without adapters (plain or tensor-parallel): what `load_lora` then
    `merge_lora` give, without wrapping. For `neoxray export --merge`."""
    sites = {s.path: s for s in find_sites(model, prefix, name_map)}
    for path in adapter.modules():
        if path not in sites:
            raise NeoxrayError(f"{adapter.name}: the adapter has weights for {path}, which the model does not have")
        if isinstance(sites[path].module, LoRAMixin):
            raise NeoxrayError(f"merge_into: {path} already carries an adapter (use merge_lora)")
        _check_against_base(adapter, path, sites[path].module)
    for path in adapter.modules():
        w = sites[path].module.weight
        a, b = (adapter.tensors[f"{path}.{k}"].to(w.device, torch.float32) for k in LORA_PARAMS)
        w.add_(_local(delta_weight(a, b, adapter.scaling(path)), w).to(w.dtype))  # the product in fp32
    return model


def iter_lora_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter parameter, in module order."""
    for name, p in module.named_parameters():
        if name.rpartition(".")[2] in LORA_PARAMS:
            yield name, p
