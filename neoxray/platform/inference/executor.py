"""Executors: what runs the scheduler's plan on the model (vLLM's executor layer).

An executor takes one `ForwardBatch` at a time (plain data: token ids, positions, block tables, adapter slots)
and returns a `ForwardResult` (the sampled rows' logits, the scored positions' log-probabilities); it also puts
LoRA adapters into slots and computes embeddings. The engine (`neoxray.platform.inference.engine_core`) knows
only this interface, so one process and N tensor-parallel workers look the same to it:

- `LocalExecutor`: one `ModelRunner` in this process (one device).
- `neoxray.platform.inference.tp_executor.TensorParallelExecutor`: N workers, each with its shard of the
  weights and the KV cache of its heads, running every batch together (rank 0 in this process).
"""

from __future__ import annotations

from collections.abc import Sequence

from neoxray.platform.inference.kv_cache import PagedKVCache
from neoxray.platform.inference.model_runner import ModelRunner
from neoxray.platform.inference.sequence import ForwardBatch, ForwardResult


class Executor:
    """The interface the engine drives (on its thread only), and what the engine needs to know of the model
    without holding it: its config, dtype, the device logits arrive on, the KV cache's size in blocks."""

    tensor_parallel_size: int = 1
    model_config = None
    dtype = None
    device = None
    """Where the logits of `execute` are (sampling happens there)."""
    num_blocks: int = 0
    mixed_forwards: int = 0
    """Forwards whose rows applied more than one adapter (the base counting as one): batches were shared."""

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        raise NotImplementedError

    def load_lora(self, slot: int, adapter) -> None:
        raise NotImplementedError

    def unload_lora(self, slot: int) -> None:
        raise NotImplementedError

    def embed(self, token_lists: Sequence[Sequence[int]], slot: int | None) -> list[list[float]]:
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raise EngineDead when a worker has gone (an executor in one process never has)."""

    def shutdown(self) -> None:
        """Stop the workers (nothing for one process)."""

    def describe(self) -> dict:
        """What the replica reports about its workers: tensor-parallel size, weight and KV cache bytes of each."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """The whole model in this process: `model` (materialised, on its device), a KV cache of `num_blocks` blocks."""

    def __init__(self, model, num_blocks: int, block_size: int, max_loras: int = 0, max_lora_rank: int = 0):
        cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.runner = ModelRunner(model, cache, max_loras, max_lora_rank)
        self.model_config, self.num_blocks = model.config, num_blocks
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device

    @property
    def mixed_forwards(self) -> int:
        return self.runner.mixed_forwards

    def describe(self) -> dict:
        return {"tensor_parallel_size": 1, **self.runner.describe()}

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        return self.runner.execute(batch)

    def load_lora(self, slot: int, adapter) -> None:
        self.runner.load_lora(slot, adapter)

    def unload_lora(self, slot: int) -> None:
        self.runner.unload_lora(slot)

    def embed(self, token_lists, slot):
        return self.runner.embed(token_lists, slot)
