"""The inference engine: continuous batching over a paged key/value cache. Plain PyTorch, no Ray.

Ray Serve hosts one engine per replica (`neoxray.platform.serve.app`); benchmarks and GPU checks drive it
directly. One background thread owns the model and runs engine steps; callers on any thread (or an asyncio
loop) submit requests and receive their tokens as they are produced.

One engine step:
    1. take in new requests and aborts;
    2. admit waiting requests, first come first served, while a batch row is free and the KV cache has room
       for the prompt plus `max_tokens` (blocks are reserved on admission, so no request is ever preempted);
    3. prefill: up to `prefill_chunk` prompt tokens of the admitted requests (a long prompt is split over
       several steps, so it never stalls running requests for more than one chunk's compute);
    4. decode: one new token for every running request, in one batched forward.
A request joins the decode batch on the step after its prompt is in the cache and leaves it when it finishes
(end of document, a stop string, `max_tokens`, the context length) or is aborted; its blocks are freed at once.

KV cache: per layer, a pool of `num_blocks * block_size` token slots [slots, h, hd]; each request owns a
list of blocks (its block table). Attention reads a request's keys by gathering its slots, so requests of
any lengths share one batch without padding the cache (after vLLM's PagedAttention, Kwon et al. 2023,
written here with plain gathers and `scaled_dot_product_attention`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

import torch
import torch.nn.functional as F

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams, sample_next
from neoxray.model.gptneox import GPTNeoX


class InvalidRequest(NeoxrayError):
    """A request this engine cannot serve; `param` names the offending field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(NeoxrayError):
    """The engine's waiting queue is full: the caller should answer 503 / retry later."""


class EngineDead(NeoxrayError):
    """The engine thread has stopped (after an internal error or shutdown)."""


# ---------------------------------------------------------------------------------------------------------
# configuration, requests and outputs
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    """Most requests decoded together in one batch."""
    kv_cache_tokens: int | None = None
    """Token budget of the KV cache, all requests together (default: max_num_seqs x the model's context,
    which never makes a request wait for cache room; lower it to bound memory)."""
    block_size: int = 16
    """Tokens per KV cache block (the unit of allocation)."""
    prefill_chunk: int = 512
    """Most prompt tokens prefilled in one engine step."""
    max_waiting: int = 1024
    """Most requests waiting for admission; beyond it `add_request` raises QueueFull."""

    def validate(self) -> "EngineConfig":
        for name in ("max_num_seqs", "block_size", "prefill_chunk", "max_waiting"):
            if getattr(self, name) < 1:
                raise NeoxrayError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise NeoxrayError(f"engine.kv_cache_tokens must be >= block_size ({self.block_size}), "
                               f"got {self.kv_cache_tokens}")
        return self


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 16
    """New tokens at most (0: only the prompt is scored, for echo + logprobs)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """temperature / top_k / top_p / seed / stop strings / stop_at_eod (its max_new_tokens is ignored)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's log-probability and the k most likely ones."""
    prompt_logprobs: bool = False
    """Also score the prompt (echo): the log-probability of each prompt token given the ones before it."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    """None for the first prompt token, which has no context."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The most likely tokens at this position, best first (empty when none were asked for)."""


@dataclass
class Output:
    """What a request produced since its previous Output (a streaming delta)."""

    request_id: str
    token_ids: list[int]
    text: str
    """New text: held back while it could still be the start of a stop string or an incomplete character."""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    """Only on the first Output of a request that asked for them."""
    finish_reason: str | None = None
    """None while running; 'stop' (end of document or a stop string), 'length', or 'abort'."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    """Tokens generated so far in total."""
    error: str | None = None
    time_to_first_token_s: float | None = None
    """On the Output carrying the first new token."""
    latency_s: float | None = None
    """On the final Output: arrival to finish."""


@dataclass
class Completion:
    """A request's whole result (`InferenceEngine.generate`)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob] | None
    prompt_tokens: int


