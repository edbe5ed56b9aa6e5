"""The OpenAI-compatible serving layer (after vLLM's `OpenAIServingCompletion`): it turns a parsed request
(`neoxray.platform.serve.protocol`) into engine requests and the engine's Outputs into the protocol's response
models. No HTTP here (`neoxray.platform.serve.api` maps routes onto it), and no engine either: it reaches one
through an `EngineClient` (`neoxray.platform.serve.client`): in this process, or a model replica of the Serve
application.

Each step happens once, here or in the engine:
- prompts: a string, strings, token ids or token-id lists. This layer checks what only it can (the request's
  limits, `neoxray.platform.serve.limits`; a text too long to fit the context, refused before it is
  tokenized) and tokenizes texts, on a thread pool, never on the event loop. It decodes nothing: the engine
  checks every request it takes in (the vocabulary, the context, sampling; `EngineInfo.check`, a 400 naming
  the field) and spells out what the answer shows (a token-id prompt's text, log-probability tokens and text
  offsets: `Request.token_text`);
- completions: `n` choices per prompt (seed + j for choice j), sent to the engine as one group (the engine
  shares its batch fairly between groups), echo, log-probabilities with text offsets; the whole answer, or
  server-sent events, one per choice for each piece the engine client hands over (it merges what is ready);
- embeddings, tokenize / detokenize / tokenizer_info (vLLM's routes that lm-evaluation-harness's remote
  tokenizer uses), models, health;
- LoRA adapters (`neoxray.platform.serve.lora_serving`): a request's `model` names the base or an adapter;
  /v1/models lists both; adapters are loaded and unloaded at run time.
Refusals are `ApiError`s (an HTTP status and OpenAI's error fields; `ApiError.of` maps the engine's and the
engine client's exceptions onto them). Once a stream has started, a failure ends it with an error event and
`data: [DONE]`. A client that goes away closes its generator, which aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from neoxray.model.decoding import SamplingParams
from neoxray.platform.inference.request import (
    SAMPLING_EPS,
    AdapterBusy,
    EngineDead,
    InvalidRequest,
    Output,
    QueueFull,
    Request,
    TokenLogprob,
    UnknownAdapter,
)
from neoxray.platform.serve.client import EngineClient, EngineUnavailable, NotAllowed
from neoxray.platform.serve.limits import ServingLimits, prompt_char_bound
from neoxray.platform.serve.lora_serving import LoRAServing
from neoxray.platform.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorInfo,
    ErrorResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    UsageInfo,
)


@dataclass
class Choice:
    """One choice of a completion: its prompt's token ids and text, and its engine request."""

    ids: list[int]
    text: str | None
    """The prompt as sent, or (a token-id prompt) the engine's decoding of it once its first Output came."""
    request: Request


UNAVAILABLE = (QueueFull, EngineDead, EngineUnavailable)
"""What an engine client raises when no engine can serve a request now: 503."""
READY_TIMEOUT_S = 30.0
"""How long /health waits for the engine's description (the first call, while a model replica starts)."""


