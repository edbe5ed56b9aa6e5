"""OpenAI's chat completions shapes (POST /v1/chat/completions): the request, the whole answer and the streamed
chunks. The sampling fields are the completions route's (`neoxray.platform.serve.protocol.SamplingRequest`);
unknown fields are refused (400 naming the field), and what this server does not do (tools, audio, images) is
refused in one line rather than ignored."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from neoxray.platform.serve.protocol import SamplingRequest, UsageInfo


class TextPart(BaseModel):
    """One part of a message's content: only text parts are served."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn: a system (or developer) instruction, the user's message or the assistant's answer."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    """Text, or a list of text parts (joined by the template as it chooses); None only for an assistant turn."""
    name: str | None = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    """New tokens at most (None: up to the context length). Deprecated by OpenAI for max_completion_tokens."""
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """New tokens at most; wins over max_tokens."""
    logprobs: StrictBool = False
    """Log-probabilities of the answer's tokens."""
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    """With logprobs: this many most likely alternatives at each position."""
    add_generation_prompt: StrictBool = True
    """Extension (as in vLLM): end the prompt with the template's opening of an assistant turn."""
    chat_template_kwargs: dict | None = None
    """Extension (as in vLLM): extra variables for the chat template."""
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools: tool calling is not supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict]:
        """The messages as the template sees them (text parts kept as parts, nulls left out)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]


# -------------------------------------------------------------------------------------------------- responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(BaseModel):
    """One token of the answer: its log-probability and the most likely alternatives at its position."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    """'stop' (the end of the turn, a stop string, or a finished constraint) or 'length'."""


class ChatCompletionResponse(BaseModel):
    """The answer to a POST /v1/chat/completions that is not streamed."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion: the first of each choice carries the role; with
    `stream_options.include_usage` every chunk has `usage` (null but on the last, whose choices are empty)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    with_usage: StrictBool = Field(False, exclude=True)

    def sse(self) -> str:
        body = self.model_dump(exclude=None if self.with_usage else {"usage"})
        for choice in body["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return f"data: {json.dumps(body)}\n\n"