# ---------------------------------------------------------------------------------------------------------
# paged KV cache
# ---------------------------------------------------------------------------------------------------------
class PagedKVCache:
    """Per layer, keys and values for `num_slots` token positions, [slots, h, hd]. Before each forward the
    engine binds where the new tokens go (`write_slots`) and which slots each row reads (`read_slots`); the
    model's attention then calls `update` (the `KVCacheLike` protocol of `neoxray.model.gptneox`)."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_heads: int, head_dim: int, device, dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, n_heads, head_dim)
        # zeros, not empty: masked-out slots are still multiplied by a zero weight, and 0 * NaN would be NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._write_rows = self._write_slots = self._read_slots = None

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

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


# ---------------------------------------------------------------------------------------------------------
# per-request state
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Seq:
    req: Request
    sink: Callable[[Output], None]
    arrival: float
    generator: torch.Generator | None = None
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # tokens whose keys/values are in the cache
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0  # text handed out so far
    decoded_text: str = ""  # text of generated[:decoded_tokens], which ends on a complete character
    decoded_tokens: int = 0
    prompt_lp: list[TokenLogprob] | None = None
    pending_lp: list[TokenLogprob] = field(default_factory=list)
    first_token_at: float | None = None
    finished: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prompt_len


# ---------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------
class InferenceEngine:
    def __init__(self, model: GPTNeoX, tokenizer, config: EngineConfig | None = None, model_name: str = "neoxray"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = (config or EngineConfig()).validate()
        self.model_name = model_name
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        self.eod_id = tokenizer.eod_id if tokenizer is not None else cfg.eos_token_id
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        c = self.config
        budget = c.kv_cache_tokens or c.max_num_seqs * cfg.max_seq_len
        num_blocks = max(1, budget // c.block_size)
        n_heads = model.layers[0].attention.query_key_value.out_features // (3 * cfg.head_dim)
        self.cache = PagedKVCache(cfg.n_layers, num_blocks, c.block_size, n_heads, cfg.head_dim, self.device, self.dtype)
        self.vocab_limit = getattr(tokenizer, "vocab_size", None) or cfg.vocab_size  # rows past it are padding
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []  # admitted: prefilling or decoding, in admission order
        self._by_id: dict[str, _Seq] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.steps = 0
        self.counters = {"prompt_tokens": 0, "generated_tokens": 0, "requests_finished": 0, "requests_aborted": 0}

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, path, device: str = "auto", dtype: torch.dtype | None = None,
                  config: EngineConfig | None = None, model_name: str | None = None) -> "InferenceEngine":
        """An exported Hugging Face directory, a training checkpoint, or a run directory (its newest checkpoint)."""
        from neoxray.platform.model_loading import load_for_inference

        model, tokenizer, name = load_for_inference(path, device=device, dtype=dtype)
        return cls(model, tokenizer, config, model_name=model_name or name)

    # -- request checks (no engine state touched; safe from any thread) ----------------------------------
    def check(self, req: Request) -> None:
        """Raise NeoxrayError naming what is wrong with a request that this engine cannot serve."""
        n = len(req.prompt_ids)
        if n == 0:
            raise InvalidRequest("prompt is empty", "prompt")
        self.check_token_ids(req.prompt_ids, "prompt")
        if req.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0, got {req.max_tokens}", "max_tokens")
        if n + req.max_tokens > self.max_seq_len:
            raise InvalidRequest(f"prompt ({n} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                                 f"context of {self.max_seq_len} tokens", "max_tokens")
        if self._blocks_for(n + req.max_tokens) > self.cache.num_blocks:
            raise InvalidRequest(f"prompt plus max_tokens ({n + req.max_tokens} tokens) exceeds the KV cache "
                                 f"({self.cache.num_blocks * self.cache.block_size} tokens)", "max_tokens")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise InvalidRequest(f"logprobs must be between 0 and 20, got {req.logprobs}", "logprobs")
        if req.sampling.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer", "stop")
        try:
            req.sampling.validate()
        except NeoxrayError as e:
            raise InvalidRequest(str(e), None) from None

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_limit]
        if bad:
            raise InvalidRequest(f"{param} has token ids outside the vocabulary [0, {self.vocab_limit}): {bad[:5]}",
                                 param)

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.config.block_size)

    # -- submission (any thread) ---------------------------------------------------------------------------
    def add_request(self, req: Request, sink: Callable[[Output], None]) -> str:
        """Queue a request; `sink` is called on the engine thread with each Output (the last has a
        finish_reason). Raises NeoxrayError for a bad request, QueueFull, or EngineDead."""
        self.check(req)
        if not self.alive and self._thread is not None:
            raise EngineDead(f"the inference engine has stopped: {self.error!r}")
        if self._inbox.qsize() + len(self._waiting) >= self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests are already waiting")
        self._inbox.put(("add", _Seq(req=req, sink=sink, arrival=time.perf_counter())))
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (a client went away): its batch row and cache blocks are freed on the next step."""
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[], object]) -> "queue.Queue":
        """Run fn() on the engine thread between steps (it may use the model); the result or exception
        arrives in the returned queue."""
        box: queue.Queue = queue.Queue(maxsize=1)
        self._inbox.put(("call", (fn, box)))
        return box

    # -- the background thread -------------------------------------------------------------------------------
    def start(self) -> "InferenceEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="neoxray-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stop(self, timeout: float = 30.0, drain: bool = True) -> None:
        """Graceful shutdown: with `drain`, finish what is running and waiting first (up to `timeout` s),
        then abort anything left and end the thread."""
        deadline = time.monotonic() + timeout
        if drain:
            while self.has_work() and self.alive and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or not self._inbox.empty())

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not (self._waiting or self._running):
                    self._drain_inbox(block=True)
                    continue
                self.step()
        except BaseException as e:  # the replica's health check reports it; requests get an error
            self.error = e
            for s in list(self._running) + list(self._waiting):
                self._finish(s, "abort", error=f"inference engine failed: {e!r}")
        finally:
            for s in list(self._running) + list(self._waiting):
                self._finish(s, "abort", error="the inference engine is shutting down")
            while True:  # anything still queued gets an answer too
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self._finish(item, "abort", error="the inference engine is shutting down")
                elif kind == "call":
                    item[1].put(EngineDead("the inference engine is shutting down"))

    def _drain_inbox(self, block: bool = False) -> None:
        while True:
            try:
                kind, item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._by_id[item.req.request_id] = item
                self._waiting.append(item)
            elif kind == "abort":
                s = self._by_id.get(item)
                if s is not None and not s.finished:
                    self._finish(s, "abort")
            elif kind == "call":
                fn, box = item
                try:
                    box.put(fn())
                except BaseException as e:  # handed to the caller, not fatal to the engine
                    box.put(e)

    # -- one step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling iteration: intake, admission, a prefill chunk, a decode step for all running."""
        self._drain_inbox()
        self._admit()
        prefill = self._prefill()
        decoding = [s for s in self._running if not s.in_prefill and s not in prefill]
        if decoding:
            self._decode(decoding)
        self.steps += 1

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            s = self._waiting[0]
            blocks = self.cache.allocate(self._blocks_for(s.prompt_len + s.req.max_tokens))
            if blocks is None:
                return  # first come, first served: wait for blocks to be freed
            self._waiting.pop(0)
            s.blocks = blocks
            s.tokens = list(s.req.prompt_ids)
            if s.req.sampling.is_greedy:
                s.generator = None
            else:
                s.generator = torch.Generator(device=self.device)
                if s.req.sampling.seed is None:
                    s.generator.seed()
                else:
                    s.generator.manual_seed(s.req.sampling.seed)
            if s.req.prompt_logprobs:
                s.prompt_lp = [TokenLogprob(s.tokens[0], None)]
            self._running.append(s)

    def _prefill(self) -> list[_Seq]:
        """Prefill up to prefill_chunk prompt tokens, spread over the admitted requests in order; those whose
        prompt completes get their first token sampled. Returns the requests that took part."""
        budget, rows = self.config.prefill_chunk, []
        for s in self._running:
            if budget <= 0:
                break
            if s.in_prefill:
                n = min(budget, s.prompt_len - s.computed)
                rows.append((s, s.computed, n))
                budget -= n
        if not rows:
            return []
        need_all = [s.req.prompt_logprobs for s, _, _ in rows]
        hidden = self._forward([s for s, _, _ in rows], [st for _, st, _ in rows], [n for _, _, n in rows])  # [b, c, d]
        done = []
        for i, (s, start, n) in enumerate(rows):
            s.computed += n
            self.counters["prompt_tokens"] += n
            if need_all[i]:  # log-probability of each prompt token after this chunk's positions
                logits = self.model.embed_out(hidden[i, :n]).float()  # [n, V]
                logp = F.log_softmax(logits, dim=-1)
                nxt = s.tokens[start + 1:start + n + 1]  # targets inside the prompt
                k = s.req.logprobs or 0
                for j, t in enumerate(nxt):
                    s.prompt_lp.append(self._lp(logp[j], t, k))
            if not s.in_prefill:
                done.append((i, s, n))
        if done:
            last = torch.stack([hidden[i, n - 1] for i, _, n in done])  # [r, d]
            self._sample_and_emit([s for _, s, _ in done], self.model.embed_out(last).float())
        return [s for s, _, _ in rows]

    def _decode(self, seqs: list[_Seq]) -> None:
        hidden = self._forward(seqs, [s.computed for s in seqs], [1] * len(seqs))  # each feeds its newest token
        for s in seqs:
            s.computed += 1
        self._sample_and_emit(seqs, self.model.embed_out(hidden[:, 0]).float())

    def _forward(self, seqs: Sequence[_Seq], starts: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
        """Run rows of new tokens (row i: tokens starts[i] .. starts[i] + lengths[i] of its request) through the
        model against the cache; returns final hidden states [b, s, d] (s = the longest row; padding after)."""
        bs, dev = self.config.block_size, self.device
        b, s_max = len(seqs), max(lengths)
        t_max = max(st + n for st, n in zip(starts, lengths))
        n_blocks = math.ceil(t_max / bs)
        ids = torch.zeros((b, s_max), dtype=torch.long)
        table = torch.zeros((b, n_blocks), dtype=torch.long)
        for i, (seq, st, n) in enumerate(zip(seqs, starts, lengths)):
            ids[i, :n] = torch.as_tensor(seq.tokens[st:st + n], dtype=torch.long)
            blocks = seq.blocks[:n_blocks]
            table[i, :len(blocks)] = torch.as_tensor(blocks, dtype=torch.long)
        read_slots = (table[:, :, None] * bs + torch.arange(bs)).reshape(b, -1)[:, :t_max]  # [b, t]: slot of each position
        q = torch.arange(s_max)[None]  # [1, s]
        positions = torch.as_tensor(list(starts))[:, None] + q  # [b, s]
        valid = q < torch.as_tensor(list(lengths))[:, None]  # [b, s]: real tokens, not padding
        write_rows = valid.flatten().nonzero()[:, 0]  # [n]
        write_slots = read_slots.gather(1, positions.clamp(max=t_max - 1))[valid]  # [n]
        # a key is visible when it is at or before the query's position; padding queries see position 0 only
        mask = torch.arange(t_max)[None, None] <= torch.where(valid, positions, 0)[:, :, None]  # [b, s, t]
        self.cache.bind(write_rows.to(dev), write_slots.to(dev), read_slots.to(dev))
        return self.model.hidden_states(ids.to(dev), positions.to(dev), mask[:, None].to(dev), self.cache)

    def _lp(self, logp_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top = []
        if k:
            vals, idx = logp_row.topk(k)
            top = list(zip(idx.tolist(), vals.tolist()))
        return TokenLogprob(token, float(logp_row[token]), top)

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """logits [r, V] fp32 for the next token of each of seqs."""
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")  # padding rows of the embedding never come out
        params = [s.req.sampling for s in seqs]
        next_ids = sample_next(logits, params, [s.generator for s in seqs]).tolist()
        want_lp = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        logp = F.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        lp_row = {i: r for r, i in enumerate(want_lp)}
        now = time.perf_counter()
        for i, (s, tok) in enumerate(zip(seqs, next_ids)):
            if s.req.max_tokens == 0:  # scoring only: the prompt is done, nothing is generated
                self._finish(s, "length")
                continue
            s.tokens.append(tok)
            s.generated.append(tok)
            self.counters["generated_tokens"] += 1
            if i in lp_row:
                s.pending_lp.append(self._lp(logp[lp_row[i]], tok, s.req.logprobs))
            first = s.first_token_at is None
            if first:
                s.first_token_at = now
            reason = None
            if tok == self.eod_id and s.req.sampling.stop_at_eod:
                reason = "stop"
            elif len(s.generated) >= s.req.max_tokens or len(s.tokens) >= self.max_seq_len:
                reason = "length"
            self._emit(s, reason, first)

    # -- text, stop strings and delivery -------------------------------------------------------------------
    def _text(self, s: _Seq) -> str:
        """The generated text so far (a final end-of-document token left out). Incremental: only the tokens
        after the last complete character are decoded again, since byte-level BPE text decodes piecewise."""
        if self.tokenizer is None:
            return ""
        ids = s.generated[:-1] if s.generated and s.generated[-1] == self.eod_id else s.generated
        tail = self.tokenizer.decode(ids[s.decoded_tokens:])
        if tail.endswith("\ufffd"):  # a character still being spelled: decode these tokens again next time
            return s.decoded_text + tail
        s.decoded_text += tail
        s.decoded_tokens = len(ids)
        return s.decoded_text

    def _emit(self, s: _Seq, reason: str | None, first: bool) -> None:
        text = self._text(s)
        stops = [x for x in s.req.sampling.stop if x]
        if stops:
            lo = max(0, s.emitted_chars - max(map(len, stops)))
            hits = [h for h in (text.find(x, lo) for x in stops) if h >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason is None:
            end = len(text)
            while end > s.emitted_chars and text[end - 1] == "\ufffd":  # a character still being spelled
                end -= 1
            for x in stops:  # hold back a tail that could be the start of a stop string
                for m in range(min(len(x) - 1, end - s.emitted_chars), 0, -1):
                    if text[end - m:end] == x[:m]:
                        end -= m
                        break
            text = text[:end]
        delta = text[s.emitted_chars:] if len(text) > s.emitted_chars else ""
        s.emitted_chars = max(s.emitted_chars, len(text))
        out = Output(request_id=s.req.request_id, token_ids=[s.generated[-1]], text=delta,
                     logprobs=s.pending_lp if s.req.logprobs is not None else None,
                     prompt_tokens=s.prompt_len, generated_tokens=len(s.generated))
        if first:
            out.prompt_logprobs = s.prompt_lp
            out.time_to_first_token_s = s.first_token_at - s.arrival
        s.pending_lp = []
        if reason is not None:
            self._release(s)
            out.finish_reason = reason
            out.latency_s = time.perf_counter() - s.arrival
            self.counters["requests_finished"] += 1
        _deliver(s, out)

    def _release(self, s: _Seq) -> None:
        s.finished = True
        if s in self._running:
            self._running.remove(s)
        if s in self._waiting:
            self._waiting.remove(s)
        if s.blocks:
            self.cache.release(s.blocks)
            s.blocks = []
        self._by_id.pop(s.req.request_id, None)

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        """End a request without a new token (abort, scoring only, engine failure)."""
        if s.finished:
            return
        self._release(s)
        if reason == "abort":
            self.counters["requests_aborted"] += 1
        else:
            self.counters["requests_finished"] += 1
        out = Output(request_id=s.req.request_id, token_ids=[], text="", finish_reason=reason,
                     prompt_tokens=s.prompt_len, generated_tokens=len(s.generated), error=error,
                     latency_s=time.perf_counter() - s.arrival,
                     logprobs=[] if s.req.logprobs is not None else None)
        if not s.generated:
            out.prompt_logprobs = s.prompt_lp
        _deliver(s, out)

    # -- state ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        used = self.cache.num_blocks - len(self.cache.free)
        return {
            "running": len(self._running),
            "waiting": len(self._waiting) + self._inbox.qsize(),
            "kv_blocks_used": used,
            "kv_blocks_total": self.cache.num_blocks,
            "kv_cache_usage": used / self.cache.num_blocks,
            "steps": self.steps,
            **self.counters,
        }

    # -- conveniences ----------------------------------------------------------------------------------------
    def run_until_done(self, requests: Sequence[Request]) -> list[Completion]:
        """Synchronously serve a set of requests on the calling thread (no background thread): for tests,
        benchmarks and offline batch inference."""
        if self._thread is not None:
            raise NeoxrayError("run_until_done drives the engine itself; the background thread is running")
        collected: dict[str, list[Output]] = {r.request_id: [] for r in requests}
        for r in requests:
            self.add_request(r, collected[r.request_id].append)
        while self.has_work():
            self.step()
        return [_assemble(collected[r.request_id], r) for r in requests]

    async def stream(self, req: Request) -> AsyncIterator[Output]:
        """Submit a request from an asyncio loop and yield its Outputs; cancelling the consumer (a client
        that went away) aborts the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.add_request(req, lambda out: loop.call_soon_threadsafe(q.put_nowait, out))
        done = False
        try:
            while not done:
                out = await q.get()
                done = out.finish_reason is not None
                yield out
        finally:
            if not done:
                self.abort(req.request_id)

    async def generate(self, req: Request) -> Completion:
        outs = [o async for o in self.stream(req)]
        return _assemble(outs, req)

    async def run_on_engine(self, fn: Callable[[], object]):
        """Await fn() run on the engine thread."""
        box = self.call(fn)
        result = await asyncio.get_running_loop().run_in_executor(None, box.get)
        if isinstance(result, BaseException):
            raise result
        return result

    # -- embeddings ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, token_lists: Sequence[Sequence[int]]) -> list[list[float]]:
        """Mean of the final-LayerNorm hidden states over each text's tokens, L2-normalised: features for
        downstream tasks, as the GPT-NeoX-20B model card suggests. Runs on the calling thread (use
        `run_on_engine` when the engine thread is running)."""
        out = []
        for ids in token_lists:
            x = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
            h = self.model.hidden_states(x)[0].float().mean(0)  # [d]
            out.append(F.normalize(h, dim=0).tolist())
        return out


def _deliver(s: _Seq, out: Output) -> None:
    try:
        s.sink(out)
    except Exception:  # a consumer that went away (closed event loop) must not take the engine down
        pass


def _assemble(outs: list[Output], req: Request) -> Completion:
    err = next((o.error for o in outs if o.error), None)
    if err:
        raise EngineDead(err)
    return Completion(
        token_ids=list(itertools.chain.from_iterable(o.token_ids for o in outs)),
        text="".join(o.text for o in outs),
        finish_reason=outs[-1].finish_reason if outs else "abort",
        logprobs=list(itertools.chain.from_iterable(o.logprobs or [] for o in outs)) if req.logprobs is not None else None,
        prompt_logprobs=next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None),
        prompt_tokens=len(req.prompt_ids),
    )
