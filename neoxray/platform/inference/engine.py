"""The inference engine: continuous batching over a paged key/value cache. Plain PyTorch, no Ray.

Ray Serve hosts one engine per replica (`neoxray.platform.serve.app`); benchmarks and GPU checks drive it
directly. One background thread owns the model and runs engine steps; callers on any thread (or an asyncio
loop) submit requests and receive their tokens as they are produced.

One engine step:
    1. take in new requests and aborts;
    2. admit waiting requests (`neoxray.platform.inference.scheduler`: fair across groups, i.e. HTTP requests, and
       first come first served within one; batch rows; KV blocks reserved for the prompt plus `max_tokens`, so
       no request is ever preempted);
    3. prefill: up to `prefill_chunk` prompt tokens of the admitted requests (each group's first prompt before
       any group's second), in one forward (`neoxray.platform.inference.model_runner`);
    4. decode: one new token for every running request, in one batched forward.
Tokens, text, stop strings and log-probabilities come from `neoxray.platform.inference.output_processor`. A request
joins the decode batch on the step after its prompt is in the cache and leaves it when it finishes (end of
document, a stop string, `max_tokens`, the context length) or is aborted; its blocks are freed at once. The
cache itself is `neoxray.platform.inference.kv_cache`; requests and outputs are `neoxray.platform.inference.request`.

LoRA (`EngineConfig.max_loras` > 0): the model is wrapped with adapter slots (`neoxray.platform.inference.adapters`);
`add_lora` / `remove_lora` change the set between steps, a request names its adapter (`Request.lora`), and
every forward binds each row's own adapter, so requests of different adapters share prefill and decode steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.gptneox import GPTNeoX
from neoxray.platform.inference.adapters import AdapterSlots, unknown_message
from neoxray.platform.inference.kv_cache import PagedKVCache
from neoxray.platform.inference.model_runner import ModelRunner
from neoxray.platform.inference.output_processor import OutputProcessor
from neoxray.platform.inference.request import (
    Completion,
    EngineConfig,
    EngineDead,
    EngineInfo,
    InvalidRequest,
    Output,
    QueueFull,
    Request,
    UnknownAdapter,
)
from neoxray.platform.inference.scheduler import Scheduler, SequenceState


class InferenceEngine:
    """One model served with continuous batching: the scheduler, model runner and output processor of one
    KV cache, driven by `step()` (on the background thread after `start()`, or by the caller)."""

    def __init__(self, model: GPTNeoX, tokenizer, config: EngineConfig | None = None, model_name: str = "neoxray"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = (config or EngineConfig()).validate()
        self.model_name = model_name
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        c = self.config
        self.adapters = AdapterSlots(model, c.max_loras, c.max_lora_rank)
        self.cache = PagedKVCache.for_model(model, c.kv_cache_tokens or c.max_num_seqs * cfg.max_seq_len, c.block_size)
        self.scheduler = Scheduler(c, self.cache)
        self.runner = ModelRunner(model, self.cache, self.adapters)
        self.output_processor = OutputProcessor(
            tokenizer,
            eod_id=tokenizer.eod_id if tokenizer is not None else cfg.eos_token_id,
            vocab_limit=getattr(tokenizer, "vocab_size", None) or cfg.vocab_size,  # rows past it are padding
            max_seq_len=cfg.max_seq_len,
            device=self.device,
        )
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.steps = 0
        self.counters = {
            "prompt_tokens": 0,
            "prefix_cache_tokens": 0,
            "generated_tokens": 0,
            "requests_finished": 0,
            "requests_aborted": 0,
        }

    @property
    def eod_id(self) -> int:
        """The end-of-document token: it ends a request (unless its sampling says otherwise) and is no text."""
        return self.output_processor.eod_id

    @eod_id.setter
    def eod_id(self, value: int) -> None:
        self.output_processor.eod_id = value

    @property
    def vocab_limit(self) -> int:
        """Token ids from here on are padding rows of the embedding: refused in prompts, never sampled."""
        return self.output_processor.vocab_limit

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_path(
        cls,
        path,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        config: EngineConfig | None = None,
        model_name: str | None = None,
    ) -> InferenceEngine:
        """An exported Hugging Face directory, a training checkpoint, or a run directory (its newest checkpoint)."""
        from neoxray.platform.model_loading import load_for_inference

        model, tokenizer, name = load_for_inference(path, device=device, dtype=dtype)
        return cls(model, tokenizer, config, model_name=model_name or name)

    # -- request checks (no engine state touched; safe from any thread) ----------------------------------
    @property
    def info(self) -> EngineInfo:
        """What this engine serves and the bounds a request must keep (plain data: it travels to the ingress)."""
        return EngineInfo(
            model_name=self.model_name,
            max_seq_len=self.max_seq_len,
            vocab_limit=self.vocab_limit,
            eod_id=self.eod_id,
            num_blocks=self.cache.num_blocks,
            block_size=self.cache.block_size,
            has_tokenizer=self.tokenizer is not None,
            max_loras=self.config.max_loras,
        )

    def check(self, req: Request) -> None:
        """Raise InvalidRequest naming what is wrong with a request that this engine cannot serve."""
        self.info.check(req)

    # -- submission (any thread) ---------------------------------------------------------------------------
    def add_request(self, req: Request, sink: Callable[[Output], None]) -> str:
        """Queue a request; `sink` is called on the engine thread with each Output (the last has a
        finish_reason). Raises NeoxrayError for a bad request, QueueFull, or EngineDead."""
        self.add_requests([(req, sink)])
        return req.request_id

    def add_requests(self, items: Sequence[tuple[Request, Callable[[Output], None]]]) -> None:
        """Queue several requests (the choices of one HTTP request) at once: all of them or, when one is invalid
        or they do not all fit in the waiting queue, none."""
        for req, _ in items:
            self.check(req)
            if req.lora is not None and not self.adapters.known(req.lora):
                raise UnknownAdapter(unknown_message(req.lora), "model")
        if not self.alive and self._thread is not None:
            raise EngineDead(f"the inference engine has stopped: {self.error!r}")
        if self._inbox.qsize() + len(self.scheduler.waiting) + len(items) > self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests are already waiting")
        now = time.perf_counter()
        for req, sink in items:
            self._inbox.put(("add", SequenceState(req=req, sink=sink, arrival=now)))

    def abort(self, request_id: str) -> None:
        """Stop a request (a client went away): its batch row and cache blocks are freed on the next step."""
        self._inbox.put(("abort", request_id))

    # -- LoRA adapters -------------------------------------------------------------------------------------------
    def add_lora(self, name: str, adapter, source: str | None = None) -> list[str]:
        """Load `adapter` (a LoRAAdapter: `neoxray.model.peft_format.read_peft_adapter`) as `name`; returns the
        idle adapters evicted to make room. On the engine thread (`run_between_steps`) once it runs."""
        return self.adapters.add(name, adapter, source)

    def remove_lora(self, name: str) -> None:
        """Unload adapter `name` (AdapterBusy while requests use it). On the engine thread once it runs."""
        self.adapters.remove(name)

    def loras(self) -> list[dict]:
        """The loaded adapters: [{name, source, slot, requests}] (a snapshot; any thread)."""
        return self.adapters.describe()

    def run_between_steps(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between two steps (it may use the model and the adapters). Its result, or
        its exception, arrives in the returned Future: `.result()` on a thread, `await asyncio.wrap_future(...)`
        on an event loop. It fails with EngineDead once the engine has stopped."""
        fut: Future = Future()
        if self._thread is not None and not self.alive:
            fut.set_exception(EngineDead(f"the inference engine is not running ({self.error!r})"))
        else:
            self._inbox.put(("call", (fn, fut)))
        return fut

    # -- the background thread -------------------------------------------------------------------------------
    def start(self) -> InferenceEngine:
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
        return self.scheduler.has_work() or not self._inbox.empty()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.scheduler.has_work():
                    self._drain_inbox(block=True)
                    continue
                self.step()
        except BaseException as e:  # the replica's health check reports it; requests get an error
            self.error = e
            for s in self.scheduler.unfinished():
                self._finish(s, "abort", error=f"inference engine failed: {e!r}")
        finally:
            for s in self.scheduler.unfinished():
                self._finish(s, "abort", error="the inference engine is shutting down")
            while True:  # anything still queued gets an answer too
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self._finish(item, "abort", error="the inference engine is shutting down")
                elif kind == "call" and item[1].set_running_or_notify_cancel():
                    item[1].set_exception(EngineDead("the inference engine is shutting down"))

    def _drain_inbox(self, block: bool = False) -> None:
        while True:
            try:
                kind, item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "add":
                try:  # the adapter was checked on submission; an unload queued before it may have removed it since
                    item.lora_slot, item.prefix_salt = self.adapters.acquire(item.req.lora)
                except UnknownAdapter as e:
                    self._finish(item, "abort", error=str(e))
                    continue
                item.lora_held = item.req.lora is not None
                self.scheduler.add(item)
            elif kind == "abort":
                s = self.scheduler.get(item)
                if s is not None and not s.finished:
                    self._finish(s, "abort")
            elif kind == "call":
                fn, fut = item
                if fut.set_running_or_notify_cancel():  # not if its caller has gone
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller, not fatal to the engine
                        fut.set_exception(e)

    # -- one step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling iteration: intake, admission, a prefill chunk, a decode step for all running."""
        self._drain_inbox()
        for s in self.scheduler.admit():
            self.output_processor.start(s)
            self.counters["prefix_cache_tokens"] += s.reused
        prefill = self._prefill()
        decoding = self.scheduler.decoding(prefill)
        if decoding:
            self._decode(decoding)
        self.steps += 1

    def _prefill(self) -> list[SequenceState]:
        """Prefill this step's prompt chunks, rows of similar length in one forward each (a 5-token continuation
        is not padded to a 500-token context); requests whose prompt completes get their first token sampled.
        Returns the requests that took part."""
        rows = self.scheduler.prefill_chunks()
        if not rows:
            return []
        done, last = [], []
        for bucket in _length_buckets(rows):
            seqs, starts, lengths = zip(*bucket)
            hidden = self.runner.forward(seqs, starts, lengths)  # [b, c, d]
            scored = []  # (request, first position, its hidden states) of the positions whose scores are wanted
            for i, (s, start, n) in enumerate(bucket):
                s.computed += n
                self.counters["prompt_tokens"] += n
                if s.req.prompt_logprobs:  # log-probability of each prompt token after this chunk's positions
                    lo = min(n, max(0, s.req.score_from - 1 - start))  # earlier positions predict unscored tokens
                    if lo < n:
                        scored.append((s, start + lo, hidden[i, lo:n]))
                if not s.in_prefill:
                    done.append(s)
                    last.append(hidden[i, n - 1])
            if scored:  # one output head and log-softmax for every scored position of the bucket
                logp = self.runner.log_probs(torch.cat([h for _, _, h in scored]))
                for (s, first, _), part in zip(scored, logp.split([h.shape[0] for _, _, h in scored])):
                    self.output_processor.add_prompt_logprobs(s, part, first)
        self.scheduler.prefilled(rows)
        if done:
            self._sample_and_emit(done, self.runner.logits(torch.stack(last)))  # [r, d] -> [r, V]
        return [s for s, _, _ in rows]

    def _decode(self, seqs: list[SequenceState]) -> None:
        hidden = self.runner.forward(seqs, [s.computed for s in seqs], [1] * len(seqs))  # each feeds its newest token
        for s in seqs:
            s.computed += 1
        self._sample_and_emit(seqs, self.runner.logits(hidden[:, 0]))

    def _sample_and_emit(self, seqs: list[SequenceState], logits: torch.Tensor) -> None:
        """logits [r, V] fp32 for the next token of each of seqs: sample, deliver, release the finished."""
        for s, out in zip(seqs, self.output_processor.process(seqs, logits)):
            self.counters["generated_tokens"] += len(out.token_ids)
            if out.finish_reason is not None:
                self._release(s)
                self.counters["requests_finished"] += 1
            _deliver(s, out)

    def _finish(self, s: SequenceState, reason: str, error: str | None = None) -> None:
        """End a request without a new token (abort, engine failure)."""
        if s.finished:
            return
        self._release(s)
        self.counters["requests_aborted" if reason == "abort" else "requests_finished"] += 1
        _deliver(s, self.output_processor.final(s, reason, error))

    def _release(self, s: SequenceState) -> None:
        self.scheduler.release(s)
        if s.lora_held:
            self.adapters.release(s.req.lora)
            s.lora_held = False

    # -- state ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        used = self.cache.used
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + self._inbox.qsize(),
            "kv_blocks_used": used,
            "kv_blocks_total": self.cache.num_blocks,
            "kv_cache_usage": used / self.cache.num_blocks,
            "steps": self.steps,
            **self.counters,
            "lora_adapters": len(self.adapters.slot),
            "lora_mixed_forwards": self.runner.mixed_forwards,
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
        return [Completion.of(collected[r.request_id], r) for r in requests]

    async def stream(self, requests: Sequence[Request]) -> AsyncIterator[list[tuple[int, Output]]]:
        """Submit `requests` as one group (`add_requests`: all or none) from an asyncio loop and yield, as they
        come, the (index in `requests`, Output) pairs that are ready, in the order they came. Closing the iterator
        early (a client that went away) aborts the requests still running."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(i: int):
            return lambda out: loop.call_soon_threadsafe(q.put_nowait, (i, out))

        self.add_requests([(r, sink(i)) for i, r in enumerate(requests)])
        unfinished = set(range(len(requests)))
        try:
            while unfinished:
                ready = [await q.get()]
                while not q.empty():
                    ready.append(q.get_nowait())
                unfinished.difference_update(i for i, out in ready if out.finish_reason is not None)
                yield ready
        finally:
            for i in unfinished:
                self.abort(requests[i].request_id)

    async def generate(self, req: Request) -> Completion:
        async with contextlib.aclosing(self.stream([req])) as ready:
            outs = [out async for batch in ready for _, out in batch]
        return Completion.of(outs, req)

    def embed(self, token_lists: Sequence[Sequence[int]], lora: str | None = None) -> list[list[float]]:
        """Mean of the final-LayerNorm hidden states over each text's tokens, L2-normalised (`ModelRunner.embed`),
        of the base model or adapter `lora`; each list is checked first (not empty, within the context, in the
        vocabulary: an InvalidRequest naming `input`, the embeddings route's field). Runs on the calling thread
        (use `run_between_steps` when the engine thread is running)."""
        for ids in token_lists:
            if not 0 < len(ids) <= self.max_seq_len:
                raise InvalidRequest(f"input has {len(ids)} tokens; the model's context is {self.max_seq_len}", "input")
            self.info.check_token_ids(ids, "input")
        if lora is not None and not self.adapters.known(lora):
            raise UnknownAdapter(unknown_message(lora), "model")
        return self.runner.embed(token_lists, None if lora is None else self.adapters.slot[lora])


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


def _deliver(s: SequenceState, out: Output) -> None:
    with contextlib.suppress(Exception):  # a consumer that went away (closed event loop) must not take the engine down
        s.sink(out)
