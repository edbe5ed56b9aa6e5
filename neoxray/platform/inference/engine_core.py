"""The engine's step, in vLLM's contract: schedule -> execute -> process outputs.

    plan = scheduler.schedule()            # admitted requests; forwards: prompt chunks (bucketed), one decode
    for fwd in plan.forwards:
        result = executor.execute(fwd.batch)        # one process, or N tensor-parallel workers
        scheduler.update(fwd)                        # tokens in the cache, prefix blocks shareable
        output_processor: prompt log-probs, sample the next token of each sampled row, stop rules, Outputs

`EngineCore` is synchronous and single-threaded: the step loop and the thread-safe intake around it are
`neoxray.platform.inference.engine.InferenceEngine`. Requests enter as `SequenceState`s (`add`), end by
finishing, by abort or by an engine failure (`finish`), and are released at once (their KV blocks freed, their
adapter's count dropped).
"""

from __future__ import annotations

import contextlib

import torch

from neoxray.platform.inference.adapters import AdapterSlots
from neoxray.platform.inference.executor import Executor
from neoxray.platform.inference.kv_cache import BlockManager
from neoxray.platform.inference.output_processor import OutputProcessor
from neoxray.platform.inference.request import EngineConfig, Output, UnknownAdapter
from neoxray.platform.inference.scheduler import Scheduler
from neoxray.platform.inference.sequence import SequenceState


class EngineCore:
    """The scheduler, executor, output processor and adapters of one engine."""

    def __init__(self, executor: Executor, tokenizer, config: EngineConfig):
        cfg = executor.model_config
        self.config = config
        self.executor = executor
        self.blocks = BlockManager(executor.num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks)
        self.adapters = AdapterSlots(executor, config.max_loras, config.max_lora_rank)
        self.output_processor = OutputProcessor(
            tokenizer,
            eod_id=tokenizer.eod_id if tokenizer is not None else cfg.eos_token_id,
            vocab_limit=getattr(tokenizer, "vocab_size", None) or cfg.vocab_size,  # rows past it are padding
            max_seq_len=cfg.max_seq_len,
            device=executor.device,
            vocab_size=cfg.vocab_size,
        )
        self.steps = 0
        self.counters = {
            "prompt_tokens": 0,
            "prefix_cache_tokens": 0,
            "generated_tokens": 0,
            "requests_finished": 0,
            "requests_aborted": 0,
        }

    def add(self, s: SequenceState) -> None:
        """Take in a request (its adapter was checked on submission; an unload queued before it may have
        removed it since: then it ends at once)."""
        try:
            s.lora_slot, s.prefix_salt = self.adapters.acquire(s.req.lora)
        except UnknownAdapter as e:
            self.finish(s, "abort", error=str(e))
            return
        s.lora_held = s.req.lora is not None
        self.scheduler.add(s)

    def abort(self, request_id: str) -> None:
        s = self.scheduler.get(request_id)
        if s is not None and not s.finished:
            self.finish(s, "abort")

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: the scheduler's plan, each forward executed, its outputs processed."""
        self.executor.check_alive()
        plan = self.scheduler.schedule()
        for s in plan.admitted:
            self.output_processor.start(s)
            self.counters["prefix_cache_tokens"] += s.reused
        for fwd in plan.forwards:
            result = self.executor.execute(fwd.batch)
            self.scheduler.update(fwd)
            if fwd.prefill:
                self.counters["prompt_tokens"] += sum(fwd.batch.lengths)
            for (row, lo), logp in zip(fwd.batch.score, result.score_logprobs):
                self.output_processor.add_prompt_logprobs(fwd.seqs[row], logp, fwd.batch.starts[row] + lo)
            if fwd.batch.sample:
                self._sample_and_emit(fwd.sampled, result.logits)
        self.steps += 1

    def _sample_and_emit(self, seqs: list[SequenceState], logits: torch.Tensor) -> None:
        """logits [r, V] fp32 for the next token of each of seqs: sample, deliver, release the finished."""
        for s, out in zip(seqs, self.output_processor.process(seqs, logits)):
            self.counters["generated_tokens"] += len(out.token_ids)
            if out.finish_reason is not None:
                self._release(s)
                self.counters["requests_finished"] += 1
            deliver(s, out)

    def finish(self, s: SequenceState, reason: str, error: str | None = None) -> None:
        """End a request without a new token (abort, engine failure)."""
        if s.finished:
            return
        self._release(s)
        self.counters["requests_aborted" if reason == "abort" else "requests_finished"] += 1
        deliver(s, self.output_processor.final(s, reason, error))

    def _release(self, s: SequenceState) -> None:
        self.scheduler.release(s)
        if s.lora_held:
            self.adapters.release(s.req.lora)
            s.lora_held = False

    def stats(self) -> dict:
        used = self.blocks.used
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": used,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_cache_usage": used / self.blocks.num_blocks,
            "steps": self.steps,
            **self.counters,
            "lora_adapters": len(self.adapters.slot),
            "lora_mixed_forwards": self.executor.mixed_forwards,
        }


def deliver(s: SequenceState, out: Output) -> None:
    with contextlib.suppress(Exception):  # a consumer that went away (closed event loop) must not take the engine down
        s.decoding.sink(out)
