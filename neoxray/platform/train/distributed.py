"""Process groups and devices of one training rank, under Ray Train, torchrun or a plain `python` process."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from neoxray.model.precision import resolve_device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verbose() -> bool:
    """`neoxray train --verbose` (NEOXRAY_VERBOSE=1, passed on to Ray Train workers): DeepSpeed's own output."""
    return os.environ.get("NEOXRAY_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep DeepSpeed's set-up chatter (op builds, topology dumps, partition tables) off the console unless
    `verbose()`; its warnings still show."""
    if verbose():
        yield
        return
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        ds_logger.setLevel(level)


def init_distributed(backend: str = "auto", device: str = "auto") -> None:
    """Join the default process group. Under Ray Train (or torchrun) it already exists or the usual env vars
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) describe it; a plain `python` process becomes a world of one.
    `backend` auto: nccl when the workers run on GPUs (`device`, see `worker_device`), else gloo."""
    with quiet():
        import deepspeed

    if backend == "auto":
        backend = "nccl" if resolve_device(device) == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
            )
        dist.init_process_group(backend=backend)
    with quiet():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # DeepSpeed's comm layer over the same group


@dataclass(frozen=True)
class Coord:
    """Where this rank sits in the layout."""

    dp: int
    tp: int
    pp: int


def worker_device(device: str = "auto") -> torch.device:
    """This rank's device for `train.device`: cuda (the GPU of LOCAL_RANK, made current) or cpu; auto is cuda
    when this process sees a GPU."""
    if resolve_device(device) == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
