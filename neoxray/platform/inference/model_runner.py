"""The model side of the inference engine: one batched forward of rows of new tokens (prompt chunks or one
decode token each) against the paged KV cache, the fp32 logits and log-probabilities of chosen positions, and
embeddings (mean-pooled final hidden states). It knows token ids and block tables, not requests' text. With
LoRA adapters (`neoxray.platform.inference.adapters`) each row applies its request's adapter: the rows' slots
are bound before the forward, so one forward serves rows of different adapters together."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from neoxray.model.gptneox import GPTNeoX
from neoxray.platform.inference.kv_cache import PagedKVCache
from neoxray.platform.inference.sequence import ForwardBatch, ForwardResult


class ModelRunner:
    """Runs `model` against `cache` (the engine's only user of the model's forward): one per worker; with
    tensor parallelism every worker runs the same batch on its shard and its heads' cache. `max_loras` > 0
    wraps the model's linears with adapter slots (`neoxray.model.multi_lora.MultiLoRA`)."""

    def __init__(self, model: GPTNeoX, cache: PagedKVCache, max_loras: int = 0, max_lora_rank: int = 0):
        self.model = model
        self.cache = cache
        self.multi = None
        if max_loras > 0:
            from neoxray.model.multi_lora import MultiLoRA

            self.multi = MultiLoRA(model, max_loras, max_lora_rank)
        self.device = next(model.parameters()).device
        self.mixed_forwards = 0
        """Forwards whose rows applied more than one adapter (the base counting as one): batches were shared."""

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> ForwardResult:
        """Run one planned forward: the fp32 logits of its sampled rows' last positions and the
        log-probabilities of its scored positions."""
        hidden = self.forward(batch)  # [b, s, d]
        lengths = batch.lengths
        logits = None
        if batch.sample:
            last = torch.stack([hidden[i, lengths[i] - 1] for i in batch.sample])  # [r, d]
            logits = self.logits(last)  # [r, V]
        scored = []
        if batch.score:  # one output head and log-softmax for every scored position of the batch
            parts = [hidden[i, lo : lengths[i]] for i, lo in batch.score]
            logp = self.log_probs(torch.cat(parts))
            scored = list(logp.split([p.shape[0] for p in parts]))
        return ForwardResult(logits, scored)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run rows of new tokens (row i: tokens starts[i] .. starts[i] + lengths[i] of its sequence) through the
        model against the cache; returns final hidden states [b, s, d] (s = the longest row; padding after)."""
        bs, dev = self.cache.block_size, self.device
        starts, lengths = batch.starts, batch.lengths
        b, s_max = len(lengths), max(lengths)
        t_max = max(st + n for st, n in zip(starts, lengths))
        n_blocks = math.ceil(t_max / bs)
        ids = torch.zeros((b, s_max), dtype=torch.long)
        table = torch.zeros((b, n_blocks), dtype=torch.long)
        for i, (toks, blocks) in enumerate(zip(batch.tokens, batch.block_tables)):
            ids[i, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
            blocks = blocks[:n_blocks]
            table[i, : len(blocks)] = torch.as_tensor(blocks, dtype=torch.long)
        # [b, t]: the cache slot of each key position of each row
        read_slots = (table[:, :, None] * bs + torch.arange(bs)).reshape(b, -1)[:, :t_max]
        q = torch.arange(s_max)[None]  # [1, s]
        positions = torch.as_tensor(list(starts))[:, None] + q  # [b, s]
        valid = q < torch.as_tensor(list(lengths))[:, None]  # [b, s]: real tokens, not padding
        write_rows = valid.flatten().nonzero()[:, 0]  # [n]
        write_slots = read_slots.gather(1, positions.clamp(max=t_max - 1))[valid]  # [n]
        # a key is visible when it is at or before the query's position; padding queries see position 0 only
        mask = torch.arange(t_max)[None, None] <= torch.where(valid, positions, 0)[:, :, None]  # [b, s, t]
        self.cache.bind(write_rows.to(dev), write_slots.to(dev), read_slots.to(dev))
        if self.multi is not None:
            self.multi.bind(batch.lora_slots)
            self.mixed_forwards += len(set(batch.lora_slots)) > 1
        return self.model.hidden_states(ids.to(dev), positions.to(dev), mask[:, None].to(dev), self.cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., d] -> fp32 logits [..., V] (padding rows of the vocabulary included; a
        vocabulary-parallel head's shards gathered from every worker)."""
        out = self.model.embed_out(hidden)
        head = self.model.embed_out
        if getattr(head, "tp_size", 1) > 1 and not getattr(head, "gather_output", False):
            from neoxray.model.tensor_parallel import gather_from_tp_region

            out = gather_from_tp_region(out, head.group)
        return out.float()

    def describe(self) -> dict:
        """This worker's weight bytes (quantized tensors: their stored data) and KV cache bytes."""
        from neoxray.platform.inference.quantization import weight_bytes

        return {"weight_bytes_per_worker": weight_bytes(self.model), "kv_cache_bytes_per_worker": self.cache.bytes}

    # -- LoRA slots ------------------------------------------------------------------------------------------
    def load_lora(self, slot: int, adapter) -> None:
        """Put `adapter` into `slot` (each tensor-parallel worker keeps its shard of it)."""
        self.multi.load(slot, adapter)

    def unload_lora(self, slot: int) -> None:
        self.multi.unload(slot)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, d] -> log-probabilities of the next token [n, V] (for scoring prompts)."""
        return F.log_softmax(self.logits(hidden), dim=-1)

    @torch.inference_mode()
    def embed(self, token_lists: Sequence[Sequence[int]], slot: int | None = None) -> list[list[float]]:
        """Mean of the final-LayerNorm hidden states over each text's tokens, L2-normalised: features for
        downstream tasks, as the GPT-NeoX-20B model card suggests. No cache: each text runs alone (with the
        adapter in `slot`, None: the base)."""
        out = []
        for ids in token_lists:
            if self.multi is not None:
                self.multi.bind([slot])
            x = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
            h = self.model.hidden_states(x)[0].float().mean(0)  # [d]
            out.append(F.normalize(h, dim=0).tolist())
        return out
