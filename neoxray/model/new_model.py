"""`neoxray model init`: a new, randomly initialised model of a preset, fitted to a tokenizer and written as a
Hugging Face GPT-NeoX directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from neoxray.model.config import ModelConfig, get_preset, pad_vocab
from neoxray.model.gptneox import build_model
from neoxray.model.hf import save_pretrained
from neoxray.model.tokenizer import Tokenizer


def preset_for_tokenizer(preset: str, tok: Tokenizer) -> ModelConfig:
    """The preset with the tokenizer's end-of-document id as its end and start token, the tokenizer's vocabulary
    size recorded, and the embedding padded (to a multiple of 128) where the preset's has fewer rows than that."""
    overrides = {"eos_token_id": tok.eod_id, "bos_token_id": tok.eod_id, "tokenizer_vocab_size": tok.vocab_size}
    if tok.vocab_size > get_preset(preset).vocab_size:
        overrides["vocab_size"] = pad_vocab(tok.vocab_size)
    return get_preset(preset, **overrides)


def write_new_model(
    preset: str, tokenizer: str | os.PathLike, out: str | os.PathLike, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, Path]:
    """Initialise `preset` (fitted to the tokenizer at `tokenizer`: a file, a folder or a hub id) from `seed` and
    write it, with the tokenizer, as a Hugging Face directory at `out` in `dtype` (default fp32). Returns the
    config and the directory."""
    tok = Tokenizer.load(tokenizer)
    config = preset_for_tokenizer(preset, tok)
    model = build_model(config, seed=seed)
    return config, save_pretrained(model, out, tokenizer=tok, dtype=dtype)
