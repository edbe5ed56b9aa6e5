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
from neoxray.platform.inference.adapters import AdapterSlots
from neoxray.platform.inference.kv_cache import PagedKVCache
from neoxray.platform.inference.scheduler import SequenceState


class ModelRunner:
    """Runs `model` against `cache` (the engine's only user of the model's forward)."""

    def __init__(self, model: GPTNeoX, cache: PagedKVCache, adapters: AdapterSlots | None = None):
        self.model = model
        self.cache = cache
        self.adapters = adapters
        self.device = next(model.parameters()).device
        self.mixed_forwards = 0
        """Forwards whose rows applied more than one adapter (the base counting as one): batches were shared."""

    def forward(self, seqs: Sequence[SequenceState], starts: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
        """Run rows of new tokens (row i: tokens starts[i] .. starts[i] + lengths[i] of its request) through the
        model against the cache; returns final hidden states [b, s, d] (s = the longest row; padding after)."""
        bs, dev = self.cache.block_size, self.device
        b, s_max = len(seqs), max(lengths)
        t_max = max(st + n for st, n in zip(starts, lengths))
        n_blocks = math.ceil(t_max / bs)
        ids = torch.zeros((b, s_max), dtype=torch.long)
        table = torch.zeros((b, n_blocks), dtype=torch.long)
        for i, (seq, st, n) in enumerate(zip(seqs, starts, lengths)):
            ids[i, :n] = torch.as_tensor(seq.tokens[st : st + n], dtype=torch.long)
            blocks = seq.blocks[:n_blocks]
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
        if self.adapters is not None and self.adapters.multi is not None:
            slots = [seq.lora_slot for seq in seqs]
            self.adapters.bind(slots)
            self.mixed_forwards += len(set(slots)) > 1
        return self.model.hidden_states(ids.to(dev), positions.to(dev), mask[:, None].to(dev), self.cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., d] -> fp32 logits [..., V] (padding rows of the vocabulary included)."""
        return self.model.embed_out(hidden).float()

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
            if self.adapters is not None:
                self.adapters.bind([slot])
            x = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
            h = self.model.hidden_states(x)[0].float().mean(0)  # [d]
            out.append(F.normalize(h, dim=0).tolist())
        return out
