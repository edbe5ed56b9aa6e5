"""The paged key/value cache of the inference engine: per layer, a pool of `num_blocks * block_size` token
slots [slots, h, hd]; each request holds a list of blocks (its block table). Attention reads a request's keys
by gathering its slots, so requests of any lengths share one batch without padding the cache (after vLLM's
PagedAttention, Kwon et al. 2023, written here with plain gathers and `scaled_dot_product_attention`).

Prefix reuse (after vLLM's automatic prefix caching): a full block of prompt tokens is named by a hash of its
tokens chained to the hash of the block before it, so a name stands for the whole prefix up to the block's end.
The request that computes such a block publishes it (`publish`); once its prefill has passed the block
(`mark_computed`) every later request whose prompt starts with the same tokens shares it (`lookup`: reference
counted, never written again) instead of computing it. Shared blocks that no request holds any more stay cached
until the pool needs them back, least recently used first. Multiple-choice evaluation (one context, several
continuations) and prompts with a common system text compute the common part once."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from neoxray.model.gptneox import GPTNeoX


class BlockManager:
    """The bookkeeping of a paged cache's `num_blocks` blocks (which are free, which request holds which, the
    published prefix blocks): the scheduler's side, on the engine's driver. No tensors: with tensor
    parallelism one manager decides for the caches of every worker."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.refs: dict[int, int] = {}  # block -> requests holding it (blocks in `free` or `idle` hold none)
        self.by_name: dict[bytes, int] = {}  # a published block's name -> block
        self.name_of: dict[int, bytes] = {}
        self.computed: set[int] = set()  # published blocks whose keys and values are in the cache
        self.idle: OrderedDict[int, None] = OrderedDict()  # computed, published, held by nobody: LRU order

    @property
    def used(self) -> int:
        """Blocks held by requests (cached blocks nobody holds count as free)."""
        return self.num_blocks - len(self.free) - len(self.idle)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks for one request, or None when the pool has not that many (free, then cached blocks nobody
        holds, least recently used first: those are forgotten)."""
        if n > len(self.free) + len(self.idle):
            return None
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:
                block, _ = self.idle.popitem(last=False)
                self._forget(block)
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """A request lets go of its blocks: shared ones stay with their other holders, computed published ones
        nobody holds stay cached (idle), the rest return to the pool."""
        for block in reversed(blocks):
            left = self.refs.get(block, 1) - 1
            if left > 0:
                self.refs[block] = left
                continue
            self.refs.pop(block, None)
            if block in self.computed:
                self.idle[block] = None
            else:
                self._forget(block)
                self.free.append(block)

    def _forget(self, block: int) -> None:
        name = self.name_of.pop(block, None)
        if name is not None and self.by_name.get(name) == block:
            del self.by_name[name]
        self.computed.discard(block)

    # -- prefix reuse ----------------------------------------------------------------------------------------
    def names(self, tokens: Sequence[int], n_blocks: int, salt: bytes = b"") -> list[bytes]:
        """The names of the first `n_blocks` full blocks of `tokens` (each chained to the one before, the first to
        `salt`: what else than the tokens the keys and values depend on, such as a LoRA adapter)."""
        out, prev, bs = [], salt, self.block_size
        for i in range(n_blocks):
            prev = hashlib.blake2b(prev + repr(list(tokens[i * bs : (i + 1) * bs])).encode(), digest_size=16).digest()
            out.append(prev)
        return out

    def peek(self, names: Sequence[bytes]) -> tuple[list[int], bool]:
        """(the computed blocks of the longest published prefix of `names`; whether the next name is published
        but still being computed by another request: worth waiting for). Nothing is held yet (`hold`)."""
        ready = []
        for name in names:
            block = self.by_name.get(name)
            if block is None or block not in self.computed:
                return ready, block is not None
            ready.append(block)
        return ready, False

    def hold(self, blocks: list[int]) -> list[int]:
        """Take a reference to each of `blocks` (computed, published ones from `peek`) for one more request."""
        for block in blocks:
            self.idle.pop(block, None)
            self.refs[block] = self.refs.get(block, 0) + 1
        return blocks

    def publish(self, name: bytes, block: int) -> None:
        """`block` (held by the request that will compute it) will hold the prefix called `name`."""
        if name not in self.by_name:
            self.by_name[name] = block
            self.name_of[block] = name

    def mark_computed(self, block: int) -> None:
        """A published block's keys and values are in the cache: later requests may share it."""
        if block in self.name_of:
            self.computed.add(block)


class PagedKVCache:
    """Per layer, keys and values for `num_blocks * block_size` token positions, [slots, h, hd] (h: this
    worker's heads). Before each forward the model runner binds where the new tokens go (`write_slots`) and
    which slots each row reads (`read_slots`); the model's attention then calls `update` (the `KVCacheLike`
    protocol of `neoxray.model.gptneox`). Which blocks are whose is the `BlockManager`'s business."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_heads: int, head_dim: int, device, dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, n_heads, head_dim)
        # zeros, not empty: masked-out slots are still multiplied by a zero weight, and 0 * NaN would be NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self._write_rows = self._write_slots = self._read_slots = None

    @classmethod
    def for_model(cls, model: GPTNeoX, num_blocks: int, block_size: int) -> PagedKVCache:
        """A cache of `num_blocks` blocks for `model` (its local heads, after tensor parallelism), on its device
        and in its dtype."""
        p = next(model.parameters())
        cfg = model.config
        n_heads = model.layers[0].attention.query_key_value.out_features // (3 * cfg.head_dim)  # local heads
        return cls(cfg.n_layers, num_blocks, block_size, n_heads, cfg.head_dim, p.device, p.dtype)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bind(self, write_rows: torch.Tensor, write_slots: torch.Tensor, read_slots: torch.Tensor) -> None:
        """write_rows [n]: which of the b*s new positions are real tokens; write_slots [n]: their slots;
        read_slots [b, t]: the slot of every key position of every row (padding points anywhere: masked)."""
        self._write_rows, self._write_slots, self._read_slots = write_rows, write_slots, read_slots

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        b, h, s, hd = k.shape
        new_k = k.transpose(1, 2).reshape(b * s, h, hd).index_select(0, self._write_rows)  # [n, h, hd]
        new_v = v.transpose(1, 2).reshape(b * s, h, hd).index_select(0, self._write_rows)
        self.k[layer_idx].index_copy_(0, self._write_slots, new_k)
        self.v[layer_idx].index_copy_(0, self._write_slots, new_v)
        keys = self.k[layer_idx][self._read_slots]  # [b, t, h, hd]
        values = self.v[layer_idx][self._read_slots]
        return keys.transpose(1, 2), values.transpose(1, 2)  # [b, h, t, hd]
