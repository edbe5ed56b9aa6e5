"""Engine clients: how the serving layer (`neoxray.platform.serve.context`) reaches an inference engine, wherever
it runs. `LocalEngineClient` drives an engine in this process (`neoxray serve --no-ray`, the tests, and each model
replica of the Ray Serve application, which is one); the Serve application's ingress uses
`neoxray.platform.serve.app.ServeEngineClient`, which makes the same calls on a model replica through a Serve
DeploymentHandle. Both answer these seven calls:

- `ready()`: the engine's `EngineInfo`, tokenizer and the base model's chat template are known (`info`,
  `tokenizer`, `chat_template`: {text, source, special_tokens}, or None);
- `generate(requests)`: submit the choices of one HTTP request as one group (the engine checks each: an
  `InvalidRequest` naming the field) and yield, as they come, lists of (choice index, Output): whatever the
  engine has ready together goes in one list, consecutive Outputs of one choice merged (`merge_ready`, here
  and nowhere else), so a consumer that lags behind the engine gets fewer, larger pieces instead of one per
  token. Closing the iterator (a client that went away) aborts the choices still running;
- `embed(token_lists, lora)`: embeddings, one input per engine call, so running requests keep decoding between
  them;
- `stats()`: the engine's counters (EngineDead when its thread has stopped);
- `loras()`, `load_lora(name, path)`, `unload_lora(name)`: the LoRA adapters the engine holds (each with the chat
  template its directory ships, or None), and changing
  them between engine steps (`neoxray.platform.inference.adapters`). A runtime load reads the adapter where the
  engine runs, only from under `allowed_lora_path` (`allowed_adapter_dir`: `NotAllowed` otherwise), with
  `neoxray.model.peft_format.read_peft_adapter`.

Failures are `QueueFull` and `EngineDead` (`neoxray.platform.inference.request`) and `EngineUnavailable` (no engine
can take the request now, or the one serving it went away); the serving layer answers each with a 503.
No Ray and no HTTP here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter
from neoxray.platform.inference.request import EngineDead, EngineInfo, InvalidRequest, Output, Request

Batch = list[tuple[int, Output]]
"""What one step of `EngineClient.generate` yields: (choice index, Output) pairs, at most one per choice."""


class EngineUnavailable(NeoxrayError):
    """No engine can take the request now (a full queue upstream), or the one serving it went away; the
    caller answers 503, with Retry-After when `retry_after_s` is set."""

    def __init__(self, message: str, retry_after_s: float | None = None, code: str = "model_unavailable"):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.code = code


class NotAllowed(NeoxrayError):
    """What the operator's settings forbid (403): runtime adapter changes without an API key, an adapter
    directory outside `allowed_lora_path`. `param` names the field, `code` says which."""

    def __init__(self, message: str, param: str | None = None, code: str = "not_allowed"):
        super().__init__(message)
        self.param = param
        self.code = code


def allowed_adapter_dir(root: str | None, path: str) -> Path:
    """`path` (relative ones from `root`) with `..` and symbolic links resolved, once it is known to lie under
    `root`, as do the adapter files in it (a link to weights elsewhere is refused too); NotAllowed otherwise."""
    if root is None:
        raise NotAllowed(
            "runtime LoRA adapter loads read only under --allowed-lora-path (allowed_lora_path), which this server "
            "was not given",
            "lora_path",
            "lora_path_not_allowed",
        )
    base = Path(root).resolve()
    resolved = (base / Path(path).expanduser()).resolve()
    inside = [resolved, *((resolved / f).resolve() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))]
    if not all(p.is_relative_to(base) for p in inside):
        raise NotAllowed(
            f"lora_path {path!r} is not under the allowed LoRA directory {str(base)!r} (with '..' and symbolic "
            "links resolved)",
            "lora_path",
            "lora_path_not_allowed",
        )
    return resolved


def read_adapter(path, engine, name: str):
    """The peft adapter directory `path`, checked against the engine's model (file I/O: off the event loop). A
    bad directory is an InvalidRequest naming `lora_path`."""
    try:
        return read_peft_adapter(path, engine.model_config, name)
    except NeoxrayError as e:
        raise InvalidRequest(str(e), "lora_path") from None


def adapter_chat_template(source: str) -> dict | None:
    """The chat template an adapter's directory ships (as `neoxray export` writes it), as plain data; None when
    it ships none; {"error": why} when it ships one that cannot be read (chat requests to it are refused)."""
    from neoxray.model.chat_template import load_chat_template
    from neoxray.platform.model_cache import local_adapter
    from neoxray.platform.serve.args import template_payload

    try:
        return template_payload(load_chat_template(local_adapter(source)))
    except (NeoxrayError, OSError) as e:
        return {"error": f"LoRA adapter {source}: {e}"}


class ServeObserver:
    """Hooks for metrics (`neoxray.platform.serve.metrics.RayServeMetrics` records them as Ray metrics); called
    where the engine runs."""

    def on_output(self, out: Output, since_previous_s: float | None) -> None:
        """Each Output of each request; since_previous_s is the gap after the previous one (None for the first)."""

    def on_stats(self, stats: dict) -> None:
        """The engine's stats(), about once a second."""


