"""The HTTP API: OpenAI's completions, models and embeddings, plus vLLM-style /tokenize, /detokenize,
/tokenizer_info and /v1/load_lora_adapter, /v1/unload_lora_adapter, and /health. A FastAPI app over an engine
client (`neoxray.platform.serve.client`): the Ray Serve application's ingress hosts it over the model deployment
(`neoxray.platform.serve.app`), and `neoxray serve --no-ray` runs it under uvicorn over an engine in the same
process.

Thin: each route reads its body, parses it into its request model (`neoxray.platform.serve.protocol`), hands it
to `OpenAIServing` (`neoxray.platform.serve.serving`) and sends back the response model it returns, as
`json.dumps` of all its fields (nulls included). Here are only the body's reading and parsing, the bearer-token
check, the error handlers, and (over an in-process engine) the app's lifespan: engine stats to the observer and
a graceful drain on shutdown.

Bodies are read by the routes themselves, not by FastAPI: at most `max_request_bytes` (413 beyond it, refused
from its Content-Length before anything is kept; the rest is read and dropped, within bounds, before the answer
goes out, so that a client still sending reads the 413 rather than a reset connection), as JSON whatever the
Content-Type says (a request without one included), parsed on a worker thread when large.

Every answer that is not a success has OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for
a bad request (the message and `param` name the field; a body that is not UTF-8, not JSON or nested too deeply;
a bad LoRA adapter directory), 401 for a missing or wrong API key, 403 for what the server's settings forbid
(runtime LoRA adapter changes without a key, an adapter directory outside the allowed one), 404 for an unknown
model (or LoRA adapter) or route, 405 for a wrong method, 409 for a LoRA adapter in use (or no idle slot to load
one into), 413 for a body that is too large, 503 (with Retry-After) when no engine can take the request. User
input never reaches a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from neoxray.platform.inference.request import AdapterBusy, InvalidRequest, UnknownAdapter
from neoxray.platform.serve.args import ServeArgs
from neoxray.platform.serve.client import EngineClient, LocalEngineClient, NotAllowed, ServeObserver
from neoxray.platform.serve.protocol import (
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorInfo,
    ErrorResponse,
    HealthResponse,
    LoadLoRAAdapterRequest,
    LoRAAdapterResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    UnloadLoRAAdapterRequest,
)
from neoxray.platform.serve.serving import UNAVAILABLE, ApiError, OpenAIServing

PARSE_ON_LOOP_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop; larger ones on a worker thread."""
LINGER_BYTES = 64 * 1024 * 1024
"""The most of a body refused with 413 that is read (and dropped) before the answer (`_linger`)."""
LINGER_S = 10.0
"""The longest that reading the rest of a body refused with 413 may take before the answer goes out anyway."""


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    retry_after_s: float | None = None,
) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogate reaches the encoder
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status, headers=headers)


def _json(body: BaseModel, status: int = 200) -> JSONResponse:
    """`body` as JSON, every field included (a null one too). Built here rather than by FastAPI's
    `response_model` serialisation (which routes only declare for the OpenAPI schema)."""
    return JSONResponse(body.model_dump(), status)


def _field_of(loc) -> str:
    """The request field an error is about: its top-level name (pydantic adds union branches after it)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return parts[0] if parts else "body"


def _validation_error(errs: list) -> ApiError:
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
    field = _field_of(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        field = "body"
    elif first.get("type") == "extra_forbidden":
        msg = f"unknown field {field!r}"
    elif field == "body":
        msg = f"request body: {first.get('msg')}"
    else:
        msg = f"{field}: {first.get('msg')}"
    return ApiError(400, msg, param=field)


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body -> `model`, or an ApiError (400) saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})", param="body") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", param="body") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply", param="body") from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False, include_input=False)) from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", param="body") from None


async def read_body(request: HTTPRequest, model: type[BaseModel], limit: int) -> BaseModel:
    """Read at most `limit` bytes of the request's body (413 beyond it) and parse it as JSON into `model`,
    whatever its Content-Type."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _linger(request, request.stream(), int(declared))
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _linger(request, stream, None)
            raise _too_large(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) <= PARSE_ON_LOOP_BYTES:
        return parse_body(raw, model)
    return await asyncio.get_running_loop().run_in_executor(None, parse_body, raw, model)


async def _linger(request: HTTPRequest, rest: AsyncIterator[bytes], left: int | None) -> None:
    """Read and drop the rest of a body refused with 413 (`left` bytes of it, or as many as come), as nginx's
    lingering close does: a client that writes its whole body before it reads the answer (urllib, with
    `Connection: close`) then reads the 413, where closing on unread data would reset its connection. Bounded:
    at most LINGER_BYTES in LINGER_S; a body declared longer is not read at all, nor one whose client waits for
    `100 Continue` (asking for more of it would send that)."""
    if (left is not None and left > LINGER_BYTES) or request.headers.get("expect", "").lower() == "100-continue":
        return
    read = 0
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(LINGER_S):
            async for chunk in rest:
                read += len(chunk)
                if read > LINGER_BYTES:
                    return


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is {size} bytes or more; at most {limit} bytes are accepted",
        param="body",
        code="request_too_large",
    )


