"""A Ray cluster of separate nodes on this machine, for the tests that need more than the session's `ray_local`
one: `ray start --head --block` and `ray start --address ... --block`, each its own process tree with its own
temp dir, ports and RAY_* environment (token authentication on, with a token of its own); the `ray` CLI as its
user runs it; stopped by terminating exactly those process trees, never with a bare `ray stop`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from neoxray.platform.train.distributed import free_ports

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else shutil.which("ray")


class TwoNodeCluster:
    """`ray start --head --block` and `ray start --address ... --block`, each in its own process group, each
    with its own temp dir and ports; stopped by terminating exactly those process trees."""

    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root = root
        self.token = secrets.token_hex(24)
        (self.gcs, self.dashboard, self.client, *self._ports) = free_ports(3 + 8)  # 4 agent ports per node
        self.cpus = cpus_per_node
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # the venv's console scripts (neoxray, ray) for the job's shell, appended so that every other tool
        # (a C++ toolchain, ninja for DeepSpeed's JIT ops) resolves as it does for this test process
        path = base.get("PATH", "") + os.pathsep + str(VENV_BIN)
        self.node_env = {
            **base,
            "PATH": path,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.client_env = {**self.node_env, "RAY_ADDRESS": self.dashboard_url}
        self.procs: list[subprocess.Popen] = []
        self.logfiles: list = []

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def _start_node(self, name: str, args: list[str]) -> subprocess.Popen:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop(), after the node exits)
        self.logfiles.append(log)
        proc = subprocess.Popen(
            [
                RAY,
                "start",
                *args,
                "--temp-dir",
                str(temp),
                "--num-cpus",
                str(self.cpus),
                "--object-store-memory",
                str(200 * 1024**2),
                "--disable-usage-stats",
                "--block",
            ],
            env=self.node_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 120) -> None:
        """The head, then the second node; returns when both are alive."""
        self.start_head(timeout)
        self._start_node("worker", ["--address", f"127.0.0.1:{self.gcs}", *self._node_args("worker_node")])
        self.wait(lambda: len(self.alive_nodes()) == 2, timeout, "two alive nodes")

    def start_head(self, timeout: float = 120) -> None:
        """The head node alone; returns when its dashboard lists it alive (the job API answers then too)."""
        dashboard = ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard)]
        head = ["--head", "--port", str(self.gcs), *dashboard, "--ray-client-server-port", str(self.client)]
        self._start_node("head", [*head, *self._node_args("head_node")])
        self.wait(
            lambda: socket.create_connection(("127.0.0.1", self.gcs), timeout=1).close() is None,
            timeout,
            "the head's GCS port",
        )
        self.wait(lambda: len(self.alive_nodes()) == 1, timeout, "the head, alive, in its dashboard")

    def _node_args(self, resource: str) -> list[str]:
        """A node's custom resource (which node a task ran on) and its four agent ports (none of Ray's defaults,
        which another cluster on the machine may hold)."""
        flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
        flags += ("--metrics-export-port",)
        ports = [str(self._ports.pop()) for _ in flags]
        return ["--resources", json.dumps({resource: 1}), *(x for f, port in zip(flags, ports) for x in (f, port))]

    def wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited ({p.returncode}) while waiting for {what}:\n{self.logs()}")
            try:
                if ready():
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"no {what} after {timeout} s:\n{self.logs()}")

    def api(self, path: str, token: str | None = "auto"):
        """GET a dashboard endpoint with the cluster's bearer token (None: without one). JSON or text."""
        req = urllib.request.Request(self.dashboard_url + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token if token == 'auto' else token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body

    def state(self, resource: str, **filters) -> list[dict]:
        """The state API (what `ray list RESOURCE --detail` asks the dashboard), filtered by equality."""
        query = urllib.parse.urlencode(
            {
                "limit": 1000,
                "detail": 1,
                "filter_keys": list(filters),
                "filter_predicates": ["="] * len(filters),
                "filter_values": list(filters.values()),
            },
            doseq=True,
        )
        return self.api(f"/api/v0/{resource}?{query}")["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return self.state("nodes", state="ALIVE")

    def ray(self, *args, check=True, timeout=120, cwd=None) -> subprocess.CompletedProcess:
        """The `ray` CLI as a user of this cluster runs it (RAY_ADDRESS = the dashboard, the token in the env)."""
        address = [] if args[0] in ("job",) else ["--address", self.dashboard_url]
        cmd = [RAY, *args, *address]
        proc = subprocess.run(cmd, env=self.client_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}"
            )
        return proc

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        import psutil

        victims = []
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(p.pid)
                victims += [root, *root.children(recursive=True)]
        for v in victims:  # every process of both node trees (workers run in process groups of their own)
            with contextlib.suppress(psutil.NoSuchProcess):
                v.terminate()
        _, alive = psutil.wait_procs(victims, timeout=5)
        for v in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                v.kill()
        psutil.wait_procs(alive, timeout=5)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for f in self.logfiles:
            f.close()
