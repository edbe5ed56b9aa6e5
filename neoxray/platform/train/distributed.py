"""Process groups and devices of one training rank, under Ray Train, torchrun or a plain `python` process."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neoxray.model.precision import resolve_device

_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts at 49152


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct TCP ports on 127.0.0.1 that nothing listens on now, never handed out before by this process.

    They are drawn from 20000 up to the kernel's ephemeral range, not from it: a port from that range (what binding
    port 0 gives) can be taken by any outgoing connection between this check and the caller's bind, which on a
    busy Ray node made a TCPStore fail with EADDRINUSE. Below 20000 are Ray's worker ports and well-known ones."""
    low, high = 20000, _ephemeral_low()
    if high - low < 1000:  # an unusual ephemeral range: let the kernel pick
        low, high = 0, 0
    ports: list[int] = []
    for _ in range(1000 * n):
        port = random.randrange(low, high) if high else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _HANDED_OUT.add(port)
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free TCP ports found on 127.0.0.1 between {low} and {high}")


def free_port() -> int:
    """One port of `free_ports`."""
    return free_ports(1)[0]


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
