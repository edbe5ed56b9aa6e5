"""GET /v1/models (the base model and its LoRA adapters, vLLM's shape: an adapter's `parent` is the base model's
id, its `root` the adapter's directory) and GET /health (the engine's counters; 503 while no engine answers)."""

from __future__ import annotations

import asyncio
import time

from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.body import Routes
from neoxray.platform.serve.context import ServingContext
from neoxray.platform.serve.protocol import HealthResponse, ModelCard, ModelList

READY_TIMEOUT_S = 30.0
"""How long /health waits for the engine's description (the first call, while a model replica starts)."""


class ModelServing:
    """The models and health API over the shared request context."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def routes(self, routes: Routes) -> Routes:
        routes.get("/health", self.health, HealthResponse)
        routes.get("/v1/models", self.models, ModelList)
        return routes

    async def health(self) -> HealthResponse:
        ctx = self.ctx
        try:
            await asyncio.wait_for(ctx.ready(), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, "the model is not ready yet", "server_error", code="model_unavailable") from None
        return HealthResponse(model=ctx.model_name, **await ctx.client.stats())

    async def models(self) -> ModelList:
        ctx = self.ctx
        await ctx.ready()
        now, length = int(time.time()), ctx.info.max_seq_len
        cards = [ModelCard(id=ctx.model_name, created=now, max_model_len=length)]
        if ctx.info.max_loras:
            for a in await ctx.client.loras():
                cards.append(
                    ModelCard(id=a["name"], created=now, max_model_len=length, root=a["source"], parent=ctx.model_name)
                )
        return ModelList(data=cards)
