"""Tensor-parallel slicing of plain tensors: which part of a full tensor a rank holds. No process groups here, so
initialisation (`neoxray.model.init`), checkpoint reading and the tensor-parallel layers
(`neoxray.model.tensor_parallel`) all slice the same way without importing each other.

A sharded parameter carries `tp_dim` (the dim it is split on), `tp_rank` and `tp_size`; rank r of n holds the r-th
of n equal contiguous chunks along `tp_dim`.
"""

from __future__ import annotations

import torch

from neoxray.errors import NeoxrayError


def shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous chunk of `full` along `dim` (out of `size` equal chunks), made contiguous.
    May share storage with `full`."""
    n = full.shape[dim]
    if n % size:
        raise NeoxrayError(f"cannot split dim {dim} of a tensor of shape {tuple(full.shape)} into {size} equal shards")
    step = n // size
    return full.narrow(dim, rank * step, step).contiguous()


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the unsharded tensor `param` is a shard of (its own shape for replicated tensors)."""
    dim = getattr(param, "tp_dim", None)
    if dim is None:
        return param.shape
    shape = list(param.shape)
    shape[dim] *= param.tp_size
    return torch.Size(shape)


def _shape(source) -> tuple[int, ...]:
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


def read_slice(source, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s chunk (of `size`) along `dim` of `source`: a full tensor, or a safetensors slice
    (`safe_open(...).get_slice(name)`, of which only the chunk's bytes are read). `dim` None: all of it."""
    if dim is None or size == 1:
        return source[...] if hasattr(source, "get_shape") else source
    shape = _shape(source)
    if shape[dim] % size:
        raise NeoxrayError(f"cannot split dim {dim} of a tensor of shape {shape} into {size} equal shards")
    step = shape[dim] // size
    index = [slice(None)] * len(shape)
    index[dim] = slice(rank * step, (rank + 1) * step)
    return source[tuple(index)]


def read_shard(param: torch.Tensor, source) -> torch.Tensor:
    """This rank's part of a full tensor for `param` (see `read_slice`), after checking that `source` has the
    shape `param` is a shard of. For loaders, e.g.
    `hf.iter_tensors(dir, names, slicer=lambda n, sl: read_shard(params[n], sl))`."""
    if _shape(source) != tuple(full_shape(param)):
        raise NeoxrayError(
            f"tensor has shape {_shape(source)}, the model expects {tuple(full_shape(param))} (before sharding)"
        )
    return read_slice(
        source, getattr(param, "tp_dim", None), getattr(param, "tp_rank", 0), getattr(param, "tp_size", 1)
    )
