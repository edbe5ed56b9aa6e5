"""The paged key/value cache of the inference engine: per layer, a pool of `num_blocks * block_size` token
slots [slots, h, hd]; each request owns a list of blocks (its block table). Attention reads a request's keys
by gathering its slots, so requests of any lengths share one batch without padding the cache (after vLLM's
PagedAttention, Kwon et al. 2023, written here with plain gathers and `scaled_dot_product_attention`)."""

from __future__ import annotations

import math

import torch

from neoxray.model.gptneox import GPTNeoX


class PagedKVCache:
    """Per layer, keys and values for `num_slots` token positions, [slots, h, hd]. Before each forward the
    model runner binds where the new tokens go (`write_slots`) and which slots each row reads (`read_slots`);
    the model's attention then calls `update` (the `KVCacheLike` protocol of `neoxray.model.gptneox`)."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_heads: int, head_dim: int, device, dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, n_heads, head_dim)
        # zeros, not empty: masked-out slots are still multiplied by a zero weight, and 0 * NaN would be NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._write_rows = self._write_slots = self._read_slots = None

    @classmethod
    def for_model(cls, model: GPTNeoX, tokens: int, block_size: int) -> PagedKVCache:
        """A cache for `tokens` token positions (rounded down to whole blocks, at least one) of `model`, on its
        device and in its dtype."""
        p = next(model.parameters())
        cfg = model.config
        n_heads = model.layers[0].attention.query_key_value.out_features // (3 * cfg.head_dim)  # local heads
        return cls(cfg.n_layers, max(1, tokens // block_size), block_size, n_heads, cfg.head_dim, p.device, p.dtype)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def used(self) -> int:
        """Blocks held by requests."""
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))

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
