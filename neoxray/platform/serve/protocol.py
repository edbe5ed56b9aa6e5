"""OpenAI-compatible request and response shapes (pydantic), plus the vLLM-style tokenizer endpoints that
lm-evaluation-harness's `local-completions` model uses. Unknown request fields are rejected (400 naming the
field); OpenAI fields that this server does not implement are accepted only at their neutral value. Every
answer of the API, errors included, is one of the response models here."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

Prompt = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    """Send a last chunk with token usage before `data: [DONE]`."""


class JsonSchema(_Strict):
    """response_format's `json_schema`: a named JSON schema."""

    name: str = Field("response", min_length=1, max_length=64)
    schema_: dict = Field(alias="schema")
    """The JSON schema the answer must validate against."""
    strict: StrictBool | None = None
    """Accepted as OpenAI's: the answer always follows the schema here."""
    description: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type 'json_schema', and only then")
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of its constraints."""

    json_: dict | str | None = Field(None, alias="json")
    """A JSON schema (an object, or its JSON text)."""
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = None
    """A Lark grammar (or llama.cpp's GBNF) the text must follow."""
    json_object: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one(self):
        kinds = ("json_", "regex", "choice", "grammar", "json_object")
        given = [k for k in kinds if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        if self.choice is not None and any(not c for c in self.choice):
            raise ValueError("choice: the choices must not be empty")
        return self


class SamplingRequest(_Strict):
    """The fields both completion routes share: how tokens are chosen, when to stop, what to stream."""

    model: str | None = None
    """The base model's name or a LoRA adapter's (GET /v1/models)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(-1, ge=-1, le=2**31 - 1)
    """Extension (as in vLLM): keep the k most likely tokens; -1 or 0 keeps all."""
    n: StrictInt = Field(1, ge=1, le=64)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    """Same seed and same request give the same output, whatever else the server is doing (a 64-bit integer)."""
    ignore_eos: StrictBool = False
    """Extension (as in vLLM): keep generating after the end-of-document token (for benchmarks)."""
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=16)
    """Extension (as in vLLM): token ids that end the answer ('stop'), as the end-of-document token does."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's: minus this for every token already generated in this choice."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's: minus this times the times a token was already generated in this choice."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=1e4)
    """Extension (as in vLLM): tokens of the prompt or generated so far have a positive logit divided by it, a
    negative one multiplied (1: off)."""
    logit_bias: dict[str, float] | None = None
    """OpenAI's: token id (a string, as JSON keys are) -> a bias in [-100, 100] added to its logit."""
    response_format: ResponseFormat | None = None
    """OpenAI's structured output: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}: every token is chosen so the answer stays valid."""
    structured_outputs: StructuredOutputs | None = None
    """Extension (as in vLLM): constrain the answer to one of `choice`, to `regex`, to the JSON schema `json`, to
    the Lark `grammar`, or to any JSON object (`json_object`)."""
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _bias(self):
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias: {key!r} is not a token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: the bias of token {key} must be in [-100, 100], got {bias:g}")
        if self.response_format is not None and self.structured_outputs is not None:
            raise ValueError("response_format and structured_outputs: send one of them")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def token_bias(self) -> dict[int, float]:
        """`logit_bias` with integer token ids."""
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    """A string, a list of strings, token ids, or a list of token-id lists."""
    max_tokens: StrictInt | None = Field(16, ge=0)
    """New tokens at most (None: up to the context length). 0 with echo + logprobs scores the prompt only."""
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    """Log-probabilities of the chosen tokens and this many alternatives per position."""
    echo: StrictBool = False
    """Prepend the prompt to the text (and to the logprobs arrays)."""
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        return self


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings."""

    input: Prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _dims(self):
        if self.dimensions is not None:
            raise ValueError("dimensions is not supported: embeddings have the model's width")
        return self


class TokenizeRequest(_Strict):
    """POST /tokenize (as vLLM's)."""

    prompt: str
    model: str | None = None
    add_special_tokens: StrictBool = False
    """Accepted for compatibility: GPT-NeoX tokenizers add no special tokens."""


class DetokenizeRequest(_Strict):
    """POST /detokenize (as vLLM's)."""

    tokens: list[StrictInt]
    model: str | None = None


# -------------------------------------------------------------------------------------------------- responses
# Every field is always sent, a null one too (`"logprobs": null`), in the order written here: clients such as
# lm-evaluation-harness index the JSON directly.
class CompletionLogprobs(BaseModel):
    """A choice's `logprobs`: one entry per token of its text (the prompt's first with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    """None for the first prompt token, which has no context."""
    top_logprobs: list[dict[str, float] | None]
    """The most likely tokens and their log-probabilities (the chosen one always among them)."""
    text_offset: list[int]
    """Character offset of each token in the choice's text."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    """'stop', 'length', or None while a streamed choice is still running."""


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The answer to a POST /v1/completions that is not streamed."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamChunk(BaseModel):
    """One server-sent event of a streamed completion; `usage` only on the last one, when asked for."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None

    def sse(self) -> str:
        return f"data: {json.dumps(self.model_dump(exclude=None if self.usage else {'usage'}))}\n\n"


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    """The vector, or its float32 bytes in base64 (encoding_format 'base64')."""


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "neoxray"
    max_model_len: int
    root: str | None = None
    """What the model was loaded from (a LoRA adapter's directory; as vLLM)."""
    parent: str | None = None
    """A LoRA adapter's base model id (None for the base itself; as vLLM)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(_Strict):
    """POST /v1/load_lora_adapter (vLLM's route)."""

    lora_name: str = Field(min_length=1, max_length=256)
    """The model id requests will send to use the adapter."""
    lora_path: str = Field(min_length=1, max_length=4096)
    """A peft LoRA adapter directory the server can read (adapter_config.json, adapter_model.safetensors)."""


class UnloadLoRAAdapterRequest(_Strict):
    """POST /v1/unload_lora_adapter (vLLM's route)."""

    lora_name: str = Field(min_length=1, max_length=256)


class LoRAAdapterResponse(BaseModel):
    """The answer of the load and unload routes."""

    object: Literal["lora_adapter"] = "lora_adapter"
    lora_name: str
    status: Literal["loaded", "unloaded"]
    evicted: list[str] = Field(default_factory=list)
    """Idle adapters unloaded (least recently used first) to make room for this one."""


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (as vLLM's)."""

    eos_token: str
    bos_token: str
    pad_token: str
    model_max_length: int
    tokenizer_class: str
    vocab_size: int


class HealthResponse(BaseModel):
    """GET /health: the engine's `stats()` follow `status` and `model`."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok"] = "ok"
    model: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    """invalid_request_error, authentication_error or server_error."""
    param: str | None = None
    """The request field the error is about."""
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI writes it; also a streamed completion's event when a choice fails."""

    error: ErrorInfo

    def sse(self) -> str:
        return f"data: {json.dumps(self.model_dump())}\n\n"
