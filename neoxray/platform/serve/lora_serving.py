"""The serving layer's side of multi-LoRA (a part of `neoxray.platform.serve.serving.OpenAIServing`): which
adapter a request's `model` names, /v1/models' adapter cards (vLLM's shape: `parent` is the base model's id,
`root` the adapter's directory), and vLLM's runtime routes, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter. The adapters live in the engine (`neoxray.platform.inference.adapters`), reached through
the engine client; its refusals name the field: `UnknownAdapter` (404), `AdapterBusy` (409, every slot or the
adapter in use), `InvalidRequest` (400: a bad adapter directory, a rank past max_lora_rank, a name taken),
`NotAllowed` (403: a directory outside `allowed_lora_path`, checked where it is read). The routes themselves are
refused here (403) when the server's settings forbid runtime changes: no API key (unless the operator leaves them
open), several model replicas.

A completion's adapter is checked where its requests are taken in (the engine), not here, so that a request and
an unload racing each other never leave a request running on a freed slot and the ingress makes no extra call
per request; tokenize, detokenize and embeddings ask the client for the list.
"""

from __future__ import annotations

import time

from neoxray.platform.inference.request import InvalidRequest, UnknownAdapter
from neoxray.platform.serve.client import NotAllowed
from neoxray.platform.serve.protocol import (
    LoadLoRAAdapterRequest,
    LoRAAdapterResponse,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
)


class LoRAServing:
    """Mixed into OpenAIServing, which sets `client`, `info`, `model_name` and `lora_updates_refused`."""

    lora_updates_refused: str | None = None
    """Why runtime adapter changes are refused here (None: allowed): no API key, several model replicas
    (`neoxray.platform.serve.args.ServeArgs.lora_updates_refused`)."""

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
        lora = self.adapter_of(model)
        if lora is not None and lora not in {a["name"] for a in await self.client.loras()}:
            raise UnknownAdapter(
                f"model {model!r} does not exist; this server serves {self.model_name!r} and its LoRA adapters "
                "(GET /v1/models)",
                "model",
            )
        return lora

    async def models(self) -> ModelList:
        await self.ready()
        now, ctx = int(time.time()), self.info.max_seq_len
        cards = [ModelCard(id=self.model_name, created=now, max_model_len=ctx)]
        if self.info.max_loras:
            for a in await self.client.loras():
                cards.append(
                    ModelCard(id=a["name"], created=now, max_model_len=ctx, root=a["source"], parent=self.model_name)
                )
        return ModelList(data=cards)

    def _check_updates(self, name: str) -> None:
        if self.lora_updates_refused:
            raise NotAllowed(self.lora_updates_refused, None, "lora_updates_disabled")
        if name == self.model_name:
            raise InvalidRequest(f"lora_name {name!r} is the base model's name; an adapter needs its own", "lora_name")

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> LoRAAdapterResponse:
        await self.ready()
        self._check_updates(body.lora_name)
        evicted = await self.client.load_lora(body.lora_name, body.lora_path)
        return LoRAAdapterResponse(lora_name=body.lora_name, status="loaded", evicted=list(evicted))

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> LoRAAdapterResponse:
        await self.ready()
        self._check_updates(body.lora_name)
        await self.client.unload_lora(body.lora_name)
        return LoRAAdapterResponse(lora_name=body.lora_name, status="unloaded")
