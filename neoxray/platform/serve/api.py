"""The HTTP API over one inference engine: OpenAI's completions, models and embeddings, plus vLLM-style
/tokenize, /detokenize and /tokenizer_info, and /health. A FastAPI app: Ray Serve hosts it in each replica
(`neoxray.platform.serve.app`), and `neoxray serve --no-ray` runs it under uvicorn alone.

Thin: each route hands its parsed request (`neoxray.platform.serve.protocol`) to `OpenAIServing`
(`neoxray.platform.serve.serving`) and sends back the response model it returns, as `json.dumps` of all its
fields (nulls included). Here are only the app's lifespan (engine stats to the observer; a graceful drain on
shutdown), the bearer-token check, and the error handlers.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (the
message and `param` name the field), 401 for a missing or wrong API key, 404 for an unknown model, 503 when
the engine's queue is full or the engine has stopped. User input never reaches a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from neoxray.platform.serve.engine import InferenceEngine
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
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from neoxray.platform.serve.request import InvalidRequest
from neoxray.platform.serve.serving import ApiError, OpenAIServing, ServeObserver


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return _json(ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)), status)


def _json(body: BaseModel, status: int = 200) -> JSONResponse:
    """`body` as JSON, every field included (a null one too). Built here rather than by FastAPI's
    `response_model` serialisation (which routes only declare for the OpenAPI schema)."""
    return JSONResponse(body.model_dump(), status)


def _field_of(loc) -> str:
    """The request field an error is about: its top-level name (pydantic adds union branches after it)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return parts[0] if parts else "body"


def create_app(
    engine: InferenceEngine,
    model_name: str | None = None,
    api_key: str | None = None,
    observer: ServeObserver | None = None,
    stats_period_s: float = 1.0,
    shutdown_timeout_s: float | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (whose background thread must be running). With
    `shutdown_timeout_s`, the app's shutdown drains the engine (finishing running requests for up to that
    long) and stops it: a replica going away lets its requests finish."""
    serving = OpenAIServing(engine, model_name, observer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def poll():
            while True:
                with contextlib.suppress(Exception):
                    serving.observer.on_stats(engine.stats())
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
        return _json(exc.response(), exc.status)

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

    # -- routes ----------------------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthResponse)
    async def health():
        return _json(serving.health())

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return _json(serving.models())

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info():
        return _json(serving.tokenizer_info())

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest):
        return _json(serving.tokenize(body))

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest):
        return _json(serving.detokenize(body))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest):
        return _json(await serving.embeddings(body))

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest):
        result = await serving.create_completion(body)
        if isinstance(result, CompletionResponse):
            return _json(result)
        return StreamingResponse(
            result, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


def run_standalone(
    engine: InferenceEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
) -> None:
    """Serve one engine with uvicorn in this process (no Ray): for a single machine, and for GPU hosts where
    Ray is not installed."""
    import uvicorn

    engine.start()
    try:
        uvicorn.run(create_app(engine, model_name, api_key), host=host, port=port, log_level="warning")
    finally:
        engine.stop(timeout=30)
