"""The HTTP API: OpenAI's completions, chat completions, models and embeddings, plus vLLM-style /tokenize,
/detokenize, /tokenizer_info and /v1/load_lora_adapter, /v1/unload_lora_adapter, /health, and a page to try it
(GET /). A FastAPI app over an engine client (`neoxray.platform.serve.client`): the Ray Serve application's ingress
hosts it over the model deployment (`neoxray.platform.serve.app`), and `neoxray serve --no-ray` runs it under
uvicorn over an engine in the same process.

`create_app` only assembles: one shared request context (`neoxray.platform.serve.context.ServingContext`), one
class per API, each declaring its routes on its own router (`neoxray.platform.serve.body.Routes`: the body read
with a limit and parsed into the request model, the answer sent back as JSON or server-sent events), the API key
as one middleware, and the error handlers.

Every answer that is not a success has OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for
a bad request (the message and `param` name the field; a body that is not UTF-8, not JSON or nested too deeply;
a bad LoRA adapter directory; a chat template that raises or a model without one), 401 for a missing or wrong
API key, 403 for what the server's settings forbid (runtime LoRA adapter changes without a key, an adapter
directory outside the allowed one), 404 for an unknown model (or LoRA adapter) or route, 405 for a wrong method,
409 for a LoRA adapter in use (or no idle slot to load one into), 413 for a body that is too large, 503 (with
Retry-After) when no engine can take the request. User input never reaches a 500.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from neoxray.platform.inference.request import AdapterBusy, InvalidRequest
from neoxray.platform.serve import page
from neoxray.platform.serve.api_errors import UNAVAILABLE, ApiError, error_response
from neoxray.platform.serve.args import ServeArgs
from neoxray.platform.serve.body import Routes, validation_error
from neoxray.platform.serve.client import EngineClient, LocalEngineClient, NotAllowed
from neoxray.platform.serve.context import ServingContext
from neoxray.platform.serve.lora_serving import AdapterServing
from neoxray.platform.serve.serving_chat import ChatServing
from neoxray.platform.serve.serving_completion import CompletionServing
from neoxray.platform.serve.serving_embedding import EmbeddingServing
from neoxray.platform.serve.serving_models import ModelServing
from neoxray.platform.serve.serving_tokenization import TokenizationServing

APIS = (CompletionServing, ChatServing, EmbeddingServing, TokenizationServing, ModelServing, AdapterServing)
"""Each API of the server: a class over the shared request context, with its own routes."""
OPEN_ROUTES = frozenset((method, path) for method in ("GET", "HEAD") for path in ("/health", "/"))
"""What answers without the API key: the health check, and the page (whose API calls carry the key)."""


def create_app(engine, args: ServeArgs) -> FastAPI:
    """The FastAPI app serving `engine` as `args` say (the model's name, the API key, the request limits, the
    chat template, whether adapters may change at run time and from where): `engine` is an `EngineClient` (which
    knows the model's own chat template), or an `InferenceEngine` in this process (whose background thread must
    be running; then only `args.chat_template` serves chat)."""
    client = engine if isinstance(engine, EngineClient) else LocalEngineClient(engine, None, args.allowed_lora_path)
    limits = args.limits()
    ctx = ServingContext(
        client,
        args.name,
        limits,
        lora_updates_refused=args.lora_updates_refused(),
        chat_template=args.server_chat_template(),
    )
    app = FastAPI(title="neoxray", description="OpenAI-compatible GPT-NeoX inference")
    _add_error_handlers(app)
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    for api in APIS:
        app.include_router(api(ctx).routes(Routes(limits.max_request_bytes, [api.__name__])).router)
    app.include_router(page.router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(request, exc: Exception):  # a bad request, a refusal of the engine's, nobody to serve it,
        return error_response(ApiError.of(exc))  # or a bug (500): every answer in OpenAI's shape

    for kind in (ApiError, InvalidRequest, AdapterBusy, NotAllowed, *UNAVAILABLE, Exception):
        app.add_exception_handler(kind, refused)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_response(validation_error(exc.errors()))

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


class ApiKeyMiddleware:
    """Every route but OPEN_ROUTES needs `Authorization: Bearer <api_key>` (401 otherwise), checked in constant
    time before the route reads anything."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        refusal = ApiError(
            401,
            "missing or invalid API key (send 'Authorization: Bearer <key>')",
            "authentication_error",
            code="invalid_api_key",
        )
        await error_response(refusal)(scope, receive, send)
