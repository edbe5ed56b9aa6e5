"""Many LoRA adapters in one forward, for serving: each batch row applies its own adapter, or none.

`MultiLoRA(model, max_adapters, max_rank)` gives every target linear (`neoxray.model.lora_spec.TARGETS`) stacked
adapter buffers with one slot per adapter plus an always-zero slot for rows without one:

    A_stack [K + 1, max_rank, in_local]   B_stack [K + 1, out_local, max_rank]   scale [K + 1]

Adapters of any rank up to `max_rank` (zero-padded: exact) and any subset of the targets (absent modules stay
zero) are loaded into slots; before each forward the caller binds one slot per batch row, as the paged KV cache
binds its slots (`neoxray.platform.inference.kv_cache`), and every targeted linear then computes, per row i,

    y_i = base(x_i) + scale[s_i] * (x_i A_stack[s_i]^T) B_stack[s_i]^T        (one batched matmul per linear)

so rows of different adapters share a decode step without being split into per-adapter batches. Only the ranks
of the adapters bound in the step are computed (the stacks are sliced to the largest of them), and a linear no
bound adapter touches runs as the plain base. The buffers are not in the model's state_dict, so loading the base
model's weights is unchanged. Tensor-parallel bases (after `parallelize`) work too: each slot is sharded like a
single adapter (`neoxray.model.lora`).

    lora = MultiLoRA(model, max_adapters=8, max_rank=64)
    lora.load(0, read_peft_adapter(dir_a, model.config)); lora.load(1, ...)
    lora.bind([0, None, 1, 0])      # per batch row; None: the base model
    logits = model(ids)             # ids [4, s]
    lora.unload(1); lora.unbind(); lora.remove()   # remove: the plain model again
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.lora import (
    LoRAAdapter,
    NameMap,
    check_wrappable,
    find_sites,
    lora_linear_forward,
    swap_class,
)
from neoxray.model.lora_spec import TARGETS
from neoxray.model.sharding import full_shape, shard
from neoxray.model.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class _Binding:
    """What the last `bind` chose, shared by every wrapped linear of one MultiLoRA."""

    def __init__(self):
        self.index: torch.Tensor | None = None  # [b] slot per row (the zero slot for rows without an adapter)
        self.active: frozenset[int] = frozenset()  # slots some row uses


class MultiLoRAMixin:
    """A target linear with stacked adapter slots (buffers `lora_A_stack`, `lora_B_stack`, `lora_scale`)."""

    def base_forward(self, x):
        return super().forward(x)

    def _setup_multi(self, binding: _Binding, slots: int, max_rank: int) -> None:
        w = self.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.register_buffer("lora_A_stack", torch.zeros(slots + 1, max_rank, w.shape[1], **kw), persistent=False)
        self.register_buffer("lora_B_stack", torch.zeros(slots + 1, w.shape[0], max_rank, **kw), persistent=False)
        self.register_buffer("lora_scale", torch.zeros(slots + 1, **kw), persistent=False)
        self._binding = binding
        self._ranks: dict[int, int] = {}  # slot -> rank of what it holds here

    def _teardown_multi(self) -> None:
        del self.lora_A_stack, self.lora_B_stack, self.lora_scale, self._binding, self._ranks

    def _set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Full tensors a [r, in], b [out, r] (None: empty the slot); this rank keeps its slices."""
        self.lora_A_stack[slot].zero_()
        self.lora_B_stack[slot].zero_()
        self.lora_scale[slot] = 0.0
        self._ranks.pop(slot, None)
        if a is None:
            return
        r = a.shape[0]
        if getattr(self, "tp_size", 1) > 1:
            if isinstance(self, ColumnParallelLinear):
                b = shard(b, 0, self.tp_rank, self.tp_size)
            elif isinstance(self, RowParallelLinear):
                a = shard(a, 1, self.tp_rank, self.tp_size)
        self.lora_A_stack[slot, :r].copy_(a)
        self.lora_B_stack[slot, :, :r].copy_(b)
        self.lora_scale[slot] = scaling
        self._ranks[slot] = r

    def _rank_now(self) -> int:
        """The largest rank among the bound slots this linear holds weights for (0: none)."""
        return max((self._ranks[s] for s in self._binding.active if s in self._ranks), default=0)

    def _down(self, x):
        r = self._rank_now()
        if r == 0:
            return None
        idx = self._binding.index
        b = x.shape[0]
        if idx.shape[0] != b:
            raise NeoxrayError(f"MultiLoRA: {idx.shape[0]} rows bound, but the forward has {b} rows")
        a = self.lora_A_stack[:, :r].index_select(0, idx)  # [b, r, in]
        h = torch.bmm(x.reshape(b, -1, x.shape[-1]), a.transpose(1, 2))  # [b, s, r]
        return h.reshape(*x.shape[:-1], r)

    def _up(self, h):
        idx = self._binding.index
        b, r = h.shape[0], h.shape[-1]
        bb = self.lora_B_stack[:, :, :r].index_select(0, idx)  # [b, out, r]
        y = torch.bmm(h.reshape(b, -1, r), bb.transpose(1, 2)) * self.lora_scale.index_select(0, idx)[:, None, None]
        return y.reshape(*h.shape[:-1], -1)

    def forward(self, x):
        return lora_linear_forward(self, x, self._down, self._up)


class MultiLoRALinear(MultiLoRAMixin, nn.Linear):
    pass


