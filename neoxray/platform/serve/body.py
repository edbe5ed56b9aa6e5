"""What every route of the HTTP API shares: reading a request's body (at most `max_request_bytes`: 413 beyond
it, refused from its Content-Length before anything is kept; the rest is read and dropped, within bounds, before
the answer goes out, so that a client still sending reads the 413 rather than a reset connection), parsing it as
JSON into its request model whatever the Content-Type says (on a worker thread when large; a bad body is a 400
naming the field), and writing the answer: a response model as `json.dumps` of all its fields (nulls included),
or server-sent events. `Routes` declares one API's routes on its own router this way."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from neoxray.platform.serve.api_errors import ApiError

PARSE_ON_LOOP_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop; larger ones on a worker thread."""
LINGER_BYTES = 64 * 1024 * 1024
"""The most of a body refused with 413 that is read (and dropped) before the answer (`_linger`)."""
LINGER_S = 10.0
"""The longest that reading the rest of a body refused with 413 may take before the answer goes out anyway."""


def json_response(body: BaseModel, status: int = 200) -> JSONResponse:
    """`body` as JSON, every field included (a null one too). Built here rather than by FastAPI's
    `response_model` serialisation (which routes only declare for the OpenAPI schema)."""
    return JSONResponse(body.model_dump(), status)


def _field_of(loc) -> str:
    """The request field an error is about: its top-level name (pydantic adds union branches after it)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return parts[0] if parts else "body"


def validation_error(errs: list) -> ApiError:
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
        raise validation_error(e.errors(include_url=False, include_input=False)) from None
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


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies."""
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


class Routes:
    """One API's routes on its own `router`, each a thin wrapper: read and parse the body, call the API's method,
    send back what it returns (a response model as JSON, or an async iterator of events as a stream)."""

    def __init__(self, max_request_bytes: int, tags: list[str]):
        self.router = APIRouter(tags=tags)
        self.max_request_bytes = max_request_bytes

    def get(self, path: str, answer: Callable[[], Awaitable[BaseModel]], response_model: type[BaseModel]) -> None:
        async def route():
            return json_response(await answer())

        self.router.get(path, response_model=response_model, name=answer.__name__)(route)

    def post(self, path: str, request_model: type[BaseModel], answer, response_model: type[BaseModel]) -> None:
        async def route(request: HTTPRequest):
            result = await answer(await read_body(request, request_model, self.max_request_bytes))
            return json_response(result) if isinstance(result, BaseModel) else sse_response(result)

        self.router.post(path, response_model=response_model, name=answer.__name__)(route)
