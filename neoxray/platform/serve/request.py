"""What goes into and comes out of the inference engine: its configuration (`EngineConfig`), a request
(`Request`: prompt ids, token budget, sampling, log-probabilities), the streamed deltas it produces (`Output`,
`TokenLogprob`), a request's whole result (`Completion`), and the errors it raises. Plain data, no torch."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams


class InvalidRequest(NeoxrayError):
    """A request this engine cannot serve; `param` names the offending field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(NeoxrayError):
    """The engine's waiting queue is full: the caller should answer 503 / retry later."""


class EngineDead(NeoxrayError):
    """The engine thread has stopped (after an internal error or shutdown)."""


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

    def validate(self) -> EngineConfig:
        for name in ("max_num_seqs", "block_size", "prefill_chunk", "max_waiting"):
            if getattr(self, name) < 1:
                raise NeoxrayError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise NeoxrayError(
                f"engine.kv_cache_tokens must be >= block_size ({self.block_size}), got {self.kv_cache_tokens}"
            )
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

    def merged(self, later: Output) -> Output:
        """One Output covering this one, then `later` (of the same request)."""
        a, b = self, later
        return Output(
            request_id=a.request_id,
            token_ids=a.token_ids + b.token_ids,
            text=a.text + b.text,
            logprobs=None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or []),
            prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
            finish_reason=b.finish_reason,
            prompt_tokens=b.prompt_tokens,
            generated_tokens=b.generated_tokens,
            error=a.error or b.error,
            time_to_first_token_s=a.time_to_first_token_s or b.time_to_first_token_s,
            latency_s=b.latency_s,
        )


@dataclass
class Completion:
    """A request's whole result (`InferenceEngine.generate`)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob] | None
    prompt_tokens: int

    @classmethod
    def of(cls, outs: list[Output], req: Request) -> Completion:
        """The Outputs of `req`, joined; raises EngineDead when the engine failed it."""
        err = next((o.error for o in outs if o.error), None)
        if err:
            raise EngineDead(err)
        return cls(
            token_ids=list(itertools.chain.from_iterable(o.token_ids for o in outs)),
            text="".join(o.text for o in outs),
            finish_reason=outs[-1].finish_reason if outs else "abort",
            logprobs=list(itertools.chain.from_iterable(o.logprobs or [] for o in outs))
            if req.logprobs is not None
            else None,
            prompt_logprobs=next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None),
            prompt_tokens=len(req.prompt_ids),
        )