class MultiLoRAColumnParallelLinear(MultiLoRAMixin, ColumnParallelLinear):
    pass


class MultiLoRARowParallelLinear(MultiLoRAMixin, RowParallelLinear):
    pass


MULTI_CLASSES: dict[type, type] = {
    nn.Linear: MultiLoRALinear,
    ColumnParallelLinear: MultiLoRAColumnParallelLinear,
    RowParallelLinear: MultiLoRARowParallelLinear,
}


class MultiLoRA:
    """Slots for up to `max_adapters` adapters of rank up to `max_rank` in `model` (materialised; rewritten in
    place). `targets`: which linears get slots (adapters for others are refused at `load`). `prefix`,
    `name_map`: how local module paths become plain ones (see `neoxray.model.lora.find_sites`)."""

    def __init__(
        self,
        model: nn.Module,
        max_adapters: int,
        max_rank: int,
        targets: Sequence[str] = TARGETS,
        *,
        prefix: str = "",
        name_map: NameMap = None,
    ):
        if max_adapters < 1:
            raise NeoxrayError(f"MultiLoRA: max_adapters must be >= 1, got {max_adapters}")
        if max_rank < 1:
            raise NeoxrayError(f"MultiLoRA: max_rank must be >= 1, got {max_rank}")
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise NeoxrayError(f"MultiLoRA: unknown target {unknown[0]!r} (known: {', '.join(TARGETS)})")
        self.max_adapters, self.max_rank = max_adapters, max_rank
        sites = [s for s in find_sites(model, prefix, name_map) if s.target in targets]
        check_wrappable(sites, MULTI_CLASSES)
        if any(s.module.weight.is_meta for s in sites):
            raise NeoxrayError("MultiLoRA: the model is on the meta device; materialise and load it first")
        self._binding = _Binding()
        self.sites = {s.path: s for s in sites}
        for s in sites:
            swap_class(s, MULTI_CLASSES)
            s.module._setup_multi(self._binding, max_adapters, max_rank)
        self.names: dict[int, str] = {}
        """slot -> the name of the adapter it holds."""
        self.device = sites[0].module.weight.device if sites else torch.device("cpu")

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.max_adapters:
            raise NeoxrayError(f"MultiLoRA: slot {slot!r} is out of range (0..{self.max_adapters - 1})")

    def check(self, slot: int, adapter: LoRAAdapter) -> None:
        """NeoxrayError unless `adapter` can go into `slot`: every module it has weights for has slots here, with
        the base's (full) shapes, and ranks at most max_rank."""
        self._check_slot(slot)
        for path in adapter.modules():
            site = self.sites.get(path)
            if site is None:
                raise NeoxrayError(f"{adapter.name}: the adapter has weights for {path}, which has no adapter slots")
            if adapter.rank(path) > self.max_rank:
                raise NeoxrayError(
                    f"{adapter.name}: {path} has rank {adapter.rank(path)}, more than max_rank {self.max_rank}"
                )
            out_full, in_full = full_shape(site.module.weight)
            a, b = adapter.tensors[f"{path}.lora_A"], adapter.tensors[f"{path}.lora_B"]
            if a.shape[1] != in_full or b.shape[0] != out_full:
                raise NeoxrayError(
                    f"{adapter.name}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, the base "
                    f"is [{out_full}, {in_full}]"
                )

    @torch.no_grad()
    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put `adapter` into `slot` (replacing what it held). Checked whole before any slot changes: every module
        it has weights for must have slots here, with the base's shapes, and ranks at most max_rank."""
        self.check(slot, adapter)
        for path, site in self.sites.items():
            if f"{path}.lora_A" in adapter.tensors:
                w = site.module.weight
                a, b = (adapter.tensors[f"{path}.{k}"].to(w.device, w.dtype) for k in ("lora_A", "lora_B"))
                site.module._set_slot(slot, a, b, adapter.scaling(path))
            else:
                site.module._set_slot(slot, None, None, 0.0)
        self.names[slot] = adapter.name

    @torch.no_grad()
    def unload(self, slot: int) -> None:
        """Empty `slot`; binding it is then an error."""
        self._check_slot(slot)
        for site in self.sites.values():
            site.module._set_slot(slot, None, None, 0.0)
        self.names.pop(slot, None)

    def bind(self, slots: Sequence[int | None]) -> None:
        """The slot of each batch row of the next forwards (None or -1: no adapter, the base model)."""
        index = []
        for s in slots:
            if s is None or s == -1:
                index.append(self.max_adapters)  # the zero slot
                continue
            self._check_slot(s)
            if s not in self.names:
                raise NeoxrayError(f"MultiLoRA: slot {s} holds no adapter")
            index.append(s)
        self._binding.index = torch.tensor(index, dtype=torch.long, device=self.device)
        self._binding.active = frozenset(i for i in index if i != self.max_adapters)

    def unbind(self) -> None:
        """No adapter for any row: the base model's forward."""
        self._binding.index, self._binding.active = None, frozenset()

    def remove(self) -> None:
        """Turn every wrapped linear back into the plain base (the slots are dropped)."""
        for site in self.sites.values():
            m = site.module
            m._teardown_multi()
            m.__class__ = next(base for base, cls in MULTI_CLASSES.items() if cls is type(m))
        self.sites, self.names = {}, {}
        self.unbind()
