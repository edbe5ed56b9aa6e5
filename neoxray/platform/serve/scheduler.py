"""Scheduling for the inference engine: the state of each request it holds (`SequenceState`) and the
`Scheduler`, which owns the waiting and running lists and decides, each engine step,
    - which waiting requests are admitted: first come first served, while a batch row is free and the KV
      cache has room for the prompt plus `max_tokens` (blocks are reserved on admission, so no request is
      ever preempted);
    - which prompt chunks are prefilled: up to `prefill_chunk` prompt tokens of the admitted requests, in
      admission order (a long prompt is split over several steps, so it never stalls running requests for
      more than one chunk's compute);
    - which requests decode: every admitted request whose prompt is in the cache.
A finished or aborted request is released at once: it leaves its list and its blocks go back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neoxray.model.decoding import IncrementalDetokenizer, StopChecker
from neoxray.platform.serve.kv_cache import PagedKVCache
from neoxray.platform.serve.request import EngineConfig, Output, Request, TokenLogprob


@dataclass
class SequenceState:
    """One request inside the engine, from arrival to release."""

    req: Request
    sink: Callable[[Output], None]
    """Called on the engine thread with each Output."""
    arrival: float
    blocks: list[int] = field(default_factory=list)
    """Its KV cache blocks (the block table), reserved on admission."""
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # tokens whose keys/values are in the cache
    generated: list[int] = field(default_factory=list)
    # output processing (`OutputProcessor.start`, on admission)
    generator: torch.Generator | None = None
    stop: StopChecker | None = None
    detokenizer: IncrementalDetokenizer | None = None
    emitted_chars: int = 0  # text handed out so far
    prompt_lp: list[TokenLogprob] | None = None
    pending_lp: list[TokenLogprob] = field(default_factory=list)  # not yet in an Output
    first_token_at: float | None = None
    finished: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prompt_len


class Scheduler:
    """The waiting and running requests of one engine and its KV cache blocks. Used on the engine thread
    only (the lengths of `waiting` and `running` may be read from any thread)."""

    def __init__(self, config: EngineConfig, cache: PagedKVCache):
        self.config = config
        self.cache = cache
        self.waiting: list[SequenceState] = []
        self.running: list[SequenceState] = []  # admitted: prefilling or decoding, in admission order
        self._by_id: dict[str, SequenceState] = {}

    def add(self, s: SequenceState) -> None:
        self._by_id[s.req.request_id] = s
        self.waiting.append(s)

    def get(self, request_id: str) -> SequenceState | None:
        return self._by_id.get(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished(self) -> list[SequenceState]:
        return list(self.running) + list(self.waiting)

    def admit(self) -> list[SequenceState]:
        """Admit waiting requests in arrival order while a batch row is free and the cache has blocks for
        the prompt plus max_tokens; returns the newly admitted ones."""
        admitted = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            s = self.waiting[0]
            blocks = self.cache.allocate(self.cache.blocks_for(s.prompt_len + s.req.max_tokens))
            if blocks is None:
                break  # first come, first served: wait for blocks to be freed
            self.waiting.pop(0)
            s.blocks = blocks
            s.tokens = list(s.req.prompt_ids)
            self.running.append(s)
            admitted.append(s)
        return admitted

    def prefill_chunks(self) -> list[tuple[SequenceState, int, int]]:
        """This step's prompt chunks: (request, first position, tokens), at most prefill_chunk tokens in all,
        spread over the admitted requests in order."""
        budget, rows = self.config.prefill_chunk, []
        for s in self.running:
            if budget <= 0:
                break
            if s.in_prefill:
                n = min(budget, s.prompt_len - s.computed)
                rows.append((s, s.computed, n))
                budget -= n
        return rows

    def decoding(self, prefilled: list[SequenceState]) -> list[SequenceState]:
        """The requests that decode one token this step: all running ones whose prompt is in the cache, except
        those that took part in this step's prefill (they got their first token from it)."""
        return [s for s in self.running if not s.in_prefill and s not in prefilled]

    def release(self, s: SequenceState) -> None:
        """Mark `s` finished, take it out of the lists and free its blocks."""
        s.finished = True
        if s in self.running:
            self.running.remove(s)
        if s in self.waiting:
            self.waiting.remove(s)
        if s.blocks:
            self.cache.release(s.blocks)
            s.blocks = []
        self._by_id.pop(s.req.request_id, None)
