"""Tiny GPT-NeoX models for tensor-parallel tests: the plain model and its tensor-parallel build from the same
seed, the slice of a plain tensor a sharded parameter holds, and a batch with ignored labels."""

from __future__ import annotations

import torch

from neoxray.model.config import ModelConfig
from neoxray.model.gptneox import GPTNeoX
from neoxray.model.init import init_parameters
from neoxray.model.sharding import shard
from neoxray.model.tensor_parallel import parallelize

SEED = 7
V = 512
"""The tiny models' vocabulary."""


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layers=2, d_model=64, n_heads=4, vocab_size=V, max_seq_len=64), **kw})


def plain_model(cfg: ModelConfig, seed: int = SEED) -> GPTNeoX:
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    model.to_empty(device="cpu")
    init_parameters(model, seed)
    return model


def tp_model(cfg: ModelConfig, group, seed: int = SEED) -> GPTNeoX:
    """The normal build path: meta -> parallelize -> to_empty -> init."""
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    parallelize(model, group)
    model.to_empty(device="cpu")
    init_parameters(model, seed)
    return model


def local_slice(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of the plain model's tensor that the (possibly sharded) parameter `p` holds."""
    dim = getattr(p, "tp_dim", None)
    return full if dim is None else shard(full, dim, p.tp_rank, p.tp_size)


def batch(cfg, b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100  # ignored positions
    return ids[:, :-1], labels
