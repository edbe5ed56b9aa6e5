"""LoRA runs' checkpoints and their frozen base, shared by training, export, serving and evaluation (no Ray, no
DeepSpeed).

A LoRA run trains adapters (`neoxray.model.lora`) on a frozen base named by `model.init_from`: a Hugging Face
GPT-NeoX directory, a full training checkpoint, or a run directory (its newest checkpoint, resolved once when the
run starts). Its checkpoints are ordinary neoxray checkpoints (`neoxray.platform.checkpoint`) that hold only the
adapter tensors ("model/layers.N.attention.query_key_value.lora_A", ...) and their Adam moments, so they are
megabytes, plus two entries in `meta.json`:

    "lora": {"r", "alpha", "dropout", "targets", "use_rslora", "layers"}   the adapter's shape (LoRASpec)
    "base": {"kind": "hf" | "checkpoint", "path", "sha256"}                  the frozen base's identity

The base's sha256 is taken over its weight files (a Hugging Face directory's config.json and safetensors) or, for
a checkpoint, over its meta.json (which lists the sha256 of every file it holds). Resuming or exporting checks the
base still has it: an adapter is never put on a base it was not trained on. Export (a peft adapter directory, or
a merged model) is `neoxray.platform.export`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.lora import LoRAAdapter, LoRASpec
from neoxray.paths import is_uri
from neoxray.platform.checkpoint import (
    META,
    CheckpointSource,
    HFSource,
    check_finite_tensor,
    file_digest,
    load_checkpoint_model,
    read_meta,
    resolve_model_path,
)

MODEL_KEY = "model/"


@dataclass(frozen=True)
class Base:
    """A frozen base model: what `model.init_from` named, resolved."""

    kind: str
    """"hf" (a Hugging Face directory) or "checkpoint" (a full neoxray training checkpoint)."""
    path: Path
    """The directory (a run directory resolved to its newest checkpoint; for a URI, this node's cached copy)."""
    origin: str | None = None
    """The URI it was named by (a run directory's resolved to its newest checkpoint), or None when local."""

    def config(self) -> ModelConfig:
        if self.kind == "hf":
            from neoxray.model.hf import read_config

            return read_config(self.path)[0]
        return ModelConfig.from_dict(read_meta(self.path)["model_config"])

    def source(self):
        """A TensorSource of the base's weights (each rank reads only its slices)."""
        return HFSource(self.path) if self.kind == "hf" else CheckpointSource(self.path)

    def identity(self) -> dict:
        """{"kind", "path", "sha256"}: what a LoRA checkpoint records about its base."""
        h = hashlib.sha256()
        if self.kind == "checkpoint":
            h.update((self.path / META).read_bytes())
        else:
            files = ["config.json", *sorted(p.name for p in self.path.glob("*.safetensors"))]
            for name in files:
                h.update(name.encode() + b"\0" + file_digest(self.path / name).encode() + b"\0")
        return {"kind": self.kind, "path": self.origin or str(self.path.resolve()), "sha256": h.hexdigest()}


def resolve_base(path, key: str = "model.init_from") -> Base:
    """The base named by `path` (HF directory, full checkpoint, run directory); a NeoxrayError naming `key`
    when it is none of these, or is itself a LoRA checkpoint (adapters only: no base weights in it). A URI is read
    through this node's model cache (`neoxray.platform.model_cache`)."""
    origin = None
    if is_uri(str(path)):  # what it holds, pinned (a NeoxrayError naming `key` and the URI)
        from neoxray.platform.model_cache import pin_model_uri

        origin = pin_model_uri(str(path), key)[1]
    try:
        kind, p = resolve_model_path(origin or path, key)
    except NeoxrayError as e:
        raise NeoxrayError(f"{key}={path}: {e}") from None
    if kind == "checkpoint" and is_lora(read_meta(p)):
        raise NeoxrayError(
            f"{key}={path}: {p} is a LoRA checkpoint (adapter weights only); use its base "
            f"({read_meta(p)['base']['path']}), or `neoxray export --merge` it into a full model first"
        )
    return Base(kind, p, origin)


def is_lora(meta: dict) -> bool:
    """Whether a checkpoint's meta.json describes a LoRA run's (adapter-only) checkpoint."""
    return bool(meta.get("lora"))


def checkpoint_spec(meta: dict) -> LoRASpec:
    return LoRASpec.from_dict(meta["lora"], strict=False)


def check_base(meta: dict, where, base: Base | None = None) -> Base:
    """The base a LoRA checkpoint was trained on (or `base`, when given), refused in one line when its files are
    no longer what the checkpoint recorded."""
    saved = meta["base"]
    if base is None:
        if is_uri(saved["path"]):
            base = resolve_base(saved["path"], f"{where}: its base model")
        elif not Path(saved["path"]).exists():
            raise NeoxrayError(f"{where}: its base model {saved['path']} is gone (a LoRA checkpoint needs its base)")
        else:
            base = Base(saved["kind"], Path(saved["path"]))
    now = base.identity()
    if now["sha256"] != saved["sha256"]:
        raise NeoxrayError(
            f"{where} was trained on a base whose files have changed since ({base.path}: sha256 "
            f"{now['sha256'][:12]}, the checkpoint recorded {saved['sha256'][:12]}); the adapter fits only that base"
        )
    return base


def read_checkpoint_adapter(checkpoint, name: str | None = None) -> tuple[LoRAAdapter, dict]:
    """A LoRA checkpoint's adapter as full (tensor-parallel shards merged) fp32 tensors -> (adapter, meta)."""
    source = CheckpointSource(checkpoint)
    meta = source.meta
    if not is_lora(meta):
        raise NeoxrayError(f"{checkpoint}: not a LoRA checkpoint (it holds a full model)")
    names = [k for k in source.keys() if k.startswith(MODEL_KEY)]  # noqa: SIM118 (a list, not a dict)
    tensors = {k.removeprefix(MODEL_KEY): source.get(k, None, 0, 1).float() for k in names}
    for k, t in tensors.items():
        check_finite_tensor(k, t, checkpoint)
    return LoRAAdapter(checkpoint_spec(meta), tensors, {}, name or Path(checkpoint).name), meta


def load_merged(checkpoint, device="cpu", dtype: torch.dtype = torch.float32):
    """The base of a LoRA checkpoint with its adapter folded in: a plain model -> (model, its Base)."""
    from neoxray.model.lora import merge_into

    adapter, meta = read_checkpoint_adapter(checkpoint)
    base = check_base(meta, checkpoint)
    model = load_base_model(base)
    merge_into(model, adapter)
    return model.to(device=device, dtype=dtype), base


def load_base_model(base: Base):
    """The whole base model in fp32 on the CPU."""
    if base.kind == "hf":
        from neoxray.model.hf import load_pretrained

        return load_pretrained(base.path, dtype=torch.float32)
    return load_checkpoint_model(base.path)[0]