class ApiError(Exception):
    """A refusal: the HTTP status and OpenAI's error fields (and Retry-After, in seconds, when it helps)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogate reaches JSON
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    @classmethod
    def of(cls, e: BaseException) -> ApiError:
        """What the API answers to `e`: a refusal of the engine's (400 naming the field, 404 for an adapter that
        is not loaded, 409 for one in use), of the server's settings (403), nobody to serve it now (503), or a
        bug (500)."""
        if isinstance(e, ApiError):
            return e
        if isinstance(e, UnknownAdapter):
            return cls(404, str(e), param=e.param, code="model_not_found")
        if isinstance(e, InvalidRequest):
            return cls(400, str(e), param=e.param)
        if isinstance(e, AdapterBusy):
            return cls(409, str(e), param="lora_name", code="adapter_busy")
        if isinstance(e, NotAllowed):
            return cls(403, str(e), "permission_error", e.param, e.code)
        if isinstance(e, QueueFull):
            return cls(
                503, f"server overloaded: {e}; retry later", "server_error", code="server_overloaded", retry_after_s=1
            )
        if isinstance(e, EngineUnavailable):
            return cls(503, str(e), "server_error", code=e.code, retry_after_s=e.retry_after_s)
        if isinstance(e, EngineDead):
            return cls(503, str(e), "server_error", code="model_unavailable")
        return cls(500, f"internal error: {type(e).__name__}: {e}", "server_error")


class OpenAIServing(LoRAServing):
    """The API's answers for the engine behind `client`, named `model_name` (default: the engine's name).
    `lora_updates_refused`: why runtime LoRA adapter changes are refused (None: allowed)."""

    def __init__(
        self,
        client: EngineClient,
        model_name: str | None = None,
        limits: ServingLimits | None = None,
        tokenizer_threads: int = 4,
        lora_updates_refused: str | None = None,
    ):
        self.client = client
        self.lora_updates_refused = lora_updates_refused
        self.limits = limits or ServingLimits()
        self._name = model_name
        self._pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="neoxray-tokenize")
        self._setup_done = False

    async def ready(self) -> None:
        """Know the engine (its bounds and tokenizer); the first call may wait for the model to be up."""
        if self._setup_done:
            return
        await self.client.ready()
        self.info = self.client.info
        self.tokenizer = self.client.tokenizer
        self.model_name = self._name or self.info.model_name
        self.max_prompt_chars = prompt_char_bound(self.tokenizer, self.info.max_seq_len)
        self._setup_done = True

    async def _off_loop(self, fn, *args):
        """fn(*args) on the tokenizer threads: long texts never hold the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- checks and prompts ------------------------------------------------------------------------------
    @staticmethod
    def items_of(prompt, field: str) -> list:
        """The prompts of a string, strings, token ids or token-id lists (not yet tokenized)."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, f"{field} is empty", param=field)
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    async def prompts_of(self, items: Sequence, field: str) -> list[tuple[list[int], str | None]]:
        """-> [(token ids, text)] of each prompt (text None for token ids, which the engine checks and spells
        out). A text that cannot fit the context is refused first, without tokenizing; texts are tokenized on
        the tokenizer threads."""
        texts = [item for item in items if isinstance(item, str)]
        for text in texts:
            if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
                ctx = self.info.max_seq_len
                raise ApiError(
                    400,
                    f"{field} has {len(text)} characters, more than any text of {ctx} tokens (the model's "
                    f"context) can have with this tokenizer ({self.max_prompt_chars})",
                    param=field,
                )
        encoded = iter(await self._off_loop(self._tokenize, texts, field) if texts else [])
        return [(next(encoded), item) if isinstance(item, str) else (list(item), None) for item in items]

    def _tokenize(self, texts: list[str], field: str) -> list[list[int]]:
        for text in texts:
            check_unicode(text, field)
        encoded = self.tokenizer.encode_batch(texts)  # releases the GIL while it works
        if not all(encoded):
            raise ApiError(400, f"{field} is empty (it encodes to no tokens)", param=field)
        return encoded

    def engine_requests(
        self, body: CompletionRequest, ids: list[int], group: str, lora: str | None = None
    ) -> list[Request]:
        """The `n` engine requests of one prompt (choice j samples with seed + j), in the request's group, with
        LoRA adapter `lora` (None: the base)."""
        max_tokens = body.max_tokens if body.max_tokens is not None else max(0, self.info.max_seq_len - len(ids))
        reqs = []
        for j in range(body.n):
            sampling = SamplingParams(
                temperature=body.temperature,
                top_k=max(body.top_k, 0),
                top_p=body.top_p,
                greedy=body.temperature < SAMPLING_EPS,  # as vLLM: a vanishing temperature is greedy
                seed=None if body.seed is None else body.seed + j,
                stop=body.stops,
                stop_at_eod=not body.ignore_eos,
                logit_bias=body.token_bias,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
            )
            reqs.append(
                Request(
                    ids,
                    max_tokens=max_tokens,
                    sampling=sampling,
                    logprobs=body.logprobs,
                    prompt_logprobs=body.echo and body.logprobs is not None,
                    group=group,
                    lora=lora,
                    token_text=body.echo or body.logprobs is not None,  # the engine spells out what is shown
                )
            )
        return reqs

    # -- simple routes -----------------------------------------------------------------------------------
    async def health(self) -> HealthResponse:
        try:
            await asyncio.wait_for(self.ready(), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, "the model is not ready yet", "server_error", code="model_unavailable") from None
        return HealthResponse(model=self.model_name, **await self.client.stats())

    async def tokenizer_info(self) -> TokenizerInfo:
        await self.ready()
        tok = self.tokenizer
        eod = tok.decode([self.info.eod_id])
        return TokenizerInfo(
            eos_token=eod,
            bos_token=eod,
            pad_token=tok.decode([tok.pad_id]),
            model_max_length=self.info.max_seq_len,
            tokenizer_class="GPTNeoXTokenizer",
            vocab_size=tok.vocab_size,
        )

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        await self.ready()
        await self.resolve_model(body.model)

        def work():
            check_unicode(body.prompt, "prompt")
            return self.tokenizer.encode_batch([body.prompt])[0]

        ids = await self._off_loop(work)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.info.max_seq_len)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        await self.ready()
        await self.resolve_model(body.model)
        vocab = self.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens has ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=await self._off_loop(self.tokenizer.decode, body.tokens))

    async def embeddings(self, body: EmbeddingRequest) -> EmbeddingResponse:
        await self.ready()
        lora = await self.resolve_model(body.model)
        limits = self.limits
        items = self.items_of(body.input, "input")
        if len(items) > limits.max_embedding_inputs:
            raise ApiError(
                400, f"input has {len(items)} items; at most {limits.max_embedding_inputs} per request", param="input"
            )
        prompts = await self.prompts_of(items, "input")
        n = sum(len(ids) for ids, _ in prompts)
        if n > limits.max_embedding_tokens:
            raise ApiError(
                400, f"input has {n} tokens in all; at most {limits.max_embedding_tokens} per request", param="input"
            )
        vectors = await self.client.embed([ids for ids, _ in prompts], lora)  # the engine checks each input
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode() for v in vectors]
        return EmbeddingResponse(
            data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
            model=lora or self.model_name,
            usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n),
        )

    # -- completions -------------------------------------------------------------------------------------
    async def create_completion(self, body: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """The whole answer, or (`body.stream`) the server-sent events to send. Everything is checked, and the
        engine has taken the request, before either starts: a refusal (a bad request, a full queue) is an HTTP
        status, never an event halfway through a stream."""
        await self.ready()
        lora = self.adapter_of(body.model)
        items = self.items_of(body.prompt, "prompt")
        self._check_sequences(body, len(items))
        prompts = await self.prompts_of(items, "prompt")
        group = f"cmpl-{uuid.uuid4().hex}"
        job = Pending(
            body,
            [Choice(ids, text, r) for ids, text in prompts for r in self.engine_requests(body, ids, group, lora)],
            group,
            int(time.time()),
            lora or self.model_name,  # as vLLM: the adapter's name, or the base's
            sum(len(ids) for ids, _ in prompts),
        )
        batches = self.client.generate([c.request for c in job.choices])  # the engine checks each request
        try:
            first = await anext(batches)
        except BaseException:
            await batches.aclose()
            raise
        outputs = _following(first, batches)
        if body.stream:
            return job.stream(outputs)
        async with contextlib.aclosing(outputs):  # done, failed, or the client went away: nothing keeps running
            return await job.complete(outputs)

    def _check_sequences(self, body: CompletionRequest, prompts: int) -> None:
        seqs, most = prompts * body.n, self.limits.max_seqs_per_request
        if seqs > most:
            param = "n" if body.n > 1 else "prompt"
            raise ApiError(
                400,
                f"{param}: the request asks for {seqs} sequences (n={body.n} x {prompts} prompts); "
                f"at most {most} per request",
                param=param,
            )


@dataclass
class Pending:
    """One completion request the engine has taken: what its answer, whole or streamed, is built from."""

    body: CompletionRequest
    choices: list[Choice]
    id: str
    created: int
    model: str
    prompt_tokens: int

    async def complete(self, outputs: AsyncIterator[list[tuple[int, Output]]]) -> CompletionResponse:
        outs: list[list[Output]] = [[] for _ in self.choices]
        async for batch in outputs:
            for i, out in batch:
                if out.error:
                    raise ApiError(503, out.error, "server_error", code="model_unavailable")
                outs[i].append(out)
        if any(not o or o[-1].finish_reason is None for o in outs):
            raise ApiError(503, "the model's answer ended early; retry", "server_error", code="model_unavailable")
        whole = [functools.reduce(Output.merged, o) for o in outs]
        generated = sum(len(out.token_ids) for out in whole)
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[self.choice(i, out, self.body.echo) for i, out in enumerate(whole)],
            usage=self.usage(generated),
        )

    async def stream(self, outputs: AsyncIterator[list[tuple[int, Output]]]) -> AsyncIterator[str]:
        started, remaining, generated = set(), set(range(len(self.choices))), 0
        failure: ApiError | None = None
        async with contextlib.aclosing(outputs):  # a client that went away: its engine requests are aborted
            try:
                async for batch in outputs:
                    for i, out in batch:
                        if out.error:
                            yield ApiError(503, out.error, "server_error", code="model_unavailable").response().sse()
                            remaining.discard(i)
                            continue
                        echo = self.body.echo and i not in started
                        started.add(i)
                        generated += len(out.token_ids)
                        choice = self.choice(i, out, echo)
                        if choice.text or choice.logprobs is not None or choice.finish_reason:
                            yield self.chunk([choice])
                        if out.finish_reason is not None:
                            remaining.discard(i)
            except Exception as e:  # the engine or its replica failed: ends the stream with an error event
                failure = ApiError.of(e)
        if remaining:
            yield (failure or ApiError(503, "the model's answer ended early; retry", "server_error")).response().sse()
        elif self.body.stream_options and self.body.stream_options.include_usage:
            yield self.chunk([], self.usage(generated))
        yield "data: [DONE]\n\n"

    def choice(self, i: int, out: Output, echo: bool) -> CompletionChoice:
        """Choice i's part of the answer from `out` (all of its Outputs merged, or the latest ones when streamed),
        with its prompt in front when `echo`."""
        c = self.choices[i]
        if c.text is None:  # a token-id prompt: the engine's decoding comes with the first Output
            c.text = out.prompt_text or ""
        return CompletionChoice(
            index=i,
            text=(c.text if echo else "") + out.text,
            logprobs=_logprobs(self.body, c.text, out, echo),
            finish_reason=out.finish_reason,
        )

    def chunk(self, parts: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        chunk = CompletionStreamChunk(id=self.id, created=self.created, model=self.model, choices=parts, usage=usage)
        return chunk.sse()

    def usage(self, generated: int) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens, completion_tokens=generated, total_tokens=self.prompt_tokens + generated
        )


async def _following(first, rest: AsyncIterator) -> AsyncIterator:
    """`first`, then what `rest` yields; closing it closes `rest`."""
    async with contextlib.aclosing(rest):
        yield first
        async for item in rest:
            yield item


def _logprobs(body: CompletionRequest, prompt_text: str, out: Output, echo: bool) -> CompletionLogprobs | None:
    """A choice's logprobs block (None unless asked for), as the engine spelled it out: the prompt's entries
    first when it is echoed; text offsets count from the start of the prompt's text."""
    if body.logprobs is None:
        return None
    entries = [(e, 0) for e in out.prompt_logprobs or []] if echo else []
    entries += [(e, len(prompt_text)) for e in out.logprobs or []]
    return CompletionLogprobs(
        tokens=[e.text for e, _ in entries],
        token_logprobs=[e.logprob for e, _ in entries],
        top_logprobs=[_top(e) for e, _ in entries],
        text_offset=[start + e.offset for e, start in entries],
    )


def _top(e: TokenLogprob) -> dict[str, float] | None:
    """The most likely tokens at an entry's position, the chosen one always among them (None: no context)."""
    if e.logprob is None:
        return None
    top = {text: lp for text, (_, lp) in zip(e.top_text, e.top)}
    top.setdefault(e.text, e.logprob)
    return top


def check_unicode(text: str, field: str) -> None:
    """Refuse a text the tokenizer cannot take: a lone surrogate (JSON's "\\ud800") is no Unicode character."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"{field} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not "
            "valid Unicode",
            param=field,
        ) from None
