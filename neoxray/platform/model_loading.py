"""What every command that runs a model accepts as `--model` (generate, score, serve, and export's
`--checkpoint`): an exported Hugging Face GPT-NeoX directory, a neoxray training checkpoint (`meta.json`), or a
run directory (its newest complete checkpoint), resolved here once. Weights are safetensors only."""

from __future__ import annotations

from pathlib import Path

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.precision import inference_dtype, resolve_device
from neoxray.model.tokenizer import TOKENIZER_FILE
from neoxray.platform.checkpoint import META, latest_checkpoint


def resolve_model_path(path) -> tuple[str, Path]:
    """-> ("hf" | "checkpoint", directory); a NeoxrayError naming the path when it is neither."""
    p = Path(path).expanduser()
    if not p.exists():
        raise NeoxrayError(f"model not found: {path}")
    if (p / "config.json").exists():
        return "hf", p
    if (p / META).exists():
        return "checkpoint", p
    newest = latest_checkpoint(p) if p.is_dir() else None
    if newest is not None:
        return "checkpoint", Path(newest)
    raise NeoxrayError(
        f"{path}: not a Hugging Face model directory (no config.json), a neoxray checkpoint "
        f"(no {META}) or a run directory with a complete checkpoint"
    )


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


def load_for_inference(path, device: str = "auto", dtype: torch.dtype | None = None):
    """-> (model in eval mode on `device`, Tokenizer, model name). `device` auto: cuda when this process has a
    GPU; `dtype` None: bf16 on GPUs, fp32 on CPUs. The tokenizer is checked before any weights are read."""
    from neoxray.model.tokenizer import Tokenizer

    kind, p = resolve_model_path(path)
    device = resolve_device(device)
    dtype = inference_dtype(device, dtype)
    if kind == "hf":
        from neoxray.model.hf import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(p, device=device, dtype=dtype)
        return model.eval(), tok, model_display_name(kind, p)
    from neoxray.platform.checkpoint import load_checkpoint_model

    if not (p / TOKENIZER_FILE).exists():
        raise NeoxrayError(f"{p}: the checkpoint carries no {TOKENIZER_FILE}")
    tok = Tokenizer.load(p)
    model, _ = load_checkpoint_model(p, device=device, dtype=dtype)
    return model.eval(), tok, model_display_name(kind, p)
