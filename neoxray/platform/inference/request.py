"""What goes into and comes out of the inference engine: its configuration (`EngineConfig`), what it can serve
(`EngineInfo`, with the checks of a request against it), a request (`Request`: prompt ids, token budget,
sampling, log-probabilities, the group it belongs to, the structure its output must have: `StructuredOutput`,
compiled and enforced by `neoxray.platform.inference.structured`), the streamed deltas it produces (`Output`,
`TokenLogprob`), a request's whole result (`Completion`), and the errors it raises. Plain data that travels between
processes (the serving layer reads an `EngineInfo`: context, vocabulary, adapter slots, in another process than the
engine's; the engine checks each request as it takes it in); no tensors, though importing it imports torch
(through `neoxray.model.decoding`, whose `SamplingParams` it carries)."""

from __future__ import annotations

import itertools
import math
import uuid
from dataclasses import dataclass, field

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams


class InvalidRequest(NeoxrayError):
    """A request this engine cannot serve; `param` names the offending field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownAdapter(InvalidRequest):
    """A request or call names a LoRA adapter this engine does not hold (the serving layer answers 404)."""


class AdapterBusy(NeoxrayError):
    """A LoRA adapter cannot be unloaded (or make room) now: requests are running or waiting on it (409)."""


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
    max_running_per_group: int | None = None
    """Most requests of one group (the sequences of one HTTP request: n x prompts) in the batch at once, so that
    one request cannot take every batch row while others wait (None: no cap)."""
    prefix_caching: bool = True
    """Share the KV cache blocks of a common prompt prefix between requests (`kv_cache`): computed once, reused
    by every request that starts with the same tokens."""
    max_loras: int = 0
    """LoRA adapter slots (`neoxray.platform.inference.adapters`): adapters held at once, each request applying
    its own (or none) inside shared batches. 0: no LoRA (the model runs unwrapped)."""
    max_lora_rank: int = 16
    """The largest adapter rank a slot holds (slot memory grows with it; compute follows the ranks in use)."""

    def validate(self) -> EngineConfig:
        for name in ("max_num_seqs", "block_size", "prefill_chunk", "max_waiting"):
            if getattr(self, name) < 1:
                raise NeoxrayError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise NeoxrayError(
                f"engine.max_loras must be >= 0 and engine.max_lora_rank >= 1, got {self.max_loras} and "
                f"{self.max_lora_rank}"
            )
        if self.max_running_per_group is not None and self.max_running_per_group < 1:
            raise NeoxrayError(f"engine.max_running_per_group must be >= 1, got {self.max_running_per_group}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise NeoxrayError(
                f"engine.kv_cache_tokens must be >= block_size ({self.block_size}), got {self.kv_cache_tokens}"
            )
        return self


STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
"""What a `StructuredOutput` can ask for."""


@dataclass
class StructuredOutput:
    """The structure a request's generated text must have (OpenAI's `response_format`, vLLM's
    `structured_outputs`): plain data, picklable (it travels inside a `Request` to a replica's engine), built with
    one of the constructors. The engine compiles it on intake (`neoxray.platform.inference.structured`: a spec
    that cannot be compiled is an `InvalidRequest` naming `param`) and masks each sampled token to what can
    still complete it; the request ends ('stop') once the text is complete and nothing may follow."""

    kind: str
    """One of STRUCTURED_KINDS."""
    value: object = None
    """json_schema: the schema (a dict); regex: the pattern (Rust regex syntax, matched in full); choice: the
    strings (a tuple; the text is exactly one of them); grammar: a Lark (or llama.cpp GBNF) grammar;
    json_object: None (any JSON object)."""
    param: str = "response_format"
    """The API field that asked for it: what an error names (OpenAI's error `param`)."""

    @classmethod
    def json_object(cls, param: str = "response_format") -> StructuredOutput:
        return cls("json_object", None, param)

    @classmethod
    def json_schema(cls, schema: dict, param: str = "response_format") -> StructuredOutput:
        return cls("json_schema", schema, param)

    @classmethod
    def regex(cls, pattern: str, param: str = "structured_outputs") -> StructuredOutput:
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options, param: str = "structured_outputs") -> StructuredOutput:
        return cls("choice", tuple(options), param)

    @classmethod
    def grammar(cls, text: str, param: str = "structured_outputs") -> StructuredOutput:
        return cls("grammar", text, param)

    def validate(self) -> StructuredOutput:
        """Raise InvalidRequest naming `param` for a spec of the wrong shape (whether it compiles is checked
        where the engine's tokenizer is: `InferenceEngine.check`)."""
        v, where = self.value, self.param
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequest(f"{where}: unknown kind {self.kind!r} (one of {', '.join(STRUCTURED_KINDS)})", where)
        if self.kind == "json_schema" and not isinstance(v, dict):
            raise InvalidRequest(f"{where}: the JSON schema must be an object, got {type(v).__name__}", where)
        if self.kind in ("regex", "grammar") and not (isinstance(v, str) and v):
            raise InvalidRequest(f"{where}: the {self.kind} must be a non-empty string", where)
        if self.kind == "choice" and not (isinstance(v, tuple) and v and all(isinstance(c, str) and c for c in v)):
            raise InvalidRequest(f"{where}: choice must be a non-empty list of non-empty strings", where)
        return self


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 16
    """New tokens at most. 0 with prompt_logprobs: only the prompt is scored; its last token is then only a
    target, never fed to the model (as transformers' scoring does), so it may be one token past the context."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """temperature / top_k / top_p / seed / stop strings / stop_at_eod / logit bias and penalties (its
    max_new_tokens is ignored)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's log-probability and the k most likely ones."""
    prompt_logprobs: bool = False
    """Also score the prompt (echo): the log-probability of each prompt token given the ones before it."""
    score_from: int = 0
    """With prompt_logprobs: score only the prompt tokens from this index on (a context's tokens need no
    scores when only its continuation is judged), which lets the context come from the prefix cache."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    group: str | None = None
    """The requests of one group (one HTTP request's choices) share the batch fairly with other groups: admission
    goes to the group with the fewest requests running, and a group holds at most `max_running_per_group`
    batch rows. None: a group of its own."""
    lora: str | None = None
    """The LoRA adapter (its name in the engine, `InferenceEngine.add_lora`) this request applies; None: the base
    model. Its KV cache blocks are never shared with requests of another adapter (or of the base)."""
    token_text: bool = False
    """Also spell the tokens out, as an OpenAI completion shows them: the prompt's text on the first Output
    (`Output.prompt_text`), and each log-probability entry's token text, its alternatives' and where it starts
    (`TokenLogprob.text`, `.top_text`, `.offset`). Off for callers that need numbers only (evaluation)."""
    structured: StructuredOutput | None = None
    """The structure the generated text must have (JSON, a JSON schema, a regex, a choice, a grammar); None:
    free text. Each token is drawn from those that can still complete it."""

    @property
    def group_key(self) -> str:
        return self.group if self.group is not None else self.request_id


SAMPLING_EPS = 1e-5
"""Temperatures below this (but above 0) are refused by the engine: dividing fp32 logits by them overflows."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds a random generator takes (torch's manual_seed)."""
TOP_K_MAX = 2**31 - 1


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves and the bounds a request must keep (`check`, where the engine takes a request in).
    Plain data: the serving layer knows them in another process (the context, the vocabulary, adapter slots)."""

    model_name: str
    max_seq_len: int
    vocab_limit: int
    """Token ids from here on are padding rows of the embedding: refused in prompts, never sampled."""
    eod_id: int
    num_blocks: int
    block_size: int
    has_tokenizer: bool = True
    max_loras: int = 0
    """LoRA adapter slots (0: this engine serves the base model only)."""

    def check(self, req: Request) -> None:
        """Raise InvalidRequest, naming the field, for a request this engine cannot serve."""
        n = len(req.prompt_ids)
        if n == 0:
            raise InvalidRequest("prompt is empty", "prompt")
        self.check_token_ids(req.prompt_ids, "prompt")
        if req.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0, got {req.max_tokens}", "max_tokens")
        fed = n - 1 if (req.max_tokens == 0 and req.prompt_logprobs and n > 1) else n  # a last target is not fed
        if fed > self.max_seq_len:
            raise InvalidRequest(f"prompt has {n} tokens; the model's context is {self.max_seq_len}", "prompt")
        if fed + req.max_tokens > self.max_seq_len:
            raise InvalidRequest(
                f"prompt ({n} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                f"context of {self.max_seq_len} tokens",
                "max_tokens",
            )
        if math.ceil((n + req.max_tokens) / self.block_size) > self.num_blocks:
            raise InvalidRequest(
                f"prompt plus max_tokens ({n + req.max_tokens} tokens) exceeds the KV cache "
                f"({self.num_blocks * self.block_size} tokens)",
                "max_tokens",
            )
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise InvalidRequest(f"logprobs must be between 0 and 20, got {req.logprobs}", "logprobs")
        if not 0 <= req.score_from <= n:
            raise InvalidRequest(f"score_from must be between 0 and the prompt's {n} tokens, got {req.score_from}")
        if req.structured is not None:
            req.structured.validate()
            if not self.has_tokenizer:
                raise InvalidRequest(f"{req.structured.param} needs a tokenizer", req.structured.param)
        sp = req.sampling
        if sp.stop and not self.has_tokenizer:
            raise InvalidRequest("stop strings need a tokenizer", "stop")
        try:
            sp.validate()
        except NeoxrayError as e:
            raise InvalidRequest(str(e), getattr(e, "param", None)) from None
        self.check_token_ids(list(sp.logit_bias), "logit_bias")
        self.check_token_ids(list(sp.stop_token_ids), "stop_token_ids")
        # bounds whose violation would fail inside the engine step, taking every running request with it
        if not sp.is_greedy and sp.temperature < SAMPLING_EPS:
            raise InvalidRequest(f"temperature must be 0 (greedy) or >= {SAMPLING_EPS}", "temperature")
        if sp.seed is not None and not SEED_RANGE[0] <= sp.seed <= SEED_RANGE[1]:
            raise InvalidRequest(f"seed must be a 64-bit integer, got {sp.seed}", "seed")
        if sp.top_k > TOP_K_MAX:
            raise InvalidRequest(f"top_k must be <= {TOP_K_MAX}, got {sp.top_k}", "top_k")

    def check_token_ids(self, ids, param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_limit]
        if bad:
            raise InvalidRequest(
                f"{param} has token ids outside the vocabulary [0, {self.vocab_limit}): {bad[:5]}", param
            )


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    """None for the first prompt token, which has no context."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The most likely tokens at this position, best first (empty when none were asked for)."""
    text: str | None = None
    """With `Request.token_text`: this token's text (decoded alone)."""
    top_text: list[str] | None = None
    """With `Request.token_text`: the text of each of `top`."""
    offset: int | None = None
    """With `Request.token_text`: where this token's text starts, in characters from the start of the prompt's
    text (prompt entries) or of the generated text (generated entries)."""


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
    prompt_text: str | None = None
    """With `Request.token_text`, on the first Output: the prompt's token ids decoded."""
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
            prompt_text=a.prompt_text if a.prompt_text is not None else b.prompt_text,
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
