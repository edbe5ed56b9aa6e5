"""The HTTP API over one inference engine: OpenAI's completions, models and embeddings, plus vLLM-style
/tokenize, /detokenize and /tokenizer_info, and /health. A FastAPI app: Ray Serve hosts it in each replica
(`neoxray.platform.serve.app`), and `neoxray serve --no-ray` runs it under uvicorn alone.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (the
message and `param` name the field), 401 for a missing or wrong API key, 404 for an unknown model, 503 when
the engine's queue is full or the engine has stopped. User input never reaches a 500.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
import uuid
from functools import lru_cache
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from neoxray.model.decoding import SamplingParams
from neoxray.platform.serve.engine import (EngineDead, InferenceEngine, InvalidRequest, Output, QueueFull,
                                           Request, TokenLogprob)
from neoxray.platform.serve.protocol import (CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                             TokenizeRequest)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class ServeObserver:
    """Hooks for metrics (`neoxray.platform.serve.metrics.RayServeMetrics` records them as Ray metrics)."""

    def on_output(self, out: Output, since_previous_s: float | None) -> None:
        """Each Output of each request; since_previous_s is the gap after the previous one (None for the first)."""

    def on_stats(self, stats: dict) -> None:
        """The engine's stats(), about once a second."""


def _field_of(loc) -> str:
    """The request field an error is about: its top-level name (pydantic adds union branches after it)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return parts[0] if parts else "body"


def create_app(engine: InferenceEngine, model_name: str | None = None, api_key: str | None = None,
               observer: ServeObserver | None = None, stats_period_s: float = 1.0,
               shutdown_timeout_s: float | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (whose background thread must be running). With
    `shutdown_timeout_s`, the app's shutdown drains the engine (finishing running requests for up to that
    long) and stops it: a replica going away lets its requests finish."""
    name = model_name or engine.model_name
    tok = engine.tokenizer
    observer = observer or ServeObserver()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def poll():
            while True:
                with contextlib.suppress(Exception):
                    observer.on_stats(engine.stats())
                await asyncio.sleep(stats_period_s)

        task = asyncio.create_task(poll())
        yield
        task.cancel()
        if shutdown_timeout_s is not None:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop, shutdown_timeout_s)

    app = FastAPI(title="neoxray", description="OpenAI-compatible GPT-NeoX inference", lifespan=lifespan)

    # -- errors ----------------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        field = _field_of(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            field = "body"
        elif first.get("type") == "extra_forbidden":
            msg = f"unknown field {field!r}"
        else:
            msg = f"{field}: {first.get('msg')}"
        return error_response(400, msg, "invalid_request_error", field)

    @app.exception_handler(InvalidRequest)
    async def _engine_refused(request, exc: InvalidRequest):
        return error_response(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a bug, not user input: still an OpenAI-shaped answer
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                      "authentication_error", None, "invalid_api_key")
        return await call_next(request)

    # -- helpers ---------------------------------------------------------------------------------------------
    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def prompts_of(prompt, field: str) -> list[tuple[list[int], str]]:
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
                ids = tok.encode(item)
                text = item
            else:
                ids = list(item)
                engine.check_token_ids(ids, field)
                text = tok.decode(ids)
            if not ids:
                raise ApiError(400, f"{field} is empty (it encodes to no tokens)", param=field)
            out.append((ids, text))
        return out

    @lru_cache(maxsize=65536)
    def token_str(t: int) -> str:
        return tok.decode([t])

    def lp_entry(e: TokenLogprob) -> tuple[str, float | None, dict | None]:
        if e.logprob is None:
            return token_str(e.token_id), None, None
        top = {token_str(t): lp for t, lp in e.top}
        top.setdefault(token_str(e.token_id), e.logprob)
        return token_str(e.token_id), e.logprob, top

    def offsets(ids: list[int], base: int) -> list[int]:
        """Character offset of each token of `ids` in text that starts at `base`."""
        prefixes = tok.backend.decode_batch([ids[:i] for i in range(len(ids))], skip_special_tokens=False)
        return [base + len(p) for p in prefixes]

    def engine_requests(body: CompletionRequest, ids: list[int]) -> list[Request]:
        max_tokens = body.max_tokens if body.max_tokens is not None else max(0, engine.max_seq_len - len(ids))
        reqs = []
        for j in range(body.n):
            sampling = SamplingParams(
                temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                greedy=body.temperature == 0.0, seed=None if body.seed is None else body.seed + j,
                stop=body.stops, stop_at_eod=not body.ignore_eos)
            reqs.append(Request(ids, max_tokens=max_tokens, sampling=sampling, logprobs=body.logprobs,
                                prompt_logprobs=body.echo and body.logprobs is not None))
        return reqs

    def checked(reqs: list[Request]) -> None:
        for r in reqs:
            engine.check(r)  # InvalidRequest -> 400 naming the field (handler above)
        if not engine.alive:
            raise ApiError(503, f"the inference engine is not running ({engine.error!r})", "server_error")

    async def outputs(req: Request) -> AsyncIterator[Output]:
        last = None
        try:
            async for out in engine.stream(req):
                now = time.perf_counter()
                observer.on_output(out, None if last is None else now - last)
                last = now
                if out.error:
                    raise ApiError(503, out.error, "server_error")
                yield out
        except QueueFull as e:
            raise ApiError(503, f"server overloaded: {e}; retry later", "server_error") from None
        except EngineDead as e:
            raise ApiError(503, str(e), "server_error") from None

    def logprobs_block(body, ids, prompt_text, prompt_lp, gen_lp, gen_ids, echo_prompt: bool) -> dict | None:
        if body.logprobs is None:
            return None
        entries = (list(prompt_lp or []) if echo_prompt else []) + list(gen_lp)
        toks, lps, tops = [], [], []
        for e in entries:
            s, lp, top = lp_entry(e)
            toks.append(s)
            lps.append(lp)
            tops.append(top)
        offs = (offsets(ids, 0) if echo_prompt else []) + offsets(gen_ids, len(prompt_text))
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs[:len(toks)]}

    # -- routes ----------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, f"the inference engine is not running ({engine.error!r})", "server_error")
        return {"status": "ok", "model": name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "neoxray", "max_model_len": engine.max_seq_len}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eod = tok.decode([engine.eod_id])
        return {"eos_token": eod, "bos_token": eod, "pad_token": tok.decode([tok.pad_id]),
                "model_max_length": engine.max_seq_len, "tokenizer_class": "GPTNeoXTokenizer",
                "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        ids = tok.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise ApiError(400, f"tokens has ids outside the vocabulary [0, {tok.vocab_size}): {bad[:5]}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        items = prompts_of(body.input, "input")
        for ids, _ in items:
            if len(ids) > engine.max_seq_len:
                raise ApiError(400, f"input has {len(ids)} tokens; the model's context is {engine.max_seq_len}",
                               param="input")
        if not engine.alive:
            raise ApiError(503, "the inference engine is not running", "server_error")
        vectors = await engine.run_on_engine(lambda: engine.embed([ids for ids, _ in items]))
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                import numpy as np

                v = base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": v})
        n = sum(len(ids) for ids, _ in items)
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        items = prompts_of(body.prompt, "prompt")
        per_prompt = [engine_requests(body, ids) for ids, _ in items]
        checked([r for reqs in per_prompt for r in reqs])
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(stream_completion(body, items, per_prompt, cid, created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def one(req: Request) -> list[Output]:
            return [o async for o in outputs(req)]

        tasks = [asyncio.ensure_future(one(r)) for reqs in per_prompt for r in reqs]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # one choice failed (or the client went away): the others stop too, freeing their rows
            for t in tasks:
                t.cancel()
        choices, completion_tokens = [], 0
        for idx, ((ids, text), outs) in enumerate(zip([it for it in items for _ in range(body.n)], results)):
            gen_text = "".join(o.text for o in outs)
            gen_ids = [t for o in outs for t in o.token_ids]
            gen_lp = [e for o in outs for e in (o.logprobs or [])]
            prompt_lp = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
            completion_tokens += len(gen_ids)
            choices.append({
                "index": idx,
                "text": (text if body.echo else "") + gen_text,
                "logprobs": logprobs_block(body, ids, text, prompt_lp, gen_lp, gen_ids, body.echo),
                "finish_reason": outs[-1].finish_reason,
            })
        prompt_tokens = sum(len(ids) for ids, _ in items)
        return {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def stream_completion(body, items, per_prompt, cid, created) -> AsyncIterator[str]:
        q: asyncio.Queue = asyncio.Queue()
        flat = [(i, ids, text, r) for i, ((ids, text), r) in
                enumerate(zip([it for it in items for _ in range(body.n)], [r for reqs in per_prompt for r in reqs]))]

        async def pump(i, req):
            try:
                async for out in outputs(req):
                    await q.put((i, out, None))
            except ApiError as e:
                await q.put((i, None, e))

        def chunk(choices, usage=None) -> str:
            obj = {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        tasks = [asyncio.create_task(pump(i, r)) for i, _, _, r in flat]
        generated = {i: [] for i, *_ in flat}
        echoed: set[int] = set()
        remaining = len(flat)
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
                        events[j] = (i, _merge(events[j][1], out), None)
                    else:
                        events.append((i, out, err))
                        if err is None:
                            mergeable[i] = len(events) - 1
                        else:
                            mergeable.pop(i, None)
                for i, out, err in events:
                    if err is not None:
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'param': err.param, 'code': err.code}})}\n\n"
                        remaining -= 1
                        continue
                    _, ids, text, _ = flat[i]
                    echo_now = body.echo and i not in echoed
                    echoed.add(i)
                    lp = logprobs_block(body, ids, text, out.prompt_logprobs, out.logprobs or [],
                                        out.token_ids, echo_now) if body.logprobs is not None else None
                    if lp is not None and not echo_now and generated[i]:  # offsets continue after earlier tokens
                        lp["text_offset"] = offsets(generated[i] + out.token_ids, len(text))[len(generated[i]):]
                    generated[i].extend(out.token_ids)
                    piece = (text if echo_now else "") + out.text
                    if piece or lp or out.finish_reason:
                        yield chunk([{"index": i, "text": piece, "logprobs": lp, "finish_reason": out.finish_reason}])
                    if out.finish_reason is not None:
                        remaining -= 1
            if body.stream_options and body.stream_options.include_usage:
                pt = sum(len(ids) for ids, _ in items)
                ct = sum(len(v) for v in generated.values())
                yield chunk([], {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:  # a client that went away: cancelling the pumps aborts their requests
                t.cancel()

    return app


def _merge(a: Output, b: Output) -> Output:
    """One Output covering a then b (same request)."""
    return Output(
        request_id=a.request_id, token_ids=a.token_ids + b.token_ids, text=a.text + b.text,
        logprobs=None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or []),
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        finish_reason=b.finish_reason, prompt_tokens=b.prompt_tokens, generated_tokens=b.generated_tokens,
        error=a.error or b.error, time_to_first_token_s=a.time_to_first_token_s or b.time_to_first_token_s,
        latency_s=b.latency_s)


def run_standalone(engine: InferenceEngine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                   model_name: str | None = None) -> None:
    """Serve one engine with uvicorn in this process (no Ray): for a single machine, and for GPU hosts where
    Ray is not installed."""
    import uvicorn

    engine.start()
    try:
        uvicorn.run(create_app(engine, model_name, api_key), host=host, port=port, log_level="warning")
    finally:
        engine.stop(timeout=30)

