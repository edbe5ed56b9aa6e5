"""The Ray Serve application: one deployment whose replicas each load the model, run an inference engine
(continuous batching) and answer the OpenAI-compatible HTTP API (`neoxray.platform.serve.api`).

Deploy it with `neoxray serve --model DIR`, or from a Serve config (`configs/serve.yaml`):

    applications:
      - name: neoxray
        route_prefix: /
        import_path: neoxray.platform.serve.app:build_app
        args: {model: /path/to/export}

`build_app` is a typed application builder: Serve validates `args` against `ServeArgs` before anything runs.
"""

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from neoxray.platform.serve.request import EngineConfig


class ServeArgs(BaseModel):
    """Arguments of the Serve application (the `args` of a Serve config, or `neoxray serve` flags)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    """An exported Hugging Face GPT-NeoX directory, a training checkpoint, or a run directory (its newest
    checkpoint). Every replica's node must see this path (shared storage, or the same path on every node)."""
    name: str | None = None
    """The model id clients send and /v1/models lists (default: the directory's name)."""
    api_key: str | None = None
    """Bearer token every request must carry (default: the NEOXRAY_API_KEY environment variable; unset: none)."""
    device: str = "auto"
    """auto (cuda when the replica has a GPU), cpu, cuda."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs, fp32 on CPUs."""
    num_replicas: int = Field(1, ge=1)
    """Fixed replica count (ignored when min_replicas/max_replicas set autoscaling bounds)."""
    min_replicas: int | None = Field(None, ge=0)
    """Autoscaling lower bound."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling upper bound."""
    target_ongoing_requests: float = Field(16, gt=0)
    """Autoscaling target: ongoing requests per replica."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per replica."""
    num_cpus: float = Field(1, ge=0)
    """CPUs per replica."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests a replica handles at once; more wait in Serve's queue."""
    max_queued_requests: int = Field(256, ge=-1)
    """Requests waiting in Serve's queue per deployment handle beyond which Serve answers 503 (-1: no limit)."""
    max_num_seqs: int = Field(32, ge=1)
    """Engine: requests decoded together in one batch."""
    kv_cache_tokens: int | None = Field(None, ge=1)
    """Engine: KV cache token budget (default: max_num_seqs x the model's context)."""
    prefill_chunk: int = Field(512, ge=1)
    """Engine: most prompt tokens prefilled per step."""
    health_check_period_s: float = Field(10, gt=0)
    graceful_shutdown_timeout_s: float = Field(30, ge=0)
    """How long a stopping replica lets running requests finish."""

    def build_engine(self):
        """Load the model and make its (not yet started) InferenceEngine, as these arguments say."""
        from neoxray.model.precision import to_dtype
        from neoxray.platform.serve.engine import InferenceEngine

        dtype = to_dtype(self.dtype)
        config = EngineConfig(
            max_num_seqs=self.max_num_seqs, kv_cache_tokens=self.kv_cache_tokens, prefill_chunk=self.prefill_chunk
        )
        return InferenceEngine.from_path(
            self.model, device=self.device, dtype=dtype, config=config, model_name=self.name
        )


@serve.deployment(name="neoxray")
@serve.ingress()
class NeoxrayServer:
    """One replica: the model, its engine thread, and the HTTP API."""

    def __init__(self, args: dict):
        self.args = ServeArgs(**args)
        self.engine = self.args.build_engine().start()

    def __serve_build_asgi_app__(self):
        from neoxray.platform.serve.api import create_app
        from neoxray.platform.serve.metrics import RayServeMetrics

        return create_app(
            self.engine,
            api_key=self.args.api_key,
            observer=RayServeMetrics(self.engine.model_name),
            shutdown_timeout_s=self.args.graceful_shutdown_timeout_s,
        )

    def check_health(self) -> None:
        """Serve restarts a replica whose engine thread has died."""
        if not self.engine.alive:
            raise RuntimeError(f"inference engine is not running: {self.engine.error!r}")


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for `args` (a typed builder: `serve run neoxray.platform.serve.app:build_app
    model=DIR`, or `import_path` in a Serve config)."""
    if isinstance(args, dict):
        args = ServeArgs(**args)
    if args.api_key is None and os.environ.get("NEOXRAY_API_KEY"):
        args = args.model_copy(update={"api_key": os.environ["NEOXRAY_API_KEY"]})
    from neoxray.platform.model_loading import resolve_model_path

    _, path = resolve_model_path(args.model)  # a wrong path fails here, naming it, not in a replica's log
    args = args.model_copy(update={"model": str(path.resolve())})  # replicas run in other directories
    options = dict(
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        health_check_period_s=args.health_check_period_s,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
    )
    if args.min_replicas is not None or args.max_replicas is not None:
        lo = args.min_replicas if args.min_replicas is not None else 1
        hi = args.max_replicas if args.max_replicas is not None else max(lo, 1)
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": max(hi, lo),
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = args.num_replicas
    return NeoxrayServer.options(**options).bind(args.model_dump())
