"""Ports handed to a TCPStore or a server in tests and in single-process runs."""

from __future__ import annotations

import socket
from pathlib import Path

from neoxray.platform.train.distributed import free_ports


def _ephemeral_range() -> tuple[int, int]:
    lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(lo), int(hi)


def test_free_ports_are_outside_the_ephemeral_range_distinct_and_bindable():
    # A port from the ephemeral range (what binding port 0 gives) can be taken by any outgoing connection before
    # the caller binds it: on a busy Ray node that made a TCPStore fail with EADDRINUSE (CI, 2026-12-06).
    lo, hi = _ephemeral_range()
    ports = free_ports(16) + free_ports(16)
    assert len(set(ports)) == len(ports)
    assert all(not lo <= p <= hi for p in ports), ports
    assert all(p >= 20000 for p in ports), "below 20000 are Ray's worker ports (10002-19999) and well-known ones"
    for p in ports[:4]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
