"""The API's structured-output fields as the engine's constraint (`neoxray.platform.inference.request.
StructuredOutput`, enforced by llguidance in `neoxray.platform.inference.structured`): OpenAI's `response_format`
(`json_object`, `json_schema`; `text` is none) and vLLM's `structured_outputs` (`json`, `regex`, `choice`,
`grammar`, `json_object`). A schema or pattern the grammar library cannot compile is refused by the engine on
intake with a 400 naming the field that sent it."""

from __future__ import annotations

import json

from neoxray.platform.inference.request import StructuredOutput
from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.protocol import ResponseFormat, StructuredOutputs


def structured_spec(
    response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None
) -> StructuredOutput | None:
    """The engine's constraint (None: none)."""
    if response_format is not None:
        if response_format.type == "json_object":
            return StructuredOutput.json_object("response_format")
        if response_format.type == "json_schema":
            return StructuredOutput.json_schema(response_format.json_schema.schema_, "response_format")
        return None
    s = structured_outputs
    if s is None:
        return None
    param = "structured_outputs"
    if s.json_ is not None:
        schema = s.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ApiError(400, f"structured_outputs.json is not valid JSON: {e}", param=param) from None
        if not isinstance(schema, dict):
            raise ApiError(400, "structured_outputs.json must be a JSON schema object", param=param)
        return StructuredOutput.json_schema(schema, param)
    if s.regex is not None:
        return StructuredOutput.regex(s.regex, param)
    if s.choice is not None:
        return StructuredOutput.choice(s.choice, param)
    if s.grammar is not None:
        return StructuredOutput.grammar(s.grammar, param)
    return StructuredOutput.json_object(param)
