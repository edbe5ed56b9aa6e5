"""The HTTP API: OpenAI's completions, models and embeddings, plus vLLM-style /tokenize, /detokenize,
/tokenizer_info and /v1/load_lora_adapter, /v1/unload_lora_adapter, and /health. A FastAPI app over an engine
client (`neoxray.platform.serve.client`): the Ray Serve application's ingress hosts it over the model deployment
(`neoxray.platform.serve.app`), and `neoxray serve --no-ray` runs it under uvicorn over an engine in the same
process.

Thin: each route reads its body, parses it into its request model (`neoxray.platform.serve.protocol`), hands it
to `OpenAIServing` (`neoxray.platform.serve.serving`) and sends back the response model it returns, as
`json.dumps` of all its fields (nulls included). Here are only the body's reading and parsing, the bearer-token
check, and the error handlers (what each refusal becomes: `neoxray.platform.serve.serving.ApiError.of`).

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

from neoxray.platform.inference.request import AdapterBusy, InvalidRequest
from neoxray.platform.serve.args import ServeArgs
from neoxray.platform.serve.client import EngineClient, LocalEngineClient, NotAllowed
from neoxray.platform.serve.protocol import (
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
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


def error_response(e: ApiError) -> JSONResponse:
    """A refusal as OpenAI writes it (with Retry-After, in whole seconds, when it helps)."""
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
    return JSONResponse(e.response().model_dump(), e.status, headers=headers)


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


def create_app(engine, args: ServeArgs) -> FastAPI:
    """The FastAPI app serving `engine` as `args` say (the model's name, the API key, the request limits, whether
    adapters may change at run time and from where): `engine` is an `EngineClient`, or an `InferenceEngine` in
    this process (whose background thread must be running)."""
    client = engine if isinstance(engine, EngineClient) else LocalEngineClient(engine, None, args.allowed_lora_path)
    limits = args.limits()
    serving = OpenAIServing(client, args.name, limits, lora_updates_refused=args.lora_updates_refused())
    app = FastAPI(title="neoxray", description="OpenAI-compatible GPT-NeoX inference")
    _add_error_handlers(app)
    if args.api_key:
        _add_auth(app, args.api_key)
    _add_routes(app, serving, limits.max_request_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(request, exc: Exception):  # a bad request, a refusal of the engine's, nobody to serve it,
        return error_response(ApiError.of(exc))  # or a bug (500): every answer in OpenAI's shape

    for kind in (ApiError, InvalidRequest, AdapterBusy, NotAllowed, *UNAVAILABLE, Exception):
        app.add_exception_handler(kind, refused)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_response(_validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):  # unknown routes (404), wrong methods (405)
        if exc.status_code == 404:
            msg, code = f"no route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        response = error_response(ApiError(exc.status_code, msg, code=code))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response


def _add_auth(app: FastAPI, api_key: str) -> None:
    """Every route but /health needs `Authorization: Bearer <api_key>` (401 otherwise)."""

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if request.url.path != "/health":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error_response(
                    ApiError(
                        401,
                        "missing or invalid API key (send 'Authorization: Bearer <key>')",
                        "authentication_error",
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)


def _add_routes(app: FastAPI, serving: OpenAIServing, max_request_bytes: int) -> None:
    def get(path: str, answer, response_model: type[BaseModel]) -> None:
        async def route():
            return _json(await answer())

        app.get(path, response_model=response_model, name=answer.__name__)(route)

    def post(path: str, request_model: type[BaseModel], answer, response_model: type[BaseModel]) -> None:
        async def route(request: HTTPRequest):
            return _json(await answer(await read_body(request, request_model, max_request_bytes)))

        app.post(path, response_model=response_model, name=answer.__name__)(route)

    get("/health", serving.health, HealthResponse)
    get("/v1/models", serving.models, ModelList)
    get("/tokenizer_info", serving.tokenizer_info, TokenizerInfo)
    post("/tokenize", TokenizeRequest, serving.tokenize, TokenizeResponse)
    post("/detokenize", DetokenizeRequest, serving.detokenize, DetokenizeResponse)
    post("/v1/embeddings", EmbeddingRequest, serving.embeddings, EmbeddingResponse)
    post("/v1/load_lora_adapter", LoadLoRAAdapterRequest, serving.load_lora_adapter, LoRAAdapterResponse)
    post("/v1/unload_lora_adapter", UnloadLoRAAdapterRequest, serving.unload_lora_adapter, LoRAAdapterResponse)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: HTTPRequest):
        result = await serving.create_completion(await read_body(request, CompletionRequest, max_request_bytes))
        if isinstance(result, CompletionResponse):
            return _json(result)
        return StreamingResponse(
            result, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
