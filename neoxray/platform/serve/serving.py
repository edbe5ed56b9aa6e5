"""The OpenAI-compatible serving layer (after vLLM's `OpenAIServingCompletion`): it turns a parsed request
(`neoxray.platform.serve.protocol`) into engine requests and the engine's Outputs into the protocol's response
models. No HTTP here (`neoxray.platform.serve.api` maps routes onto it), and no engine either: it reaches one
through an `EngineClient` (`neoxray.platform.serve.client`): in this process, or a model replica of the Serve
application.

- prompts: a string, strings, token ids or token-id lists, each checked (the model served, the vocabulary,
  the context, the request's limits: `neoxray.platform.serve.limits`) before anything reaches the engine; a
  text too long to fit the context is refused before it is tokenized, and tokenizing runs on a thread pool,
  never on the event loop;
- completions: `n` choices per prompt (seed + j for choice j), sent to the engine as one group (the engine
  shares its batch fairly between groups), echo, log-probabilities with text offsets; the whole answer, or
  server-sent events in which whatever is ready goes out together;
- embeddings, tokenize / detokenize / tokenizer_info (vLLM's routes that lm-evaluation-harness's remote
  tokenizer uses), models, health;
- LoRA adapters (`neoxray.platform.serve.lora_serving`): a request's `model` names the base or an adapter;
  /v1/models lists both; adapters are loaded and unloaded at run time.
Refusals are `ApiError`s (an HTTP status and OpenAI's error fields); the engine's own `InvalidRequest` names
the field too. Once a stream has started, a failure ends it with an error event and `data: [DONE]`. A client
that goes away closes its generator, which aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from neoxray.model.decoding import SamplingParams
from neoxray.platform.inference.request import SAMPLING_EPS, EngineDead, Output, QueueFull, Request, TokenLogprob
from neoxray.platform.serve.client import EngineClient, EngineUnavailable, merge_ready
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

Choice = tuple[list[int], str, Request]
"""One choice of a completion: its prompt's token ids and text, and its engine request."""

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
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    @classmethod
    def unavailable(cls, e: BaseException) -> ApiError:
        """The 503 for an engine that cannot serve now (`UNAVAILABLE`)."""
        if isinstance(e, QueueFull):
            return cls(
                503, f"server overloaded: {e}; retry later", "server_error", code="server_overloaded", retry_after_s=1
            )
        if isinstance(e, EngineUnavailable):
            return cls(503, str(e), "server_error", code=e.code, retry_after_s=e.retry_after_s)
        return cls(503, str(e), "server_error", code="model_unavailable")


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
        self._token_str = lru_cache(maxsize=65536)(lambda t: self.tokenizer.decode([t]))
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

    async def prompts_of(self, items: Sequence, field: str) -> list[tuple[list[int], str]]:
        """-> [(token ids, text)] of each prompt. What cannot fit the context is refused first, without
        tokenizing; then texts are tokenized (and token ids decoded) on the tokenizer threads."""
        ctx = self.info.max_seq_len
        for item in items:
            if isinstance(item, str):
                if self.max_prompt_chars is not None and len(item) > self.max_prompt_chars:
                    raise ApiError(
                        400,
                        f"{field} has {len(item)} characters, more than any text of {ctx} tokens (the model's "
                        f"context) can have with this tokenizer ({self.max_prompt_chars})",
                        param=field,
                    )
            else:
                if len(item) > ctx:
                    raise ApiError(400, f"{field} has {len(item)} tokens; the model's context is {ctx}", param=field)
                self.info.check_token_ids(item, field)
        return await self._off_loop(self._tokenize_items, list(items), field)

    def _tokenize_items(self, items: list, field: str) -> list[tuple[list[int], str]]:
        texts = [item for item in items if isinstance(item, str)]
        for text in texts:
            check_unicode(text, field)
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])  # releases the GIL while it works
        out = []
        for item in items:
            if isinstance(item, str):
                ids, text = next(encoded), item
            else:
                ids, text = list(item), self.tokenizer.decode(item)
            if not ids:
                raise ApiError(400, f"{field} is empty (it encodes to no tokens)", param=field)
            out.append((ids, text))
        return out

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
                )
            )
        return reqs

    # -- simple routes -----------------------------------------------------------------------------------
    async def health(self) -> HealthResponse:
        try:
            await asyncio.wait_for(self.ready(), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, "the model is not ready yet", "server_error", code="model_unavailable") from None
        except UNAVAILABLE as e:
            raise ApiError.unavailable(e) from None
        try:
            stats = await self.client.stats()
        except UNAVAILABLE as e:
            raise ApiError.unavailable(e) from None
        return HealthResponse(model=self.model_name, **stats)

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
        limits, ctx = self.limits, self.info.max_seq_len
        items = self.items_of(body.input, "input")
        if len(items) > limits.max_embedding_inputs:
            raise ApiError(
                400, f"input has {len(items)} items; at most {limits.max_embedding_inputs} per request", param="input"
            )
        prompts = await self.prompts_of(items, "input")
        for ids, _ in prompts:
            if len(ids) > ctx:
                raise ApiError(400, f"input has {len(ids)} tokens; the model's context is {ctx}", param="input")
        n = sum(len(ids) for ids, _ in prompts)
        if n > limits.max_embedding_tokens:
            raise ApiError(
                400, f"input has {n} tokens in all; at most {limits.max_embedding_tokens} per request", param="input"
            )
        try:
            vectors = await self.client.embed([ids for ids, _ in prompts], lora)
        except UNAVAILABLE as e:
            raise ApiError.unavailable(e) from None
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
        seqs, most = len(items) * body.n, self.limits.max_seqs_per_request
        if seqs > most:
            param = "n" if body.n > 1 else "prompt"
            raise ApiError(
                400,
                f"{param}: the request asks for {seqs} sequences (n={body.n} x {len(items)} prompts); "
                f"at most {most} per request",
                param=param,
            )
        prompts = await self.prompts_of(items, "prompt")
        group = f"cmpl-{uuid.uuid4().hex}"
        choices: list[Choice] = [
            (ids, text, r) for ids, text in prompts for r in self.engine_requests(body, ids, group, lora)
        ]
        for _, _, r in choices:
            self.info.check(r)  # InvalidRequest: a 400 naming the field
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        batches = self.client.generate([r for _, _, r in choices])
        try:
            first = await anext(batches)
        except UNAVAILABLE as e:
            raise ApiError.unavailable(e) from None
        except BaseException:
            await batches.aclose()
            raise
        if body.stream:
            return self._stream(body, choices, first, batches, prompt_tokens, group, created)
        try:
            return await self._complete(body, choices, first, batches, prompt_tokens, group, created)
        finally:  # done, failed, or the client went away: nothing of it keeps running
            await batches.aclose()

    async def _complete(
        self,
        body: CompletionRequest,
        choices: list[Choice],
        first: list[tuple[int, Output]],
        batches: AsyncIterator[list[tuple[int, Output]]],
        prompt_tokens: int,
        cid: str,
        created: int,
    ) -> CompletionResponse:
        outs: list[list[Output]] = [[] for _ in choices]

        def take(batch):
            for i, out in batch:
                if out.error:
                    raise ApiError(503, out.error, "server_error", code="model_unavailable")
                outs[i].append(out)

        take(first)
        try:
            async for batch in batches:
                take(batch)
        except UNAVAILABLE as e:
            raise ApiError.unavailable(e) from None
        if any(not o or o[-1].finish_reason is None for o in outs):
            raise ApiError(503, "the model's answer ended early; retry", "server_error", code="model_unavailable")
        # text offsets decode every prefix of long prompts (echo): on the tokenizer threads, not the event loop
        return await self._off_loop(self._answer, body, choices, outs, prompt_tokens, cid, created)

    def _answer(
        self,
        body: CompletionRequest,
        choices: list[Choice],
        outs: list[list[Output]],
        prompt_tokens: int,
        cid: str,
        created: int,
    ) -> CompletionResponse:
        answer, completion_tokens = [], 0
        for idx, ((ids, text, _), outs_i) in enumerate(zip(choices, outs)):
            gen_ids = [t for o in outs_i for t in o.token_ids]
            gen_lp = [e for o in outs_i for e in (o.logprobs or [])]
            prompt_lp = next((o.prompt_logprobs for o in outs_i if o.prompt_logprobs is not None), None)
            completion_tokens += len(gen_ids)
            answer.append(
                CompletionChoice(
                    index=idx,
                    text=(text if body.echo else "") + "".join(o.text for o in outs_i),
                    logprobs=self._logprobs(body, ids, text, prompt_lp, gen_lp, gen_ids, body.echo),
                    finish_reason=outs_i[-1].finish_reason,
                )
            )
        return CompletionResponse(
            id=cid,
            created=created,
            model=self.adapter_of(body.model) or self.model_name,  # as vLLM: the adapter's name, or the base's
            choices=answer,
            usage=UsageInfo(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    async def _stream(
        self,
        body: CompletionRequest,
        choices: list[Choice],
        first: list[tuple[int, Output]],
        batches: AsyncIterator[list[tuple[int, Output]]],
        prompt_tokens: int,
        cid: str,
        created: int,
    ) -> AsyncIterator[str]:
        q: asyncio.Queue = asyncio.Queue()
        q.put_nowait(first)
        END = object()

        async def pump() -> None:
            try:
                async for batch in batches:
                    q.put_nowait(batch)
                q.put_nowait(END)
            except Exception as e:  # the engine or its replica failed: ends the stream with an error event
                q.put_nowait(e)

        served = self.adapter_of(body.model) or self.model_name

        def chunk(parts: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return CompletionStreamChunk(id=cid, created=created, model=served, choices=parts, usage=usage).sse()

        task = asyncio.create_task(pump())
        generated: dict[int, list[int]] = {i: [] for i in range(len(choices))}
        echoed: set[int] = set()
        remaining = set(range(len(choices)))
        failure: ApiError | None = None
        try:
            while remaining and failure is None:
                # whatever is ready goes out together: when the client or the proxy lags behind the engine,
                # consecutive outputs of a choice are merged into one chunk instead of queueing up one per token
                ready = [await q.get()]
                while not q.empty():
                    ready.append(q.get_nowait())
                outs: list[tuple[int, Output]] = []
                for item in ready:
                    if item is END:
                        failure = ApiError(503, "the model's answer ended early; retry", "server_error")
                    elif isinstance(item, BaseException):
                        failure = _stream_failure(item)
                    else:
                        outs.extend(item)
                for i, out in merge_ready(outs):
                    if out.error:
                        yield ApiError(503, out.error, "server_error", code="model_unavailable").response().sse()
                        remaining.discard(i)
                        continue
                    ids, text, _ = choices[i]
                    echo_now = body.echo and i not in echoed
                    echoed.add(i)
                    lp = self._logprobs(
                        body, ids, text, out.prompt_logprobs, out.logprobs or [], out.token_ids, echo_now
                    )
                    if lp is not None and not echo_now and generated[i]:  # offsets continue after earlier tokens
                        lp.text_offset = self._offsets(generated[i] + out.token_ids, len(text))[len(generated[i]) :]
                    generated[i].extend(out.token_ids)
                    piece = (text if echo_now else "") + out.text
                    if piece or lp is not None or out.finish_reason:
                        yield chunk(
                            [CompletionChoice(index=i, text=piece, logprobs=lp, finish_reason=out.finish_reason)]
                        )
                    if out.finish_reason is not None:
                        remaining.discard(i)
            if failure is not None and remaining:
                yield failure.response().sse()
            elif body.stream_options and body.stream_options.include_usage:
                ct = sum(len(v) for v in generated.values())
                yield chunk(
                    [], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=ct, total_tokens=prompt_tokens + ct)
                )
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()  # a client that went away: the pump's generator closes, which aborts its requests

    # -- log-probabilities -------------------------------------------------------------------------------
    def _logprobs(
        self,
        body: CompletionRequest,
        ids: list[int],
        prompt_text: str,
        prompt_lp: list[TokenLogprob] | None,
        gen_lp: list[TokenLogprob],
        gen_ids: list[int],
        echo_prompt: bool,
    ) -> CompletionLogprobs | None:
        """A choice's logprobs block (None unless asked for): the prompt's entries first when it is echoed."""
        if body.logprobs is None:
            return None
        entries = (list(prompt_lp or []) if echo_prompt else []) + list(gen_lp)
        toks, lps, tops = [], [], []
        for e in entries:
            tok = self._token_str(e.token_id)
            toks.append(tok)
            lps.append(e.logprob)
            if e.logprob is None:
                tops.append(None)
            else:
                top = {self._token_str(t): lp for t, lp in e.top}
                top.setdefault(tok, e.logprob)
                tops.append(top)
        offs = (self._offsets(ids, 0) if echo_prompt else []) + self._offsets(gen_ids, len(prompt_text))
        return CompletionLogprobs(tokens=toks, token_logprobs=lps, top_logprobs=tops, text_offset=offs[: len(toks)])

    def _offsets(self, ids: list[int], base: int) -> list[int]:
        """Character offset of each token of `ids` in text that starts at `base`."""
        prefixes = self.tokenizer.backend.decode_batch([ids[:i] for i in range(len(ids))], skip_special_tokens=False)
        return [base + len(p) for p in prefixes]


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


def _stream_failure(e: BaseException) -> ApiError:
    """The error event that ends a stream whose engine or model replica failed."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UNAVAILABLE):
        return ApiError.unavailable(e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
