"""The OpenAI-compatible serving layer over one inference engine (after vLLM's `OpenAIServingCompletion`):
it turns a parsed request (`neoxray.platform.serve.protocol`) into engine requests and the engine's Outputs
into the protocol's response models. No HTTP here: `neoxray.platform.serve.api` maps routes onto it.

- prompts: a string, strings, token ids or token-id lists, each checked (the model served, the vocabulary,
  the context) before anything reaches the engine;
- completions: `n` choices per prompt (seed + j for choice j), echo, log-probabilities with text offsets;
  the whole answer, or server-sent events in which whatever is ready goes out together;
- embeddings (run on the engine thread), tokenize / detokenize / tokenizer_info (vLLM's routes that
  lm-evaluation-harness's remote tokenizer uses), models, health.
Refusals are `ApiError`s (an HTTP status and OpenAI's error fields); the engine's own `InvalidRequest` names
the field too. A client that goes away cancels its choices, which aborts their engine requests.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache

import numpy as np

from neoxray.model.decoding import SamplingParams
from neoxray.platform.serve.engine import InferenceEngine
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
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    UsageInfo,
)
from neoxray.platform.serve.request import EngineDead, Output, QueueFull, Request, TokenLogprob

Choice = tuple[list[int], str, Request]
"""One choice of a completion: its prompt's token ids and text, and its engine request."""


class ApiError(Exception):
    """A refusal: the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


class ServeObserver:
    """Hooks for metrics (`neoxray.platform.serve.metrics.RayServeMetrics` records them as Ray metrics)."""

    def on_output(self, out: Output, since_previous_s: float | None) -> None:
        """Each Output of each request; since_previous_s is the gap after the previous one (None for the first)."""

    def on_stats(self, stats: dict) -> None:
        """The engine's stats(), about once a second."""


