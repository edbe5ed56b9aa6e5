"""POST /v1/completions (after vLLM's `OpenAIServingCompletion`): prompts (a string, strings, token ids or
token-id lists) with `n` choices each (seed + j for choice j), sent to the engine as one group (the engine shares
its batch fairly between groups), echo, log-probabilities with text offsets (the engine spells out what is shown:
a token-id prompt's text, log-probability tokens and text offsets, `Request.token_text`), structured output; the
whole answer or server-sent events (`neoxray.platform.serve.jobs`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from neoxray.platform.inference.request import Output, Request, TokenLogprob
from neoxray.platform.serve.body import Routes
from neoxray.platform.serve.context import ServingContext
from neoxray.platform.serve.jobs import Job, start
from neoxray.platform.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    UsageInfo,
)


class CompletionServing:
    """The completions API over the shared request context."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def routes(self, routes: Routes) -> Routes:
        routes.post("/v1/completions", CompletionRequest, self.create_completion, CompletionResponse)
        return routes

    def engine_requests(self, body: CompletionRequest, ids: list[int], group: str, lora: str | None) -> list[Request]:
        """The `n` engine requests of one prompt (choice j samples with seed + j), in the request's group, with
        LoRA adapter `lora` (None: the base)."""
        max_tokens = body.max_tokens if body.max_tokens is not None else max(0, self.ctx.info.max_seq_len - len(ids))
        structured = self.ctx.structured(body)
        return [
            Request(
                ids,
                max_tokens=max_tokens,
                sampling=self.ctx.sampling(body, j),
                logprobs=body.logprobs,
                prompt_logprobs=body.echo and body.logprobs is not None,
                group=group,
                lora=lora,
                token_text=body.echo or body.logprobs is not None,  # the engine spells out what is shown
                **structured,
            )
            for j in range(body.n)
        ]

    async def create_completion(self, body: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """The whole answer, or (`body.stream`) the server-sent events to send."""
        ctx = self.ctx
        await ctx.ready()
        lora = ctx.adapter_of(body.model)
        items = ctx.items_of(body.prompt, "prompt")
        ctx.check_sequences(body, len(items))
        prompts = await ctx.prompts_of(items, "prompt")
        group = f"cmpl-{uuid.uuid4().hex}"
        requests = [r for ids, _ in prompts for r in self.engine_requests(body, ids, group, lora)]
        job = CompletionJob(
            body,
            requests,
            group,
            int(time.time()),
            lora or ctx.model_name,  # as vLLM: the adapter's name, or the base's
            sum(len(ids) for ids, _ in prompts),
            texts=[text for _, text in prompts for _ in range(body.n)],
        )
        outputs = await start(ctx.client, requests)  # the engine checks each request
        return job.stream(outputs) if body.stream else await job.complete(outputs)


@dataclass
class CompletionJob(Job):
    body: CompletionRequest
    texts: list[str | None]
    """Each choice's prompt as sent, or (a token-id prompt) the engine's decoding of it once its first Output came."""

    def response(self, whole: list[Output], usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[self.choice(i, out, self.body.echo) for i, out in enumerate(whole)],
            usage=usage,
        )

    def events(self, i: int, out: Output, first: bool) -> list[str]:
        choice = self.choice(i, out, self.body.echo and first)
        if choice.text or choice.logprobs is not None or choice.finish_reason:
            return [self.chunk([choice])]
        return []

    def usage_event(self, usage: UsageInfo) -> str:
        return self.chunk([], usage)

    def choice(self, i: int, out: Output, echo: bool) -> CompletionChoice:
        """Choice i's part of the answer from `out` (all of its Outputs merged, or the latest ones when streamed),
        with its prompt in front when `echo`."""
        if self.texts[i] is None:  # a token-id prompt: the engine's decoding comes with the first Output
            self.texts[i] = out.prompt_text or ""
        text = self.texts[i]
        return CompletionChoice(
            index=i,
            text=(text if echo else "") + out.text,
            logprobs=_logprobs(self.body, text, out, echo),
            finish_reason=out.finish_reason,
        )

    def chunk(self, parts: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        chunk = CompletionStreamChunk(id=self.id, created=self.created, model=self.model, choices=parts, usage=usage)
        return chunk.sse()


def _logprobs(body: CompletionRequest, prompt_text: str, out: Output, echo: bool) -> CompletionLogprobs | None:
    """A choice's logprobs block (None unless asked for), as the engine spelled it out: the prompt's entries
    first when it is echoed; text offsets count from the start of the prompt's text."""
    if body.logprobs is None:
        return None
    entries = [(e, 0) for e in out.prompt_logprobs or []] if echo else []
    entries += [(e, len(prompt_text)) for e in out.logprobs or []]
    return CompletionLogprobs(
        tokens=[e.text for e, _ in entries],
        token_logprobs=[e.logprob for e, _ in entries],
        top_logprobs=[_top(e) for e, _ in entries],
        text_offset=[start + e.offset for e, start in entries],
    )


def _top(e: TokenLogprob) -> dict[str, float] | None:
    """The most likely tokens at an entry's position, the chosen one always among them (None: no context)."""
    if e.logprob is None:
        return None
    top = {text: lp for text, (_, lp) in zip(e.top_text, e.top)}
    top.setdefault(e.text, e.logprob)
    return top
