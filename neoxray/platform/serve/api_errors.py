"""Refusals of the HTTP API: `ApiError` is an HTTP status with OpenAI's error fields, and `ApiError.of` says what
the engine's and the engine client's exceptions become (400 naming the field, 403, 404, 409, 503 with Retry-After,
and 500 for a bug: user input never reaches one). `error_response` writes one as OpenAI does."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from neoxray.platform.inference.request import AdapterBusy, EngineDead, InvalidRequest, QueueFull, UnknownAdapter
from neoxray.platform.serve.client import EngineUnavailable, NotAllowed
from neoxray.platform.serve.protocol import ErrorInfo, ErrorResponse

UNAVAILABLE = (QueueFull, EngineDead, EngineUnavailable)
"""What an engine client raises when no engine can serve a request now: 503."""


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


def error_response(e: ApiError) -> JSONResponse:
    """A refusal as OpenAI writes it (with Retry-After, in whole seconds, when it helps)."""
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
    return JSONResponse(e.response().model_dump(), e.status, headers=headers)
