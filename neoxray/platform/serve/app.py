"""The Ray Serve application: an ingress in front of the model, as vLLM's (and Ray Serve LLM's) OpenAI router
sits in front of its LLM server deployments.

- `NeoxrayIngress` (`ingress_replicas` replicas, no model): the HTTP API (`neoxray.platform.serve.api`): routes,
  auth, body limits, parsing, tokenizing on threads, OpenAI-shaped errors. It reaches the model through a
  Serve DeploymentHandle (`ServeEngineClient`), so it outlives what happens there: Serve's backpressure (the
  handle's `BackPressureError`) becomes an OpenAI-shaped 503 with Retry-After, and a model replica that dies
  mid-request becomes a 503, or ends a stream with an error event and `data: [DONE]`.
- `NeoxrayModel` (`num_replicas`, or autoscaling, each with `num_gpus`): one InferenceEngine per replica
  (continuous batching), the health check, the graceful drain, and the `neoxray_serve_*` Ray metrics. It is a
  `LocalEngineClient` over its engine, so the ingress's calls are the engine client's own, run here: its
  `generate` streams what the engine has ready, merged per step, so the extra hop costs one message per step
  rather than one per token; a cancelled call (the client went away) aborts the engine requests. Each replica
  loads the `loras` adapters; runtime loads and unloads reach one replica, so they are refused (403, one line)
  when the deployment may have several (`ServeArgs.lora_updates_refused`).

Deploy it with `neoxray serve --model DIR`, or from a Serve config (`configs/serve.yaml`):

    applications:
      - name: neoxray
        route_prefix: /
        import_path: neoxray.platform.serve.app:build_app
        args: {model: /path/to/export}

`build_app` is a typed application builder: Serve validates `args` against `ServeArgs` before anything runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from neoxray.errors import NeoxrayError
from neoxray.platform.inference.request import EngineInfo, Request
from neoxray.platform.serve.args import ServeArgs
from neoxray.platform.serve.client import Batch, EngineClient, EngineUnavailable, LocalEngineClient

__all__ = ["NeoxrayIngress", "NeoxrayModel", "ServeArgs", "ServeEngineClient", "build_app"]

HEALTH_TIMEOUT_S = 10.0
"""How long /health waits for a model replica's counters before answering 503."""


@serve.deployment(name="NeoxrayModel")
class NeoxrayModel(LocalEngineClient):
    """One model replica: the model and its engine thread, reached by the ingress through a DeploymentHandle; the
    calls it makes are the engine client's own (`generate`, `embed`, `stats`, `loras`, `load_lora`,
    `unload_lora`, and `describe` once), run here."""

    def __init__(self, args: dict, stats_period_s: float = 1.0):
        from neoxray.platform.serve.metrics import RayServeMetrics

        self.args = ServeArgs(**args)
        launcher = None
        if self.args.tensor_parallel_size > 1:
            from neoxray.platform.serve.tp_workers import RayActorLauncher

            launcher = RayActorLauncher(self.args.num_gpus, self.args.worker_num_cpus)
        engine = self.args.build_engine(launcher).start()
        super().__init__(
            engine, RayServeMetrics(engine.model_name), self.args.allowed_lora_path, self.args.model_chat_template()
        )
        self._stop_stats = self.report_stats(stats_period_s)

    def check_health(self) -> None:
        """Serve replaces a replica whose engine thread has died."""
        if not self.engine.alive:
            raise RuntimeError(f"inference engine is not running: {self.engine.error!r}")

    async def __del__(self):
        """Serve has stopped routing to this replica and waited for its requests (graceful_shutdown_timeout_s):
        stop the engine, finishing whatever is left as far as the remaining time allows."""
        self._stop_stats.set()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, 5.0)


class ServeEngineClient(EngineClient):
    """The model deployment, reached through a Serve DeploymentHandle; Serve's and Ray's failures become the
    engine client's (`EngineUnavailable`, or the engine's own error raised in the replica)."""

    def __init__(self, handle, health_timeout_s: float = HEALTH_TIMEOUT_S):
        self.handle = handle
        self.health_timeout_s = health_timeout_s
        self._lock: asyncio.Lock | None = None
        self.info: EngineInfo | None = None
        self.tokenizer = None

    async def ready(self) -> None:
        if self.info is not None:
            return
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self.info is None:
                try:
                    self.info, self.tokenizer, self.chat_template = await self.handle.describe.remote()
                except Exception as e:
                    raise _translate(e) from None

    async def generate(self, requests: Sequence[Request]) -> AsyncIterator[Batch]:
        response = self.handle.options(stream=True).generate.remote(list(requests))
        finished = False
        try:
            it = response.__aiter__()
            while True:
                try:
                    batch = await it.__anext__()
                except StopAsyncIteration:
                    finished = True
                    return
                except Exception as e:
                    finished = True  # nothing left to cancel
                    raise _translate(e) from None
                yield batch
        finally:
            if not finished:  # the consumer went away: the replica's generator is cancelled, aborting its requests
                response.cancel()

    async def embed(self, token_lists: Sequence[Sequence[int]], lora: str | None = None) -> list[list[float]]:
        lists = [list(t) for t in token_lists]
        return await (self._call("embed", lists) if lora is None else self._call("embed", lists, lora))

    async def loras(self) -> list[dict]:
        return await self._call("loras")

    async def load_lora(self, name: str, path: str) -> list[str]:
        return await self._call("load_lora", name, path)

    async def unload_lora(self, name: str) -> None:
        await self._call("unload_lora", name)

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as e:
            raise _translate(e) from None

    async def stats(self) -> dict:
        try:
            return await asyncio.wait_for(self.handle.stats.remote(), self.health_timeout_s)
        except asyncio.TimeoutError:
            raise EngineUnavailable(
                f"no model replica answered within {self.health_timeout_s:g} s (starting, or every one busy)",
                retry_after_s=1,
            ) from None
        except Exception as e:
            raise _translate(e) from None