def merge_ready(ready: Sequence[tuple[int, Output]]) -> Batch:
    """`ready` with the Outputs of each choice merged into one, in the order each choice first appears."""
    merged: Batch = []
    where: dict[int, int] = {}
    for i, out in ready:
        j = where.get(i)
        if j is None:
            where[i] = len(merged)
            merged.append((i, out))
        else:
            merged[j] = (i, merged[j][1].merged(out))
    return merged


class EngineClient:
    """The interface the serving layer uses (see the module's docstring)."""

    info: EngineInfo
    tokenizer: object
    chat_template: dict | None = None
    """The base model's chat template as plain data ({text, source, special_tokens}); None: it has none."""

    async def ready(self) -> None:
        raise NotImplementedError

    def generate(self, requests: Sequence[Request]) -> AsyncIterator[Batch]:
        raise NotImplementedError

    async def embed(self, token_lists: Sequence[Sequence[int]], lora: str | None = None) -> list[list[float]]:
        raise NotImplementedError

    async def stats(self) -> dict:
        raise NotImplementedError

    async def loras(self) -> list[dict]:
        """[{name, source, slot, requests, chat_template}] of each loaded adapter."""
        raise NotImplementedError

    async def load_lora(self, name: str, path: str) -> list[str]:
        """Load a peft adapter directory as `name`; returns the idle adapters evicted to make room."""
        raise NotImplementedError

    async def unload_lora(self, name: str) -> None:
        raise NotImplementedError


class LocalEngineClient(EngineClient):
    """An `InferenceEngine` in this process (its background thread must be running), reporting each Output (and,
    once `report_stats` runs, its stats) to `observer`. Each model replica of the Serve application is one
    (`neoxray.platform.serve.app.NeoxrayModel`); runtime adapter loads read only under `allowed_lora_path`."""

    def __init__(
        self,
        engine,
        observer: ServeObserver | None = None,
        allowed_lora_path: str | None = None,
        chat_template: dict | None = None,
    ):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.observer = observer or ServeObserver()
        self.allowed_lora_path = allowed_lora_path
        self.chat_template = chat_template
        self._adapter_templates: dict[tuple[str, str], dict | None] = {}

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    async def ready(self) -> None:
        return None

    def describe(self) -> tuple[EngineInfo, object, dict | None]:
        """What a client in another process needs to check, tokenize and render requests: the engine's bounds,
        its tokenizer and the base model's chat template (`neoxray.platform.serve.app.ServeEngineClient.ready`)."""
        return self.engine.info, self.engine.tokenizer, self.chat_template

    def report_stats(self, period_s: float) -> threading.Event:
        """Hand the engine's stats to the observer every `period_s` on a thread of its own, until the returned
        event is set. A failure there is skipped: metrics must never take the engine down."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(period_s):
                with contextlib.suppress(Exception):
                    self.observer.on_stats(self.engine.stats())

        threading.Thread(target=loop, name="neoxray-stats", daemon=True).start()
        return stop

    async def generate(self, requests: Sequence[Request]) -> AsyncIterator[Batch]:
        last: dict[int, float] = {}
        async with contextlib.aclosing(self.engine.stream(requests)) as outputs:  # closed early: aborted
            async for ready in outputs:
                now = time.perf_counter()
                for i, out in ready:
                    self.observer.on_output(out, now - last[i] if i in last else None)
                    last[i] = now
                yield merge_ready(ready)

    async def embed(self, token_lists: Sequence[Sequence[int]], lora: str | None = None) -> list[list[float]]:
        engine, out = self.engine, []
        for ids in token_lists:  # one input per engine call: decoding steps run in between
            out.extend(await self._between_steps(lambda ids=ids: engine.embed([ids], lora)))
        return out

    async def _between_steps(self, fn):
        self._check_alive()
        return await asyncio.wrap_future(self.engine.run_between_steps(fn))

    def _check_alive(self) -> None:
        if not self.engine.alive:
            raise EngineDead(f"the inference engine is not running ({self.engine.error!r})")

    async def loras(self) -> list[dict]:
        cards = self.engine.loras()
        for card in cards:
            key = (card["name"], card["source"])
            if key not in self._adapter_templates:
                self._adapter_templates[key] = await asyncio.get_running_loop().run_in_executor(
                    None, adapter_chat_template, card["source"]
                )
        return [{**card, "chat_template": self._adapter_templates[(card["name"], card["source"])]} for card in cards]

    async def load_lora(self, name: str, path: str) -> list[str]:
        engine = self.engine
        where = allowed_adapter_dir(self.allowed_lora_path, path)  # checked where it is read
        adapter = await asyncio.get_running_loop().run_in_executor(None, read_adapter, where, engine, name)
        return await self._between_steps(lambda: engine.add_lora(name, adapter, str(where)))

    async def unload_lora(self, name: str) -> None:
        await self._between_steps(lambda: self.engine.remove_lora(name))

    async def stats(self) -> dict:
        self._check_alive()
        return self.engine.stats()
