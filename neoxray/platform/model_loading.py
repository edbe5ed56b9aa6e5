"""What every command that runs a model accepts as `--model` (generate, score, serve, and export's
`--checkpoint`): an exported Hugging Face GPT-NeoX directory, a neoxray training checkpoint (`meta.json`), or a
run directory (its newest complete checkpoint), resolved here once. Weights are safetensors only."""

from __future__ import annotations

from pathlib import Path

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.peft_format import read_peft_adapter
from neoxray.model.precision import inference_dtype, resolve_device
from neoxray.model.tokenizer import TOKENIZER_FILE
from neoxray.platform.checkpoint import read_meta, resolve_model_path


def resolve_checkpoint_path(path) -> Path:
    """A training checkpoint, or a run directory's newest one; anything else is a NeoxrayError naming it."""
    kind, p = resolve_model_path(path)
    if kind != "checkpoint":
        raise NeoxrayError(f"{path}: a Hugging Face model directory, not a training checkpoint (nothing to export)")
    return p


def model_display_name(kind: str, p: Path) -> str:
    """The default model id: the directory's name (with its run directory's for a checkpoint)."""
    if kind == "checkpoint" and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name


def model_config_of(kind: str, p: Path):
    """The ModelConfig of a resolved model (its config.json or checkpoint meta), without reading any weights."""
    if kind == "hf":
        from neoxray.model.hf import read_config

        return read_config(p)[0]
    from neoxray.model.config import ModelConfig

    return ModelConfig.from_dict(read_meta(p)["model_config"])


def load_for_inference(path, device: str = "auto", dtype: torch.dtype | None = None, lora=None):
    """-> (model in eval mode on `device`, Tokenizer, model name). `device` auto: cuda when this process has a
    GPU; `dtype` None: bf16 on GPUs, fp32 on CPUs. The tokenizer is checked before any weights are read.

    `lora`: a peft LoRA adapter directory for this base (`--lora DIR`). It is checked against the base's config
    first (a wrong directory or a tensor of the wrong shape is a NeoxrayError naming it, before the base's weights
    are read), then merged into the weights (W += scaling * B A, computed in fp32): the model then runs at the
    base's speed, exactly as peft's `merge_and_unload()` would have it. The name becomes "BASE+ADAPTER"
    (the adapter directory's name)."""
    from neoxray.model.tokenizer import Tokenizer

    kind, p = resolve_model_path(path)
    device = resolve_device(device)
    dtype = inference_dtype(device, dtype)
    adapter = None if lora is None else read_peft_adapter(lora, model_config_of(kind, p))
    if kind == "hf":
        from neoxray.model.hf import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(p, device=device, dtype=dtype)
    else:
        from neoxray.platform.checkpoint import load_checkpoint_model
        from neoxray.platform.lora_checkpoint import is_lora, load_merged

        if not (p / TOKENIZER_FILE).exists():
            raise NeoxrayError(f"{p}: the checkpoint carries no {TOKENIZER_FILE}")
        tok = Tokenizer.load(p)
        if is_lora(read_meta(p)):  # a LoRA run's checkpoint: its base with the adapter folded in
            model, _ = load_merged(p, device=device, dtype=dtype)
        else:
            model, _ = load_checkpoint_model(p, device=device, dtype=dtype)
    name = model_display_name(kind, p)
    if adapter is not None:
        from neoxray.model.lora import merge_into

        merge_into(model, adapter)
        name = f"{name}+{Path(lora).expanduser().resolve().name}"
    return model.eval(), tok, name
