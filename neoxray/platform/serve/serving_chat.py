"""POST /v1/chat/completions (after vLLM's `OpenAIServingChat`): the messages rendered with the chat template
(`neoxray.model.chat_template`: the server's `--chat-template`, else the adapter's or the model's own; a template
that raises is a 400 naming `messages`), tokenized on the tokenizer threads, then generated exactly as a
completion of that prompt text would be (greedy chat content equals a greedy completion of the rendered prompt):
the same sampling, limits, fairness between requests, metrics and structured output. `n` choices (seed + j),
log-probabilities in OpenAI's chat shape, the whole answer or chunks whose deltas carry the role first, then the
content (`neoxray.platform.serve.jobs`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from neoxray.errors import NeoxrayError
from neoxray.platform.inference.request import Output, Request, TokenLogprob
from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.body import Routes
from neoxray.platform.serve.context import ServingContext
from neoxray.platform.serve.jobs import Job, start
from neoxray.platform.serve.protocol import UsageInfo
from neoxray.platform.serve.protocol_chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    ChoiceLogprobs,
    Delta,
    TokenLogprobEntry,
    TopLogprob,
)


class ChatServing:
    """The chat completions API over the shared request context."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def routes(self, routes: Routes) -> Routes:
        routes.post("/v1/chat/completions", ChatCompletionRequest, self.create_chat_completion, ChatCompletionResponse)
        return routes

    async def render(self, body: ChatCompletionRequest) -> tuple[list[int], tuple[int, ...]]:
        """The prompt's token ids (the messages through the template, on the tokenizer threads) and the template's
        end-of-turn token ids."""
        ctx = self.ctx
        template = await ctx.template_for(body.model)

        def work():
            try:
                text = template.render(body.plain_messages(), body.add_generation_prompt, body.chat_template_kwargs)
            except NeoxrayError as e:  # raise_exception() in the template, or its own failure
                raise ApiError(400, str(e), param="messages", code="chat_template_error") from None
            ctx.check_length(text, "messages")
            return ctx.tokenize([text], "messages")[0], ctx.end_of_turn(template)

        return await ctx.off_loop(work)

    async def create_chat_completion(self, body: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """The whole answer, or (`body.stream`) the server-sent events to send."""
        ctx = self.ctx
        await ctx.ready()
        lora = ctx.adapter_of(body.model)
        ctx.check_sequences(body, 1)
        ids, end_of_turn = await self.render(body)
        new_tokens = body.new_tokens
        max_tokens = new_tokens if new_tokens is not None else ctx.info.max_seq_len - len(ids)
        if len(ids) >= ctx.info.max_seq_len:  # the rendered conversation fills the context: no room for an answer
            raise ApiError(
                400,
                f"messages: the conversation renders to {len(ids)} tokens; the model's context is "
                f"{ctx.info.max_seq_len}, which leaves no room for an answer",
                param="messages",
            )
        group = f"chatcmpl-{uuid.uuid4().hex}"
        top = body.top_logprobs or 0
        structured = ctx.structured(body)
        requests = [
            Request(
                ids,
                max_tokens=max_tokens,
                sampling=ctx.sampling(body, j, end_of_turn),
                logprobs=top if body.logprobs else None,
                group=group,
                lora=lora,
                token_text=body.logprobs,  # the engine spells out each token of the log-probabilities
                **structured,
            )
            for j in range(body.n)
        ]
        job = ChatJob(body, requests, group, int(time.time()), lora or ctx.model_name, len(ids))
        outputs = await start(ctx.client, requests)  # the engine checks each request
        return job.stream(outputs) if body.stream else await job.complete(outputs)


@dataclass
class ChatJob(Job):
    body: ChatCompletionRequest

    def response(self, whole: list[Output], usage: UsageInfo) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=out.text),
                logprobs=self.logprobs(out),
                finish_reason=out.finish_reason,
            )
            for i, out in enumerate(whole)
        ]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def events(self, i: int, out: Output, first: bool) -> list[str]:
        events = []
        if first:  # as OpenAI: the role first, with empty content
            events.append(self.chunk([ChatStreamChoice(index=i, delta=Delta(role="assistant", content=""))]))
        logprobs = self.logprobs(out)
        if out.text or (logprobs is not None and logprobs.content) or out.finish_reason:
            delta = Delta(content=out.text) if out.text else Delta()
            events.append(
                self.chunk([ChatStreamChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=out.finish_reason)])
            )
        return events

    def usage_event(self, usage: UsageInfo) -> str:
        return self.chunk([], usage)

    def chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            with_usage=self.include_usage,
        ).sse()

    def logprobs(self, out: Output) -> ChoiceLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChoiceLogprobs(content=[_entry(e) for e in out.logprobs or []])


def _entry(e: TokenLogprob) -> TokenLogprobEntry:
    """One answer token's log-probability and the alternatives at its position, best first."""
    return TokenLogprobEntry(
        token=e.text,
        logprob=e.logprob,
        bytes=list(e.text.encode("utf-8")),
        top_logprobs=[
            TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))
            for text, (_, lp) in zip(e.top_text or [], e.top)
        ],
    )