class OpenAIServing:
    """The API's answers for one engine (whose background thread must be running), named `model_name`."""

    def __init__(self, engine: InferenceEngine, model_name: str | None = None, observer: ServeObserver | None = None):
        self.engine = engine
        self.model_name = model_name or engine.model_name
        self.tokenizer = engine.tokenizer
        self.observer = observer or ServeObserver()
        self._token_str = lru_cache(maxsize=65536)(lambda t: self.tokenizer.decode([t]))

    # -- checks and prompts ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def prompts_of(self, prompt, field: str) -> list[tuple[list[int], str]]:
        """-> [(token ids, text)] for a string, strings, token ids or token-id lists."""
        if isinstance(prompt, str):
            items = [prompt]
        elif not prompt:
            raise ApiError(400, f"{field} is empty", param=field)
        elif isinstance(prompt[0], int):
            items = [list(prompt)]
        else:
            items = list(prompt)
        out = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item)
                text = item
            else:
                ids = list(item)
                self.engine.check_token_ids(ids, field)
                text = self.tokenizer.decode(ids)
            if not ids:
                raise ApiError(400, f"{field} is empty (it encodes to no tokens)", param=field)
            out.append((ids, text))
        return out

    def engine_requests(self, body: CompletionRequest, ids: list[int]) -> list[Request]:
        """The `n` engine requests of one prompt (choice j samples with seed + j)."""
        max_tokens = body.max_tokens if body.max_tokens is not None else max(0, self.engine.max_seq_len - len(ids))
        reqs = []
        for j in range(body.n):
            sampling = SamplingParams(
                temperature=body.temperature,
                top_k=max(body.top_k, 0),
                top_p=body.top_p,
                greedy=body.temperature == 0.0,
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
                )
            )
        return reqs

    # -- simple routes -----------------------------------------------------------------------------------
    def health(self) -> HealthResponse:
        if not self.engine.alive:
            raise ApiError(503, f"the inference engine is not running ({self.engine.error!r})", "server_error")
        return HealthResponse(model=self.model_name, **self.engine.stats())

    def models(self) -> ModelList:
        return ModelList(
            data=[ModelCard(id=self.model_name, created=int(time.time()), max_model_len=self.engine.max_seq_len)]
        )

    def tokenizer_info(self) -> TokenizerInfo:
        tok = self.tokenizer
        eod = tok.decode([self.engine.eod_id])
        return TokenizerInfo(
            eos_token=eod,
            bos_token=eod,
            pad_token=tok.decode([tok.pad_id]),
            model_max_length=self.engine.max_seq_len,
            tokenizer_class="GPTNeoXTokenizer",
            vocab_size=tok.vocab_size,
        )

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        ids = self.tokenizer.encode(body.prompt)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.engine.max_seq_len)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        vocab = self.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens has ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    async def embeddings(self, body: EmbeddingRequest) -> EmbeddingResponse:
        self.check_model(body.model)
        engine = self.engine
        items = self.prompts_of(body.input, "input")
        for ids, _ in items:
            if len(ids) > engine.max_seq_len:
                raise ApiError(
                    400, f"input has {len(ids)} tokens; the model's context is {engine.max_seq_len}", param="input"
                )
        if not engine.alive:
            raise ApiError(503, "the inference engine is not running", "server_error")
        vectors = await engine.run_on_engine(lambda: engine.embed([ids for ids, _ in items]))
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode() for v in vectors]
        n = sum(len(ids) for ids, _ in items)
        return EmbeddingResponse(
            data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
            model=self.model_name,
            usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n),
        )

    # -- completions -------------------------------------------------------------------------------------
    async def create_completion(self, body: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """The whole answer, or (`body.stream`) the server-sent events to send. Everything is checked before
        either starts, so a bad request is refused with its status, never halfway through a stream."""
        self.check_model(body.model)
        items = self.prompts_of(body.prompt, "prompt")
        choices: list[Choice] = [(ids, text, r) for ids, text in items for r in self.engine_requests(body, ids)]
        for _, _, r in choices:
            self.engine.check(r)  # InvalidRequest: a 400 naming the field
        if not self.engine.alive:
            raise ApiError(503, f"the inference engine is not running ({self.engine.error!r})", "server_error")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(ids) for ids, _ in items)
        if body.stream:
            return self._stream(body, choices, prompt_tokens, cid, created)
        return await self._complete(body, choices, prompt_tokens, cid, created)

    async def _outputs(self, req: Request) -> AsyncIterator[Output]:
        """The engine's Outputs for `req`, reported to the observer; engine trouble becomes a 503."""
        last = None
        try:
            async for out in self.engine.stream(req):
                now = time.perf_counter()
                self.observer.on_output(out, None if last is None else now - last)
                last = now
                if out.error:
                    raise ApiError(503, out.error, "server_error")
                yield out
        except QueueFull as e:
            raise ApiError(503, f"server overloaded: {e}; retry later", "server_error") from None
        except EngineDead as e:
            raise ApiError(503, str(e), "server_error") from None

    async def _complete(
        self, body: CompletionRequest, choices: list[Choice], prompt_tokens: int, cid: str, created: int
    ) -> CompletionResponse:
        async def one(req: Request) -> list[Output]:
            return [o async for o in self._outputs(req)]

        tasks = [asyncio.ensure_future(one(r)) for _, _, r in choices]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # one choice failed (or the client went away): the others stop too, freeing their rows
            for t in tasks:
                t.cancel()
        answer, completion_tokens = [], 0
        for idx, ((ids, text, _), outs) in enumerate(zip(choices, results)):
            gen_ids = [t for o in outs for t in o.token_ids]
            gen_lp = [e for o in outs for e in (o.logprobs or [])]
            prompt_lp = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
            completion_tokens += len(gen_ids)
            answer.append(
                CompletionChoice(
                    index=idx,
                    text=(text if body.echo else "") + "".join(o.text for o in outs),
                    logprobs=self._logprobs(body, ids, text, prompt_lp, gen_lp, gen_ids, body.echo),
                    finish_reason=outs[-1].finish_reason,
                )
            )
        return CompletionResponse(
            id=cid,
            created=created,
            model=self.model_name,
            choices=answer,
            usage=UsageInfo(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    async def _stream(
        self, body: CompletionRequest, choices: list[Choice], prompt_tokens: int, cid: str, created: int
    ) -> AsyncIterator[str]:
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req: Request) -> None:
            try:
                async for out in self._outputs(req):
                    await q.put((i, out, None))
            except ApiError as e:
                await q.put((i, None, e))

        def chunk(parts: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return CompletionStreamChunk(
                id=cid, created=created, model=self.model_name, choices=parts, usage=usage
            ).sse()

        tasks = [asyncio.create_task(pump(i, r)) for i, (_, _, r) in enumerate(choices)]
        generated: dict[int, list[int]] = {i: [] for i in range(len(choices))}
        echoed: set[int] = set()
        remaining = len(choices)
        try:
            while remaining:
                # whatever is ready goes out together: when the client or the proxy lags behind the engine,
                # consecutive outputs of a choice are merged into one chunk instead of queueing up one per token
                ready = [await q.get()]
                while not q.empty():
                    ready.append(q.get_nowait())
                events: list[tuple[int, Output | None, ApiError | None]] = []
                mergeable: dict[int, int] = {}  # choice -> position in events of its latest output
                for i, out, err in ready:
                    j = mergeable.get(i)
                    if err is None and j is not None:
                        events[j] = (i, events[j][1].merged(out), None)
                    else:
                        events.append((i, out, err))
                        if err is None:
                            mergeable[i] = len(events) - 1
                        else:
                            mergeable.pop(i, None)
                for i, out, err in events:
                    if err is not None:
                        yield err.response().sse()
                        remaining -= 1
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
                        remaining -= 1
            if body.stream_options and body.stream_options.include_usage:
                ct = sum(len(v) for v in generated.values())
                yield chunk(
                    [], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=ct, total_tokens=prompt_tokens + ct)
                )
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:  # a client that went away: cancelling the pumps aborts their requests
                t.cancel()

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
