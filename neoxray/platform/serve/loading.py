"""What `neoxray serve --model PATH` accepts: an exported Hugging Face GPT-NeoX directory, a neoxray training
checkpoint (`meta.json`), or a run directory (its newest complete checkpoint). Weights are safetensors only."""

from __future__ import annotations

from pathlib import Path

import torch

from neoxray.errors import NeoxrayError


def resolve_model_path(path) -> tuple[str, Path]:
    """-> ("hf" | "checkpoint", directory); a NeoxrayError naming the path when it is neither."""
    from neoxray.platform.worker import latest_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise NeoxrayError(f"model not found: {path}")
    if (p / "config.json").exists():
        return "hf", p
    if (p / "meta.json").exists():
        return "checkpoint", p
    newest = latest_checkpoint(p) if p.is_dir() else None
    if newest is not None:
        return "checkpoint", Path(newest)
    raise NeoxrayError(f"{path}: not a Hugging Face model directory (no config.json), a neoxray checkpoint "
                       f"(no meta.json) or a run directory with a complete checkpoint")


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs, fp32 on CPUs (where bf16 matmuls are slow)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_for_inference(path, device: str = "cpu", dtype: torch.dtype | None = None):
    """-> (model in eval mode on `device`, Tokenizer, model name)."""
    from neoxray.model.tokenizer import Tokenizer

    kind, p = resolve_model_path(path)
    dtype = dtype or default_dtype(device)
    if kind == "hf":
        from neoxray.model.hf import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(p, device=device, dtype=dtype)
        return model.eval(), tok, p.name
    from neoxray.platform.checkpoint import load_checkpoint_model

    if not (p / "tokenizer.json").exists():
        raise NeoxrayError(f"{p}: the checkpoint carries no tokenizer.json")
    tok = Tokenizer.load(p)
    model, source = load_checkpoint_model(p, device=device, dtype=dtype)
    return model.eval(), tok, f"{p.parent.name}/{p.name}" if p.parent.name else p.name
