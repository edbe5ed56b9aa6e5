"""POST /v1/embeddings: each input (a string, strings, token ids or token-id lists) within the request's limits,
embedded by the base model or a LoRA adapter, one input per engine call so running requests keep decoding between
them; float vectors or their float32 bytes in base64."""

from __future__ import annotations

import base64

import numpy as np

from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.body import Routes
from neoxray.platform.serve.context import ServingContext
from neoxray.platform.serve.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage


class EmbeddingServing:
    """The embeddings API over the shared request context."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def routes(self, routes: Routes) -> Routes:
        routes.post("/v1/embeddings", EmbeddingRequest, self.embeddings, EmbeddingResponse)
        return routes

    async def embeddings(self, body: EmbeddingRequest) -> EmbeddingResponse:
        ctx = self.ctx
        await ctx.ready()
        lora = await ctx.resolve_model(body.model)
        limits = ctx.limits
        items = ctx.items_of(body.input, "input")
        if len(items) > limits.max_embedding_inputs:
            raise ApiError(
                400, f"input has {len(items)} items; at most {limits.max_embedding_inputs} per request", param="input"
            )
        prompts = await ctx.prompts_of(items, "input")
        n = sum(len(ids) for ids, _ in prompts)
        if n > limits.max_embedding_tokens:
            raise ApiError(
                400, f"input has {n} tokens in all; at most {limits.max_embedding_tokens} per request", param="input"
            )
        vectors = await ctx.client.embed([ids for ids, _ in prompts], lora)  # the engine checks each input
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode() for v in vectors]
        return EmbeddingResponse(
            data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
            model=lora or ctx.model_name,
            usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n),
        )
