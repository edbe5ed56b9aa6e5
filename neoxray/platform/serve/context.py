"""The request context every API of the serving layer shares (after vLLM's `OpenAIServing` base): the engine
client, the served model's name, the request limits, the tokenizer threads, which model or LoRA adapter a request
names, prompts (a string, strings, token ids or token-id lists) checked and tokenized, chat templates, and the
sampling a request asks for. One `ServingContext` per app; each API (`serving_completion`, `serving_chat`,
`serving_embedding`, `serving_tokenization`, `serving_models`, `lora_serving`) holds it.

Each step happens once, here or in the engine: this layer checks what only it can (the request's limits,
`neoxray.platform.serve.limits`; a text too long to fit the context, refused before it is tokenized) and
tokenizes texts, on a thread pool, never on the event loop. It decodes nothing: the engine checks every request
it takes in (the vocabulary, the context, sampling; `EngineInfo.check`, a 400 naming the field).

Chat templates: `--chat-template` (the server's, for every model) wins; else a LoRA adapter's own (its directory's
tokenizer_config.json or chat_template.jinja, as `neoxray export` writes it), else the base model's. A model with
none answers chat requests with a 400 naming `--chat-template`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from neoxray.errors import NeoxrayError
from neoxray.model.chat_template import ChatTemplate
from neoxray.model.decoding import SamplingParams
from neoxray.platform.inference.request import SAMPLING_EPS, UnknownAdapter
from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.client import EngineClient
from neoxray.platform.serve.limits import ServingLimits, prompt_char_bound
from neoxray.platform.serve.protocol import SamplingRequest
from neoxray.platform.serve.structured import structured_spec


class ServingContext:
    """What the APIs share for the engine behind `client`, named `model_name` (default: the engine's name).
    `chat_template`: the server's template (a ChatTemplate, winning over the models'; None: the models' own).
    `lora_updates_refused`: why runtime LoRA adapter changes are refused (None: allowed)."""

    def __init__(
        self,
        client: EngineClient,
        model_name: str | None = None,
        limits: ServingLimits | None = None,
        tokenizer_threads: int = 4,
        lora_updates_refused: str | None = None,
        chat_template: ChatTemplate | None = None,
    ):
        self.client = client
        self.limits = limits or ServingLimits()
        self.lora_updates_refused = lora_updates_refused
        self.chat_template = chat_template
        self._name = model_name
        self._pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="neoxray-tokenize")
        self._templates: dict[tuple, ChatTemplate] = {}
        self._setup_done = False

    async def ready(self) -> None:
        """Know the engine (its bounds and tokenizer); the first call may wait for the model to be up."""
        if self._setup_done:
            return
        await self.client.ready()
        self.info = self.client.info
        self.tokenizer = self.client.tokenizer
        self.model_name = self._name or self.info.model_name
        self.max_prompt_chars = prompt_char_bound(self.tokenizer, self.info.max_seq_len)
        self._setup_done = True

    async def off_loop(self, fn, *args):
        """fn(*args) on the tokenizer threads: long texts never hold the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- which model -------------------------------------------------------------------------------------
    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model). Unknown names are refused by the engine
        (UnknownAdapter, 404) when it takes the request in; without adapter slots, here."""
        if model is None or model == self.model_name:
            return None
        if not self.info.max_loras:
            raise UnknownAdapter(f"model {model!r} does not exist; this server serves {self.model_name!r}", "model")
        return model

    async def resolve_model(self, model: str | None) -> str | None:
        """adapter_of, checked against the loaded adapters now (for the routes the engine does not check)."""
        return (await self.adapter_card(model))["name"] if model not in (None, self.model_name) else None

    async def adapter_card(self, model: str | None) -> dict:
        """The loaded adapter `model` names ({name, source, chat_template, ...}); 404 when there is none."""
        lora = self.adapter_of(model)
        for card in await self.client.loras():
            if card["name"] == lora:
                return card
        raise UnknownAdapter(
            f"model {model!r} does not exist; this server serves {self.model_name!r} and its LoRA adapters "
            "(GET /v1/models)",
            "model",
        )

    # -- prompts -----------------------------------------------------------------------------------------
    @staticmethod
    def items_of(prompt, field: str) -> list:
        """The prompts of a string, strings, token ids or token-id lists (not yet tokenized)."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, f"{field} is empty", param=field)
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    async def prompts_of(self, items: Sequence, field: str) -> list[tuple[list[int], str | None]]:
        """-> [(token ids, text)] of each prompt (text None for token ids, which the engine checks and spells
        out). A text that cannot fit the context is refused first, without tokenizing; texts are tokenized on
        the tokenizer threads."""
        texts = [item for item in items if isinstance(item, str)]
        for text in texts:
            self.check_length(text, field)
        encoded = iter(await self.off_loop(self.tokenize, texts, field) if texts else [])
        return [(next(encoded), item) if isinstance(item, str) else (list(item), None) for item in items]

    def check_length(self, text: str, field: str) -> None:
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            ctx = self.info.max_seq_len
            raise ApiError(
                400,
                f"{field} has {len(text)} characters, more than any text of {ctx} tokens (the model's context) can "
                f"have with this tokenizer ({self.max_prompt_chars})",
                param=field,
            )

    def tokenize(self, texts: list[str], field: str) -> list[list[int]]:
        for text in texts:
            check_unicode(text, field)
        encoded = self.tokenizer.encode_batch(texts)  # releases the GIL while it works
        if not all(encoded):
            raise ApiError(400, f"{field} is empty (it encodes to no tokens)", param=field)
        return encoded

    # -- chat templates ----------------------------------------------------------------------------------
    async def template_for(self, model: str | None) -> ChatTemplate:
        """The chat template of the model or adapter `model` names (see the module's docstring)."""
        if self.chat_template is not None:
            return self.chat_template
        lora = self.adapter_of(model)
        described = None
        if lora is not None:
            described = (await self.adapter_card(model)).get("chat_template")
        described = described or self.client.chat_template
        if described is not None and "error" in described:
            raise ApiError(400, described["error"], param="model", code="chat_template_error")
        if described is None:
            raise ApiError(
                400,
                f"model {model or self.model_name!r} has no chat template (its tokenizer_config.json has no "
                "chat_template): start the server with --chat-template FILE_OR_STRING (--chat-template default: "
                "neoxray's plain one, for base GPT-NeoX models), or use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        key = (described["text"], tuple(sorted((described.get("special_tokens") or {}).items())))
        if key not in self._templates:
            try:
                self._templates[key] = ChatTemplate(described["text"], described["source"], described["special_tokens"])
            except NeoxrayError as e:
                raise ApiError(400, str(e), param="messages", code="chat_template_error") from None
        return self._templates[key]

    def end_of_turn(self, template: ChatTemplate) -> tuple[int, ...]:
        """The template's `eos_token` as a stop token when it is one token of the vocabulary other than the end of
        document (ChatML's `<|im_end|>` in a tokenizer that has it): the answer ends with the turn, as vLLM ends it
        at the model's end-of-sequence ids."""
        eos = template.special_tokens.get("eos_token")
        token = self.tokenizer.backend.token_to_id(eos) if isinstance(eos, str) and eos else None
        return () if token is None or token == self.info.eod_id else (token,)

    # -- sampling ----------------------------------------------------------------------------------------
    def sampling(self, body: SamplingRequest, choice: int, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """The sampling of choice `choice` of a request (it samples with seed + choice); `stop_token_ids`: more
        tokens that end it (a chat template's end of turn)."""
        return SamplingParams(
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            greedy=body.temperature < SAMPLING_EPS,  # as vLLM: a vanishing temperature is greedy
            seed=None if body.seed is None else body.seed + choice,
            stop=body.stops,
            stop_at_eod=not body.ignore_eos,
            stop_token_ids=(*(body.stop_token_ids or ()), *stop_token_ids),
            logit_bias=body.token_bias,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
        )

    @staticmethod
    def structured(body: SamplingRequest) -> dict:
        """The engine Request's arguments for `response_format` / `structured_outputs` ({}: unconstrained)."""
        spec = structured_spec(body.response_format, body.structured_outputs)
        return {} if spec is None else {"structured": spec}

    def check_sequences(self, body: SamplingRequest, prompts: int) -> None:
        seqs, most = prompts * body.n, self.limits.max_seqs_per_request
        if seqs > most:
            param = "n" if body.n > 1 else "prompt"
            raise ApiError(
                400,
                f"{param}: the request asks for {seqs} sequences (n={body.n} x {prompts} prompts); "
                f"at most {most} per request",
                param=param,
            )


def check_unicode(text: str, field: str) -> None:
    """Refuse a text the tokenizer cannot take: a lone surrogate (JSON's "\\ud800") is no Unicode character."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"{field} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not "
            "valid Unicode",
            param=field,
        ) from None
