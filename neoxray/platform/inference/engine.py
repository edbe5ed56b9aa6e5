"""The inference engine: continuous batching over a paged key/value cache. Plain PyTorch, no Ray.

Ray Serve hosts one engine per replica (`neoxray.platform.serve.app`); evaluation, benchmarks and GPU checks
drive it directly. `InferenceEngine` is the step loop and the thread-safe, asyncio-friendly way in: one
background thread owns the engine and runs its steps; callers on any thread (or an asyncio loop) submit requests
and receive their tokens as they are produced. Each step is vLLM's contract (`neoxray.platform.inference.
engine_core`): the scheduler's plan (`neoxray.platform.inference.scheduler`: admission fair across groups, KV
blocks reserved for the prompt plus `max_tokens` so nothing is preempted, prompt chunks, one decode batch), run
by an executor (`neoxray.platform.inference.executor`: this process, or N tensor-parallel workers,
`neoxray.platform.inference.tp_executor`), completed by the output processor
(`neoxray.platform.inference.output_processor`: tokens, text, stop strings, log-probabilities).

LoRA (`EngineConfig.max_loras` > 0): every worker's model is wrapped with adapter slots; `add_lora` /
`remove_lora` change the set between steps (`neoxray.platform.inference.adapters`), a request names its adapter
(`Request.lora`), and every forward binds each row's own adapter, so requests of different adapters share
prefill and decode steps.
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
from neoxray.model.precision import inference_dtype, resolve_device
from neoxray.paths import is_uri
from neoxray.platform.inference.adapters import unknown_message
from neoxray.platform.inference.engine_core import EngineCore
from neoxray.platform.inference.executor import Executor, LocalExecutor
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
from neoxray.platform.inference.sequence import SequenceState


class InferenceEngine:
    """One model served with continuous batching: the scheduler, model runner and output processor of one
    KV cache, driven by `step()` (on the background thread after `start()`, or by the caller)."""

    def __init__(
        self,
        model: GPTNeoX | None,
        tokenizer,
        config: EngineConfig | None = None,
        model_name: str = "neoxray",
        executor: Executor | None = None,
        quantization: str | None = None,
    ):
        """`model`: the whole model, run in this process; or `executor`: what runs it (tensor-parallel workers;
        this process then holds no weights), with `model` None. `quantization`: the scheme the weights were
        quantized with (reported only)."""
        self.tokenizer = tokenizer
        self.config = c = (config or EngineConfig()).validate()
        self.model_name = model_name
        if executor is None:
            cfg = model.config
            model = model.eval()
            executor = LocalExecutor(
                model, num_kv_blocks(c, cfg.max_seq_len), c.block_size, c.max_loras, c.max_lora_rank
            )
        self.executor = executor
        self.model = model
        """The model, when this process holds it whole (None with tensor-parallel workers)."""
        self.model_config = executor.model_config
        self.max_seq_len = self.model_config.max_seq_len
        self.device, self.dtype = executor.device, executor.dtype
        self.core = EngineCore(executor, tokenizer, c)
        self._layout = {"quantization": quantization, **executor.describe()}
        self.scheduler = self.core.scheduler
        self.adapters = self.core.adapters
        self.output_processor = self.core.output_processor
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    @property
    def runner(self):
        """The model runner, when this process holds the model."""
        return self.executor.runner

    @property
    def steps(self) -> int:
        return self.core.steps

    @property
    def counters(self) -> dict:
        """Tokens and requests so far (prompt, prefix-cache, generated tokens; finished, aborted requests)."""
        return self.core.counters

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
        tensor_parallel_size: int = 1,
        quantization: str | None = None,
        launcher=None,
    ) -> InferenceEngine:
        """An exported Hugging Face directory, a training checkpoint, or a run directory (its newest checkpoint).
        `tensor_parallel_size` > 1: the model split over that many workers (`launcher`: how they start; local
        processes by default), each reading only its shard. `quantization`: int8_weight_only or
        int4_weight_only, applied to each worker's linears after loading. Every layout and scheme is checked
        before any weight is read."""
        from neoxray.platform.model_loading import load_for_inference, prepare_sharded

        config = (config or EngineConfig()).validate()
        if quantization is not None:
            from neoxray.platform.inference.quantization import check_scheme, quantize_weights

            where = resolve_device(device)
            check_scheme(quantization, where, inference_dtype(where, dtype))
        if tensor_parallel_size == 1:
            model, tokenizer, name = load_for_inference(path, device=device, dtype=dtype)
            if quantization is not None:
                quantize_weights(model, quantization)
            return cls(model, tokenizer, config, model_name=model_name or name, quantization=quantization)
        from neoxray.platform.inference.tp_executor import TensorParallelExecutor, WorkerSpec

        local, model_config, tokenizer, name, device, dtype = prepare_sharded(path, tensor_parallel_size, device, dtype)
        spec = WorkerSpec(
            model=str(path) if is_uri(str(path)) else str(local),  # a URI: each worker's node reads its own cache
            tp_size=tensor_parallel_size,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            num_blocks=num_kv_blocks(config, model_config.max_seq_len),
            block_size=config.block_size,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            quantization=quantization,
        )
        executor = TensorParallelExecutor(spec, launcher, model_config)
        return cls(None, tokenizer, config, model_name=model_name or name, executor=executor, quantization=quantization)

    # -- request checks (no engine state touched; safe from any thread) ----------------------------------
    @property
    def info(self) -> EngineInfo:
        """What this engine serves and the bounds a request must keep (plain data: it travels to the ingress)."""
        return EngineInfo(
            model_name=self.model_name,
            max_seq_len=self.max_seq_len,
            vocab_limit=self.vocab_limit,
            eod_id=self.eod_id,
            num_blocks=self.core.blocks.num_blocks,
            block_size=self.core.blocks.block_size,
            has_tokenizer=self.tokenizer is not None,
            max_loras=self.config.max_loras,
        )

    def check(self, req: Request) -> None:
        """Raise InvalidRequest naming what is wrong with a request that this engine cannot serve; a structured
        output's grammar is compiled here, on the caller's thread (kept for the engine thread)."""
        self.info.check(req)
        if req.structured is not None:
            self.output_processor.grammars.compile(req.structured)

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
            self._inbox.put(("add", SequenceState.of(req, sink, now)))

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
        self.executor.shutdown()

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
                self.core.finish(s, "abort", error=f"inference engine failed: {e!r}")
        finally:
            for s in self.scheduler.unfinished():
                self.core.finish(s, "abort", error="the inference engine is shutting down")
            while True:  # anything still queued gets an answer too
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self.core.finish(item, "abort", error="the inference engine is shutting down")
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
                self.core.add(item)
            elif kind == "abort":
                self.core.abort(item)
            elif kind == "call":
                fn, fut = item
                if fut.set_running_or_notify_cancel():  # not if its caller has gone
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller, not fatal to the engine
                        fut.set_exception(e)

    # -- one step ------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One engine step on the calling thread: intake, then the core's schedule -> execute -> process."""
        self._drain_inbox()
        self.core.step()

    # -- state ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            **self.core.stats(),
            "waiting": len(self.scheduler.waiting) + self._inbox.qsize(),
            **self.describe(),
        }

    def describe(self) -> dict:
        """The replica's workers: tensor-parallel size, quantization, weight and KV cache bytes per worker
        (measured once, on the engine's construction)."""
        return dict(self._layout)

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
        constrained = [r for r in requests if r.structured is not None]
        if constrained:  # grammars compile on a thread (the engine's first reads its tokenizer: tenths of a second),
            # not on the event loop; `add_requests` below finds them compiled
            await loop.run_in_executor(None, lambda: [self.check(r) for r in constrained])

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
        return self.executor.embed(token_lists, None if lora is None else self.adapters.slot[lora])


def num_kv_blocks(config: EngineConfig, max_seq_len: int) -> int:
    """The KV cache's blocks: `kv_cache_tokens` (default: a full context per batch row), whole blocks, at least
    one."""
    return max(1, (config.kv_cache_tokens or config.max_num_seqs * max_seq_len) // config.block_size)
