"""Scheduling for the inference engine: the `Scheduler` owns the waiting and running requests
(`neoxray.platform.inference.sequence.SequenceState`) and the KV cache's block manager, and each engine step
returns a plan (`schedule()` -> `SchedulerOutput`) that an executor runs and the output processor completes. It
decides
    - which waiting requests are admitted, while a batch row is free and the KV cache has room for the prompt
      plus `max_tokens` (blocks are reserved on admission, so no request is ever preempted). Fair across
      groups (a group is one HTTP request's choices: n x prompts): the next row goes to the waiting group with
      the fewest requests running, the earliest first among equals, and a group never holds more than
      `max_running_per_group` rows. Requests that are each a group of their own (the usual case) are
      therefore admitted first come, first served; one request of many choices cannot take the whole batch;
    - which prompt chunks are prefilled: up to `prefill_chunk` prompt tokens of the admitted requests, each
      group's first prompt before any group's second, otherwise in admission order (a long prompt is split
      over several steps, so it never stalls running requests for more than one chunk's compute, and a short
      request waits for at most one prompt of each group ahead of it, not for all of a large request's);
    - which requests decode: every admitted request whose prompt is in the cache.
With prefix caching a request starts from the longest computed prefix of its prompt in the cache (its first
blocks are shared, its `computed` count starts past them) and publishes its own full prompt blocks for later
requests; a request whose next prompt block is being computed by another request waits for it instead of
computing it again. Block names are salted with the request's LoRA adapter (`SequenceState.prefix_salt`), so
requests of different adapters, whose keys and values differ, never share blocks. A finished or aborted
request is released at once: it leaves its list and its blocks go back to the pool (shared ones stay with their
other holders).
"""

from __future__ import annotations

from neoxray.platform.inference.kv_cache import BlockManager
from neoxray.platform.inference.request import EngineConfig
from neoxray.platform.inference.sequence import ForwardBatch, ScheduledForward, SchedulerOutput, SequenceState


