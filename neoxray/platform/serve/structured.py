"""The API's structured-output fields -> the engine's constraint: OpenAI's `response_format` (json_object,
json_schema) and vLLM's `structured_outputs` (json, regex, choice, json_object)."""

from __future__ import annotations

from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.protocol import ResponseFormat, StructuredOutputs


def structured_spec(response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None):
    """The engine's constraint (None: none)."""
    if (response_format is None or response_format.type == "text") and structured_outputs is None:
        return None
    param = "response_format" if response_format is not None else "structured_outputs"
    raise ApiError(400, f"{param} is not supported yet", param=param)
