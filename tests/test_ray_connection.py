"""`neoxray.ray_connection`: a local cluster started the way neoxray starts one listens on the loopback interface
only. The cluster runs in a process of its own (the session's cluster is not touched), which lists the listening
sockets of itself and every process below it (GCS, raylet, agents, dashboard, workers) with psutil."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e  # starts a Ray cluster in a process of its own

LIST_LISTENING_SOCKETS = """
import json
import os

import psutil

from neoxray.ray_connection import connect_ray



def pid():
    return os.getpid()


ray = connect_ray(num_cpus=1)
ray.get(ray.remote(pid).remote())  # a worker process, which opens a port of its own
me = psutil.Process()
found = []
for proc in [me, *me.children(recursive=True)]:
    try:
        name = proc.name()
        found += [[name, c.laddr.ip, c.laddr.port] for c in proc.net_connections("inet") if c.status == "LISTEN"]
    except psutil.Error:  # a process that ended meanwhile
        pass
ray.shutdown()
print(json.dumps(found))
"""


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to 127.0.0.1
    return (mapped or address).is_loopback


def test_a_local_cluster_listens_on_the_loopback_interface_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run(
        [sys.executable, "-c", LIST_LISTENING_SOCKETS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sockets = json.loads(proc.stdout.strip().splitlines()[-1])
    listeners = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= listeners, sockets  # the cluster's own servers were seen
    assert any(name.startswith("ray::") for name in listeners), sockets  # and a worker's
    open_doors = [s for s in sockets if not is_loopback(s[1])]
    assert not open_doors, f"listening beyond the loopback interface: {open_doors}"