class Scheduler:
    """The waiting and running requests of one engine and its KV cache blocks. Used on the engine thread
    only (the lengths of `waiting` and `running` may be read from any thread)."""

    def __init__(self, config: EngineConfig, cache: BlockManager):
        self.config = config
        self.cache = cache
        self.waiting: list[SequenceState] = []
        self.running: list[SequenceState] = []  # admitted: prefilling or decoding, in admission order
        self._by_id: dict[str, SequenceState] = {}
        self._running_per_group: dict[str, int] = {}

    def add(self, s: SequenceState) -> None:
        self._by_id[s.req.request_id] = s
        if self.config.prefix_caching:
            s.names = self.cache.names(s.req.prompt_ids, s.prompt_len // self.cache.block_size, s.prefix_salt)
        self.waiting.append(s)

    def _reusable(self, s: SequenceState) -> int:
        """How many leading prompt blocks `s` may take from the cache: never the position whose output it
        needs first (the last prompt token's, or the first scored token's predecessor)."""
        if not s.names:
            return 0
        limit = s.feed_len - 1  # at least one token goes through the model
        if s.req.prompt_logprobs:
            limit = min(limit, max(0, s.req.score_from - 1))
        return min(len(s.names), limit // self.cache.block_size)

    def _waits_for_prefix(self, s: SequenceState) -> bool:
        return bool(s.names) and self.cache.peek(s.names[: self._reusable(s)])[1]

    def get(self, request_id: str) -> SequenceState | None:
        return self._by_id.get(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished(self) -> list[SequenceState]:
        return list(self.running) + list(self.waiting)

    def admit(self) -> list[SequenceState]:
        """Admit waiting requests while a batch row is free and the cache has blocks for the prompt plus
        max_tokens, fairly across groups (see the module's docstring); returns the newly admitted ones."""
        admitted = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            s = self._next_waiting()
            if s is None:
                break  # every waiting group holds its share of the batch
            shared = self.cache.hold(self.cache.peek(s.names[: self._reusable(s)])[0]) if s.names else []
            blocks = self.cache.allocate(self.cache.blocks_for(s.prompt_len + s.req.max_tokens) - len(shared))
            if blocks is None:
                self.cache.release(shared)
                break  # the request whose turn it is waits for blocks to be freed; nobody overtakes it
            self.waiting.remove(s)
            s.blocks = shared + blocks
            s.computed = s.reused = len(shared) * self.cache.block_size
            for i in range(len(shared), len(s.names)):
                self.cache.publish(s.names[i], s.blocks[i])
            s.tokens = list(s.req.prompt_ids)
            self.running.append(s)
            group = s.req.group_key
            self._running_per_group[group] = self._running_per_group.get(group, 0) + 1
            admitted.append(s)
        return admitted

    def _next_waiting(self) -> SequenceState | None:
        """The waiting request whose turn it is: the earliest of the group with the fewest running requests
        (the earliest such group among equals), skipping groups at their cap."""
        cap = self.config.max_running_per_group
        best, best_running, seen = None, 0, set()
        for s in self.waiting:  # arrival order
            group = s.req.group_key
            if group in seen or self._waits_for_prefix(s):
                continue
            seen.add(group)
            running = self._running_per_group.get(group, 0)
            if cap is not None and running >= cap:
                continue
            if best is None or running < best_running:
                best, best_running = s, running
                if running == 0:
                    break  # no group runs fewer than none: the earliest such one is next
        return best

    def prefill_chunks(self) -> list[tuple[SequenceState, int, int]]:
        """This step's prompt chunks: (request, first position, tokens), at most prefill_chunk tokens in all:
        each group's first prompt still in prefill before any group's second, otherwise in admission order."""
        rank: dict[str, int] = {}
        order = []
        for i, s in enumerate(self.running):
            if s.in_prefill:
                group = s.req.group_key
                rank[group] = rank.get(group, -1) + 1
                order.append((rank[group], i, s))
        order.sort(key=lambda t: t[:2])
        budget, rows = self.config.prefill_chunk, []
        for _, _, s in order:
            if budget <= 0:
                break
            n = min(budget, s.feed_len - s.computed)
            rows.append((s, s.computed, n))
            budget -= n
        return rows

    def decoding(self, prefilled: list[SequenceState]) -> list[SequenceState]:
        """The requests that decode one token this step: all running ones whose prompt is in the cache, except
        those that took part in this step's prefill (they got their first token from it)."""
        return [s for s in self.running if not s.in_prefill and s not in prefilled]

    def schedule(self) -> SchedulerOutput:
        """This step's plan: admission, then the prompt chunks (bucketed by length: one forward per bucket, so a
        5-token continuation is not padded to a 500-token context), then one decode forward of every running
        request whose prompt is in the cache and that takes no part in this step's prefill."""
        admitted = self.admit()
        rows = self.prefill_chunks()
        forwards = [self._prefill_forward(bucket) for bucket in _length_buckets(rows)]
        decoding = self.decoding([s for s, _, _ in rows])
        if decoding:
            batch = ForwardBatch(
                tokens=[[s.tokens[s.computed]] for s in decoding],  # each feeds its newest token
                starts=[s.computed for s in decoding],
                block_tables=[s.blocks for s in decoding],
                lora_slots=[s.lora_slot for s in decoding],
                sample=list(range(len(decoding))),
            )
            forwards.append(ScheduledForward(batch, decoding, prefill=False))
        return SchedulerOutput(admitted, forwards)

    def _prefill_forward(self, rows: list[tuple[SequenceState, int, int]]) -> ScheduledForward:
        batch = ForwardBatch(
            tokens=[s.tokens[start : start + n] for s, start, n in rows],
            starts=[start for _, start, _ in rows],
            block_tables=[s.blocks for s, _, _ in rows],
            lora_slots=[s.lora_slot for s, _, _ in rows],
        )
        for i, (s, start, n) in enumerate(rows):
            if s.req.prompt_logprobs:  # log-probability of each prompt token after this chunk's positions
                lo = min(n, max(0, s.req.score_from - 1 - start))  # earlier positions predict unscored tokens
                if lo < n:
                    batch.score.append((i, lo))
            if start + n >= s.feed_len:  # its prompt completes: its first token comes from this forward
                batch.sample.append(i)
        return ScheduledForward(batch, [s for s, _, _ in rows], prefill=True)

    def update(self, fwd: ScheduledForward) -> None:
        """After a forward ran: its tokens are in the cache; the published blocks a prefill completed may now
        be shared."""
        bs = self.cache.block_size
        for s, start, n in zip(fwd.seqs, fwd.batch.starts, fwd.batch.lengths):
            s.computed += n
            if fwd.prefill:
                for i in range(start // bs, min(len(s.names), (start + n) // bs)):
                    self.cache.mark_computed(s.blocks[i])

    def release(self, s: SequenceState) -> None:
        """Mark `s` finished, take it out of the lists and free its blocks."""
        s.finished = True
        if s in self.running:
            self.running.remove(s)
            group = s.req.group_key
            left = self._running_per_group.get(group, 1) - 1
            if left > 0:
                self._running_per_group[group] = left
            else:
                self._running_per_group.pop(group, None)
        if s in self.waiting:
            self.waiting.remove(s)
        if s.blocks:
            self.cache.release(s.blocks)
            s.blocks = []
        self._by_id.pop(s.req.request_id, None)


def _length_buckets(rows: list[tuple[SequenceState, int, int]]) -> list[list[tuple[SequenceState, int, int]]]:
    """Rows grouped by length (each group's longest at most twice its shortest): one forward per group pads
    little, and a group per factor of two keeps the number of forwards small."""
    groups: list[list[tuple[SequenceState, int, int]]] = []
    for row in sorted(rows, key=lambda r: r[2]):
        if groups and row[2] <= 2 * groups[-1][0][2]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups
