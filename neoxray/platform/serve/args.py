"""The arguments of the serving application (`ServeArgs`): the `args` of a Serve config (configs/serve.yaml,
validated by Serve against this model before anything runs) and what `neoxray serve`'s flags set. No Ray here,
so that `neoxray serve --no-ray` runs where Ray is not installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neoxray.errors import NeoxrayError
from neoxray.platform.inference.request import EngineConfig
from neoxray.platform.serve import limits as L

API_KEY_ENV = "NEOXRAY_API_KEY"


class ServeArgs(BaseModel):
    """Arguments of the Serve application (the `args` of a Serve config, or `neoxray serve` flags)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    """An exported Hugging Face GPT-NeoX directory, a training checkpoint, or a run directory (its newest
    checkpoint). Every model replica's node must see this path (shared storage, or the same path on every node)."""
    name: str | None = None
    """The model id clients send and /v1/models lists (default: the directory's name)."""
    api_key: str | None = None
    """Bearer token every request must carry (default: the NEOXRAY_API_KEY environment variable; unset: none).
    An empty key is refused: it would turn authentication off without saying so."""
    device: str = "auto"
    """auto (cuda when the replica has a GPU), cpu, cuda."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs, fp32 on CPUs."""
    num_replicas: int = Field(1, ge=1)
    """Fixed model replica count (ignored when min_replicas/max_replicas set autoscaling bounds)."""
    min_replicas: int | None = Field(None, ge=0)
    """Autoscaling lower bound (model replicas)."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling upper bound (model replicas)."""
    target_ongoing_requests: float = Field(16, gt=0)
    """Autoscaling target: ongoing requests per model replica."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per model replica (with tensor_parallel_size > 1: per worker of a replica)."""
    num_cpus: float = Field(1, ge=0)
    """CPUs per model replica (with tensor_parallel_size > 1: the replica's driver; each worker takes
    `worker_num_cpus`)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Workers one model replica spans (vLLM's name): each holds its shard of the weights (Megatron's split, as
    training's) and the KV cache of its heads. The workers are Ray actors in the replica's placement group
    (`placement_strategy`); they meet over NCCL on GPUs, gloo on CPUs."""
    placement_strategy: Literal["PACK", "STRICT_PACK"] = "PACK"
    """How a tensor-parallel replica's bundles are placed: PACK (on as few nodes as possible) or STRICT_PACK (on
    one node, or not at all)."""
    worker_num_cpus: float = Field(1, ge=0)
    """CPUs per tensor-parallel worker (with tensor_parallel_size > 1)."""
    quantization: Literal["int8_weight_only", "int4_weight_only"] | None = None
    """Weight-only quantization of the model's linears (torchao), applied to each worker's shard after loading;
    LoRA adapters stay in the model's dtype. None: the weights as loaded."""
    ingress_replicas: int = Field(1, ge=1)
    """Replicas of the ingress (HTTP, auth, parsing, tokenizing; no model), each calling the model replicas."""
    ingress_num_cpus: float = Field(0.5, ge=0)
    """CPUs per ingress replica."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests a model replica handles at once; more wait in Serve's queue."""
    max_queued_requests: int = Field(256, ge=-1)
    """Requests waiting in Serve's queue for a model replica, per ingress replica, beyond which the ingress
    answers 503 with Retry-After (-1: no limit)."""
    max_num_seqs: int = Field(32, ge=1)
    """Engine: sequences decoded together in one batch."""
    max_running_per_request: int | None = Field(None, ge=1)
    """Engine: most sequences of one request (n x prompts) in the batch at once, so that a request of many
    sequences leaves rows for others (default: half of max_num_seqs, at least 1)."""
    kv_cache_tokens: int | None = Field(None, ge=1)
    """Engine: KV cache token budget (default: max_num_seqs x the model's context)."""
    prefill_chunk: int = Field(512, ge=1)
    """Engine: most prompt tokens prefilled per step."""
    max_request_bytes: int = Field(L.DEFAULT_MAX_REQUEST_BYTES, ge=1024)
    """Most bytes of a request body; larger ones are refused with 413 before they are read."""
    max_seqs_per_request: int = Field(L.DEFAULT_MAX_SEQS_PER_REQUEST, ge=1)
    """Most sequences (n x prompts) of one completion request; more is a 400 naming `n` (or `prompt`)."""
    max_embedding_inputs: int = Field(L.DEFAULT_MAX_EMBEDDING_INPUTS, ge=1)
    """Most inputs of one /v1/embeddings request (400 naming `input` beyond it)."""
    max_embedding_tokens: int = Field(L.DEFAULT_MAX_EMBEDDING_TOKENS, ge=1)
    """Most tokens of one /v1/embeddings request, all inputs together (400 naming `input` beyond it)."""
    health_check_period_s: float = Field(10, gt=0)
    """How often Serve checks a model replica's engine thread (a dead one is replaced)."""
    graceful_shutdown_timeout_s: float = Field(30, ge=0)
    """How long a stopping replica lets running requests finish."""
    loras: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters served on the base model: name -> peft adapter directory (`neoxray serve --lora NAME=DIR`).
    A request's `model` names an adapter (or the base for none); requests of different adapters share batches.
    Every model replica's node must see these paths."""
    max_loras: int | None = Field(None, ge=0)
    """Adapters a model replica holds at once (slots; default: the number of `loras`). Loading one more at run
    time (POST /v1/load_lora_adapter) unloads the least recently used idle adapter; 0 with no `loras`: no LoRA."""
    max_lora_rank: int | None = Field(None, ge=1)
    """The largest adapter rank the slots hold (default: the largest rank of `loras`, at least 16). Slot memory
    is max_loras x max_lora_rank x (inputs + outputs) of every adapted linear; compute follows the ranks in use."""
    allowed_lora_path: str | None = None
    """The directory runtime adapter loads (POST /v1/load_lora_adapter) may read from: a `lora_path` must lie
    under it once `..` and symbolic links are resolved (a relative one is taken from it), or the load is refused
    with 403; None: runtime loads are refused. As vLLM's `--allowed-local-media-path`, for adapters."""
    chat_template: str | None = None
    """The chat template of /v1/chat/completions, for the base model and every adapter (`--chat-template`): a
    Jinja template file, a model directory that ships one, the template itself (text with `{{` or `{%`), or
    `default` (neoxray's plain `Role: content<|endoftext|>` turns, for base GPT-NeoX models). None: each model's
    own (an adapter's directory's, else the base model's); a model with none answers chat requests with a 400."""
    allow_unauthenticated_lora_updates: bool = False
    """Leave POST /v1/load_lora_adapter and /v1/unload_lora_adapter open without an API key. Off: without a key
    they answer 403, since anyone who reaches the port could otherwise unload adapters."""

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty: an empty key would turn authentication off (omit it for no key)")
        return v

    @field_validator("allowed_lora_path")
    @classmethod
    def _allowed_lora_dir(cls, v: str | None) -> str | None:
        if v is None:
            return v
        path = Path(v).expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"{v!r} is not a directory")
        return str(path)

    @field_validator("loras")
    @classmethod
    def _lora_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not name.strip() or name != name.strip() or len(name) > 256:
                raise ValueError(f"LoRA adapter name {name!r}: must be non-empty, without surrounding spaces")
            if not str(path).strip():
                raise ValueError(f"LoRA adapter {name!r}: the directory is empty")
        return v

    @model_validator(mode="after")
    def _lora_slots(self) -> ServeArgs:
        if self.max_loras is not None and len(self.loras) > self.max_loras:
            raise ValueError(f"max_loras is {self.max_loras}, fewer than the {len(self.loras)} adapters in loras")
        if self.name is not None and self.name in self.loras:
            raise ValueError(f"LoRA adapter name {self.name!r} is the base model's name")
        return self

    def lora_updates_refused(self) -> str | None:
        """Why runtime LoRA adapter changes are refused (None: they are not): without an API key anyone who
        reaches the port could make them (unless `allow_unauthenticated_lora_updates`); with several model
        replicas (or autoscaling) a change reaches one of them, and their adapter sets would drift apart."""
        if self.api_key is None and not self.allow_unauthenticated_lora_updates:
            return (
                "runtime LoRA adapter changes need an API key (--api-key), or --allow-unauthenticated-lora-updates "
                "to leave them open to anyone who reaches this server"
            )
        if self.num_replicas > 1 or self.min_replicas is not None or self.max_replicas is not None:
            return (
                "runtime LoRA adapter changes need one fixed model replica (each replica holds its own adapters); "
                "list the adapters in `loras` instead"
            )
        return None

    @property
    def lora_slots(self) -> int:
        return self.max_loras if self.max_loras is not None else len(self.loras)

    def lora_rank(self) -> int:
        """max_lora_rank, or the largest rank of `loras` (from their adapter_config.json), at least 16."""
        if self.max_lora_rank is not None:
            return self.max_lora_rank
        from neoxray.model.peft_format import read_adapter_config
        from neoxray.platform.model_cache import local_adapter

        ranks = [16]
        for name, path in self.loras.items():
            cfg = read_adapter_config(local_adapter(path, f"--lora {name}="))  # a NeoxrayError naming a bad directory
            ranks += [int(cfg["r"]), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
        return max(ranks)

    @classmethod
    def from_flags(cls, **given) -> ServeArgs:
        """The arguments `neoxray serve`'s flags give (a flag left unset, None, takes the field's default); a value
        the schema refuses is a NeoxrayError naming the field, in one line."""
        from pydantic import ValidationError

        try:
            return cls(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            msg = err["msg"].removeprefix("Value error, ")
            raise NeoxrayError(f"serve: {'.'.join(map(str, err['loc']))}: {msg}") from None

    def with_env_api_key(self) -> ServeArgs:
        """These arguments with the key from NEOXRAY_API_KEY when none is given; a NEOXRAY_API_KEY that is set
        but empty is refused (it would turn authentication off without saying so)."""
        if self.api_key is not None or API_KEY_ENV not in os.environ:
            return self
        key = os.environ[API_KEY_ENV]
        if not key.strip():
            raise NeoxrayError(
                f"{API_KEY_ENV} is set but empty: an empty key would turn authentication off "
                f"(unset {API_KEY_ENV} for no key)"
            )
        return self.model_copy(update={"api_key": key})

    @property
    def running_per_request(self) -> int:
        return self.max_running_per_request or max(1, self.max_num_seqs // 2)

    def engine_config(self, lora_rank: int | None = None) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            kv_cache_tokens=self.kv_cache_tokens,
            prefill_chunk=self.prefill_chunk,
            max_running_per_group=self.running_per_request,
            max_loras=self.lora_slots,
            max_lora_rank=lora_rank or self.max_lora_rank or 16,
        )

    def server_chat_template(self):
        """`chat_template` compiled (a ChatTemplate; None: the models' own). A NeoxrayError names a bad one."""
        from neoxray.model.chat_template import resolve_chat_template

        return resolve_chat_template(self.chat_template) if self.chat_template is not None else None

    def model_chat_template(self) -> dict | None:
        """The base model's own chat template as plain data (`template_payload`; None: it has none), read where the
        model is (a model replica; `neoxray serve --no-ray`)."""
        from neoxray.platform.model_loading import model_chat_template

        return template_payload(model_chat_template(self.model))

    def limits(self) -> L.ServingLimits:
        return L.ServingLimits(
            max_request_bytes=self.max_request_bytes,
            max_seqs_per_request=self.max_seqs_per_request,
            max_embedding_inputs=self.max_embedding_inputs,
            max_embedding_tokens=self.max_embedding_tokens,
        )

    def replica_device(self) -> str:
        """Where a replica's model runs: `device`, or for auto cuda when a replica (or worker) has GPUs."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"

    def check_layout(self, kind: str, path) -> None:
        """One line naming the option when the model cannot be split over `tensor_parallel_size` workers or the
        replica's device has no kernel for `quantization` (before anything is deployed or loaded)."""
        from neoxray.platform.model_loading import check_tensor_parallel, model_config_of

        check_tensor_parallel(model_config_of(kind, path), self.tensor_parallel_size)
        if self.quantization is not None:
            from neoxray.model.precision import inference_dtype, to_dtype
            from neoxray.platform.inference.quantization import check_scheme

            device = self.replica_device()
            check_scheme(self.quantization, device, inference_dtype(device, to_dtype(self.dtype)))

    def check_fits(self, log=None) -> None:
        """On a GPU this process sees: refuse a replica whose weights, KV cache and activations cannot fit the
        device (one line naming what would), before any weight is loaded; `log` gets the budget."""
        import torch

        from neoxray.model.precision import inference_dtype, resolve_device, to_dtype

        device = resolve_device(self.device)
        if not device.startswith("cuda") or not torch.cuda.is_available():
            return
        from neoxray.platform.checkpoint import resolve_model_path
        from neoxray.platform.inference.memory import ServeLayout, check_fits, describe
        from neoxray.platform.model_loading import model_config_of

        kind, path = resolve_model_path(self.model)
        dtype = inference_dtype(device, to_dtype(self.dtype))
        cfg = self.engine_config()
        mem = check_fits(
            ServeLayout(
                model_config_of(kind, path),
                torch.cuda.get_device_properties(0).total_memory,
                tensor_parallel_size=self.tensor_parallel_size,
                quantization=self.quantization,
                dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                max_num_seqs=cfg.max_num_seqs,
                kv_cache_tokens=cfg.kv_cache_tokens,
                block_size=cfg.block_size,
                prefill_chunk=cfg.prefill_chunk,
            )
        )
        if log is not None:
            log(describe(mem))

    def build_engine(self, launcher=None):
        """Load the model and make its (not yet started) InferenceEngine, as these arguments say, with the
        `loras` loaded (a bad adapter directory is a NeoxrayError naming it, checked before the model loads).
        `launcher`: how tensor-parallel workers start (Ray actors in a Serve replica; local processes by
        default)."""
        from neoxray.model.peft_format import read_peft_adapter
        from neoxray.model.precision import to_dtype
        from neoxray.platform.inference.engine import InferenceEngine
        from neoxray.platform.model_cache import local_adapter

        rank = self.lora_rank()
        self.check_fits(lambda line: print(f"[neoxray] memory per device: {line}", flush=True))
        engine = InferenceEngine.from_path(
            self.model,
            device=self.device,
            dtype=to_dtype(self.dtype),
            config=self.engine_config(rank),
            model_name=self.name,
            tensor_parallel_size=self.tensor_parallel_size,
            quantization=self.quantization,
            launcher=launcher,
        )
        for name, path in self.loras.items():
            if name == engine.model_name:
                raise NeoxrayError(f"LoRA adapter name {name!r} is the base model's name; give it another")
            try:
                local = local_adapter(path, f"--lora {name}=")  # a URI: this node's cached copy
                engine.add_lora(name, read_peft_adapter(local, engine.model_config, name), str(path))
            except NeoxrayError as e:
                raise NeoxrayError(f"LoRA adapter {name!r}: {e}") from None
        layout = engine.describe()
        print(
            f"[neoxray] {engine.model_name}: {layout['tensor_parallel_size']} worker(s), weights "
            f"{layout['weight_bytes_per_worker'] / 2**20:,.1f} MiB per worker ({self.quantization or 'as stored'}), "
            f"KV cache {layout['kv_cache_bytes_per_worker'] / 2**20:,.1f} MiB per worker",
            flush=True,
        )
        return engine


def template_payload(template) -> dict | None:
    """A ChatTemplate as plain data that crosses process boundaries (the ingress compiles it again)."""
    if template is None:
        return None
    return {"text": template.text, "source": template.source, "special_tokens": dict(template.special_tokens)}