def _translate(e: Exception) -> Exception:
    """Serve's and Ray's exceptions from a call to the model deployment -> what the serving layer answers."""
    if isinstance(e, BackPressureError):
        return EngineUnavailable(
            f"server overloaded: {e.message} retry later", retry_after_s=e.retry_after_s or 1, code="server_overloaded"
        )
    if isinstance(e, RayTaskError):  # raised by the replica's code: the engine's own errors pass through
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, NeoxrayError) else e
    if isinstance(e, (RayError, RayServeException)):  # the replica died, or none is reachable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return EngineUnavailable(f"the model replica serving this request went away ({first}); retry", retry_after_s=1)
    return e


@serve.deployment(name="NeoxrayIngress")
@serve.ingress()
class NeoxrayIngress:
    """One ingress replica: the HTTP API over the model deployment's handle."""

    def __init__(self, model, args: dict):
        self.args = ServeArgs(**args)
        self.client = ServeEngineClient(model)

    def __serve_build_asgi_app__(self):
        from neoxray.platform.serve.api import create_app

        return create_app(self.client, self.args)


def replica_env() -> dict:
    """The model replicas' `runtime_env`: the object-storage endpoint and credentials this process has
    (`neoxray.platform.run_store.STORE_ENV`) and where nodes cache models, so a replica reads `--model s3://...`
    and `--lora NAME=s3://...` as the driver did; {} when none is set (pods with their own identity)."""
    from neoxray.platform.model_cache import forwarded_env

    env = forwarded_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for `args` (a typed builder: `serve run neoxray.platform.serve.app:build_app
    model=DIR`, or `import_path` in a Serve config)."""
    if isinstance(args, dict):
        args = ServeArgs(**args)
    args = args.with_env_api_key()
    from neoxray.platform.model_loading import resolve_model_path

    kind, path = resolve_model_path(args.model)  # a wrong path fails here, naming it, not in a replica's log
    args.check_layout(kind, path)  # tensor-parallel split and quantization, before any replica loads a weight
    from neoxray.paths import is_uri

    # replicas run elsewhere: a local path made absolute; a URI kept, each node filling its own model cache
    model_path = args.model if is_uri(str(args.model)) else str(path.resolve())
    from neoxray.model.peft_format import read_adapter_config
    from neoxray.platform.model_cache import local_adapter

    loras = {}
    for name, lora_dir in args.loras.items():
        read_adapter_config(local_adapter(lora_dir, f"--lora {name}="))  # a bad adapter fails here, naming it
        loras[name] = lora_dir if is_uri(lora_dir) else str(Path(lora_dir).expanduser().resolve())
    chat = args.server_chat_template()  # a bad template fails here, naming it; replicas get its text
    args = args.model_copy(
        update={"model": model_path, "loras": loras, "chat_template": chat.text if chat is not None else None}
    )
    model = dict(
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus, **replica_env()},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        health_check_period_s=args.health_check_period_s,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
    )
    if args.tensor_parallel_size > 1:  # the replica (no GPU) and its workers, placed together
        from neoxray.platform.serve.tp_workers import placement_bundles

        model["ray_actor_options"]["num_gpus"] = 0
        model["placement_group_bundles"] = placement_bundles(
            args.tensor_parallel_size, args.num_cpus, args.num_gpus, args.worker_num_cpus
        )
        model["placement_group_strategy"] = args.placement_strategy
    if args.min_replicas is not None or args.max_replicas is not None:
        lo = args.min_replicas if args.min_replicas is not None else 1
        hi = max(args.max_replicas if args.max_replicas is not None else max(lo, 1), lo)
        model["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    else:
        model["num_replicas"] = hi = args.num_replicas
    # the ingress takes every request at once (its queue is unbounded, so Serve's proxy never answers for it in
    # plain text); what bounds the load is the model deployment's queue, which the ingress reports as a 503
    queued = max(args.max_queued_requests, 0)
    ingress = dict(
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        max_ongoing_requests=max(1024, 2 * hi * (args.max_ongoing_requests + queued)),
        max_queued_requests=-1,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
    )
    dumped = args.model_dump()
    return NeoxrayIngress.options(**ingress).bind(NeoxrayModel.options(**model).bind(dumped), dumped)
