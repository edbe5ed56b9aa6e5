"""vLLM's runtime LoRA adapter routes, POST /v1/load_lora_adapter and /v1/unload_lora_adapter. The adapters live in
the engine (`neoxray.platform.inference.adapters`), reached through the engine client; its refusals name the
field: `UnknownAdapter` (404), `AdapterBusy` (409, every slot or the adapter in use), `InvalidRequest` (400: a bad
adapter directory, a rank past max_lora_rank, a name taken), `NotAllowed` (403: a directory outside
`allowed_lora_path`, checked where it is read). The routes themselves are refused here (403) when the server's
settings forbid runtime changes: no API key (unless the operator leaves them open), several model replicas.

Which adapter a request's `model` names is the request context's (`neoxray.platform.serve.context`); a
completion's adapter is checked where its requests are taken in (the engine), so that a request and an unload
racing each other never leave a request running on a freed slot and the ingress makes no extra call per request.
"""

from __future__ import annotations

from neoxray.platform.inference.request import InvalidRequest
from neoxray.platform.serve.body import Routes
from neoxray.platform.serve.client import NotAllowed
from neoxray.platform.serve.context import ServingContext
from neoxray.platform.serve.protocol import LoadLoRAAdapterRequest, LoRAAdapterResponse, UnloadLoRAAdapterRequest


class AdapterServing:
    """The adapters API over the shared request context."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def routes(self, routes: Routes) -> Routes:
        routes.post("/v1/load_lora_adapter", LoadLoRAAdapterRequest, self.load_lora_adapter, LoRAAdapterResponse)
        routes.post("/v1/unload_lora_adapter", UnloadLoRAAdapterRequest, self.unload_lora_adapter, LoRAAdapterResponse)
        return routes

    def _check_updates(self, name: str) -> None:
        ctx = self.ctx
        if ctx.lora_updates_refused:
            raise NotAllowed(ctx.lora_updates_refused, None, "lora_updates_disabled")
        if name == ctx.model_name:
            raise InvalidRequest(f"lora_name {name!r} is the base model's name; an adapter needs its own", "lora_name")

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> LoRAAdapterResponse:
        await self.ctx.ready()
        self._check_updates(body.lora_name)
        evicted = await self.ctx.client.load_lora(body.lora_name, body.lora_path)
        return LoRAAdapterResponse(lora_name=body.lora_name, status="loaded", evicted=list(evicted))

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> LoRAAdapterResponse:
        await self.ctx.ready()
        self._check_updates(body.lora_name)
        await self.ctx.client.unload_lora(body.lora_name)
        return LoRAAdapterResponse(lora_name=body.lora_name, status="unloaded")
