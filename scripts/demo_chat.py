"""The demo's last requests, through the openai client as any OpenAI application would make them: a streamed chat
completion with the chat adapter, then an answer held to a JSON schema, parsed and validated.

    python scripts/demo_chat.py http://127.0.0.1:8000/v1 chat
"""

from __future__ import annotations

import json
import sys

import jsonschema
from openai import OpenAI

SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 24},
        "steps": {"type": "integer", "minimum": 1, "maximum": 10},
        "hard": {"type": "boolean"},
    },
    "required": ["topic", "steps", "hard"],
    "additionalProperties": False,
}


def main(base_url: str, model: str) -> None:
    client = OpenAI(base_url=base_url, api_key="none")  # the demo's server has no key
    messages = [{"role": "user", "content": "How do I water a cactus?"}]
    print(f"chat.completions.create(model={model!r}, stream=True): ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, max_completion_tokens=40, temperature=0.7, seed=0
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe the task of watering a cactus as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "task", "schema": SCHEMA, "strict": True}},
        max_completion_tokens=80,
        seed=0,
    )
    text = answer.choices[0].message.content
    parsed = json.loads(text)
    jsonschema.validate(parsed, SCHEMA)
    print(f"response_format json_schema -> {text}  (parses, and validates against the schema)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
