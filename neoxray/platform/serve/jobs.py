"""A generation request the engine has taken, from its Outputs to the answer: the whole response, or server-sent
events as the engine client hands over pieces (it merges what is ready). The completions and chat APIs differ only
in the shapes they write (`CompletionJob` in `serving_completion`, `ChatJob` in `serving_chat`); collecting,
failures and usage are here, once.

Everything is checked, and the engine has taken the request, before either starts (`start`): a refusal (a bad
request, a full queue) is an HTTP status, never an event halfway through a stream. Once a stream has started, a
failure ends it with an error event and `data: [DONE]`. A client that goes away closes its generator, which
aborts its engine requests.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from neoxray.platform.inference.request import Output, Request
from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.client import EngineClient
from neoxray.platform.serve.protocol import SamplingRequest, UsageInfo

Outputs = AsyncIterator[list[tuple[int, Output]]]


async def start(client: EngineClient, requests: Sequence[Request]) -> Outputs:
    """Submit `requests` as one group and wait until the engine has taken them (its refusal raised here)."""
    batches = client.generate(list(requests))
    try:
        first = await anext(batches)
    except BaseException:
        await batches.aclose()
        raise
    return _following(first, batches)


async def _following(first, rest: AsyncIterator) -> AsyncIterator:
    """`first`, then what `rest` yields; closing it closes `rest`."""
    async with contextlib.aclosing(rest):
        yield first
        async for item in rest:
            yield item


def _early() -> ApiError:
    return ApiError(503, "the model's answer ended early; retry", "server_error", code="model_unavailable")


@dataclass
class Job:
    """One request's choices in the engine: `requests[i]` is choice i; `body`: the request as it came."""

    body: SamplingRequest
    requests: list[Request]
    id: str
    created: int
    model: str
    prompt_tokens: int

    async def complete(self, outputs: Outputs) -> BaseModel:
        """The whole answer, once every choice has finished."""
        outs: list[list[Output]] = [[] for _ in self.requests]
        async with contextlib.aclosing(outputs):  # done, failed, or the client went away: nothing keeps running
            async for batch in outputs:
                for i, out in batch:
                    if out.error:
                        raise ApiError(503, out.error, "server_error", code="model_unavailable")
                    outs[i].append(out)
        if any(not o or o[-1].finish_reason is None for o in outs):
            raise _early()
        whole = [functools.reduce(Output.merged, o) for o in outs]
        return self.response(whole, self.usage(sum(len(out.token_ids) for out in whole)))

    async def stream(self, outputs: Outputs) -> AsyncIterator[str]:
        """The server-sent events: each choice's pieces as they come, usage last when asked for, then [DONE]."""
        started, remaining, generated = set(), set(range(len(self.requests))), 0
        failure: ApiError | None = None
        async with contextlib.aclosing(outputs):  # a client that went away: its engine requests are aborted
            try:
                async for batch in outputs:
                    for i, out in batch:
                        if out.error:
                            yield ApiError(503, out.error, "server_error", code="model_unavailable").response().sse()
                            remaining.discard(i)
                            continue
                        generated += len(out.token_ids)
                        for event in self.events(i, out, first=i not in started):
                            yield event
                        started.add(i)
                        if out.finish_reason is not None:
                            remaining.discard(i)
            except Exception as e:  # the engine or its replica failed: ends the stream with an error event
                failure = ApiError.of(e)
        if remaining:
            yield (failure or _early()).response().sse()
        elif self.include_usage:
            yield self.usage_event(self.usage(generated))
        yield "data: [DONE]\n\n"

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    def usage(self, generated: int) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens, completion_tokens=generated, total_tokens=self.prompt_tokens + generated
        )

    # -- the shapes: each API's own ----------------------------------------------------------------------
    def response(self, whole: list[Output], usage: UsageInfo) -> BaseModel:
        """The answer from each choice's Outputs merged into one."""
        raise NotImplementedError

    def events(self, i: int, out: Output, first: bool) -> list[str]:
        """The events for choice i's latest Output (`first`: its first)."""
        raise NotImplementedError

    def usage_event(self, usage: UsageInfo) -> str:
        raise NotImplementedError