def create_app(
    engine,
    args: ServeArgs,
    observer: ServeObserver | None = None,
    stats_period_s: float = 1.0,
    shutdown_timeout_s: float | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` as `args` say (the model's name, the API key, the request limits, whether
    adapters may change at run time and from where): `engine` is an `EngineClient`, or an `InferenceEngine` in
    this process (whose background thread must be running). Over an in-process engine, the app reports its stats
    to `observer`, and with `shutdown_timeout_s` its shutdown drains the engine (finishing running requests for
    up to that long) and stops it."""
    if isinstance(engine, EngineClient):
        client = engine
    else:
        client = LocalEngineClient(engine, observer, args.allowed_lora_path)
    limits = args.limits()
    api_key = args.api_key
    serving = OpenAIServing(client, args.name, limits, lora_updates_refused=args.lora_updates_refused())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not isinstance(client, LocalEngineClient):
            yield
            return

        async def poll():
            while True:
                with contextlib.suppress(Exception):
                    client.observer.on_stats(client.engine.stats())
                await asyncio.sleep(stats_period_s)

        task = asyncio.create_task(poll())
        yield
        task.cancel()
        if shutdown_timeout_s is not None:
            await asyncio.get_running_loop().run_in_executor(None, client.engine.stop, shutdown_timeout_s)

    app = FastAPI(title="neoxray", description="OpenAI-compatible GPT-NeoX inference", lifespan=lifespan)

    # -- errors ----------------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _api_error(request, _validation_error(exc.errors()))

    @app.exception_handler(InvalidRequest)
    async def _engine_refused(request, exc: InvalidRequest):
        return error_response(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(UnknownAdapter)
    async def _unknown_model(request, exc: UnknownAdapter):
        return error_response(404, str(exc), "invalid_request_error", exc.param, "model_not_found")

    @app.exception_handler(NotAllowed)
    async def _not_allowed(request, exc: NotAllowed):
        return error_response(403, str(exc), "permission_error", exc.param, exc.code)

    @app.exception_handler(AdapterBusy)
    async def _adapter_busy(request, exc: AdapterBusy):
        return error_response(409, str(exc), "invalid_request_error", "lora_name", "adapter_busy")

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.retry_after_s)

    for kind in UNAVAILABLE:

        @app.exception_handler(kind)
        async def _unavailable(request, exc):
            return _api_error(request, ApiError.unavailable(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):  # unknown routes (404), wrong methods (405)
        if exc.status_code == 404:
            msg, code = f"no route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        response = error_response(exc.status_code, msg, "invalid_request_error", None, code)
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a bug, not user input: still an OpenAI-shaped answer
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error_response(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    "authentication_error",
                    None,
                    "invalid_api_key",
                )
        return await call_next(request)

    async def body_of(request: HTTPRequest, model: type[BaseModel]):
        return await read_body(request, model, limits.max_request_bytes)

    # -- routes ----------------------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthResponse)
    async def health():
        return _json(await serving.health())

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return _json(await serving.models())

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info():
        return _json(await serving.tokenizer_info())

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: HTTPRequest):
        return _json(await serving.tokenize(await body_of(request, TokenizeRequest)))

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: HTTPRequest):
        return _json(await serving.detokenize(await body_of(request, DetokenizeRequest)))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(request: HTTPRequest):
        return _json(await serving.embeddings(await body_of(request, EmbeddingRequest)))

    @app.post("/v1/load_lora_adapter", response_model=LoRAAdapterResponse)
    async def load_lora_adapter(request: HTTPRequest):
        return _json(await serving.load_lora_adapter(await body_of(request, LoadLoRAAdapterRequest)))

    @app.post("/v1/unload_lora_adapter", response_model=LoRAAdapterResponse)
    async def unload_lora_adapter(request: HTTPRequest):
        return _json(await serving.unload_lora_adapter(await body_of(request, UnloadLoRAAdapterRequest)))

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: HTTPRequest):
        result = await serving.create_completion(await body_of(request, CompletionRequest))
        if isinstance(result, CompletionResponse):
            return _json(result)
        return StreamingResponse(
            result, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


def run_standalone(engine, args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve one engine with uvicorn in this process (no Ray): for a single machine, and for GPU hosts where
    Ray is not installed."""
    import uvicorn

    engine.start()
    try:
        uvicorn.run(create_app(engine, args), host=host, port=port, log_level="warning")
    finally:
        engine.stop(timeout=30)
