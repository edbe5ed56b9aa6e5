"""What the serving tests share: an in-process HTTP server over an engine (uvicorn on a thread, no Ray),
`neoxray serve` in a child process (started until healthy, stopped by a signal), a condition wait, and a
stand-in for the model deployment that parks requests until its replica is killed, so that the tests can hold a
Serve deployment in a chosen state (a request running, one queued) and break it. Imported by Ray Serve replicas
too (the stand-in), so nothing here runs at import."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import ray
import requests
from ray import serve

from neoxray.platform.train.distributed import free_port


class Server:
    """`create_app(engine, args)` under uvicorn on a thread of this process, at `self.url` (`args`: ServeArgs'
    defaults, which hold no key and allow no adapter changes at run time)."""

    def __init__(self, engine, args=None):
        import uvicorn

        from neoxray.platform.serve.api import create_app
        from neoxray.platform.serve.args import ServeArgs

        args = args or ServeArgs(model="(in this process)")

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(engine, args), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), f"uvicorn listens on {self.port}")
        if not self.server.started:
            raise AssertionError(f"uvicorn did not start on port {self.port} (its thread exited)")

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def wait_until(condition, what, timeout: float = 120):
    """Poll `condition` until it is true; the deadline is a failure guard only (it never decides a pass).
    `what` (a string, or a function returning one, called on failure) says what was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not reached in {timeout} s")
        time.sleep(0.02)


@ray.remote(num_cpus=0)
class Arrivals:
    """Counts the requests that reached the stand-in model (any of its replicas)."""

    def __init__(self):
        self.n = 0

    def add(self) -> None:
        self.n += 1

    def count(self) -> int:
        return self.n


def cancellations(marks: Path) -> int:
    """How many parked calls of the stand-in model were cancelled (one file each in `marks`)."""
    return len(list(Path(marks).glob("cancelled-*")))


@serve.deployment(name="NeoxrayModel")
class ParkingModel:
    """Answers the ingress as `neoxray.platform.serve.app.NeoxrayModel` does, without an engine: a request whose
    prompt starts with the token of "park" gets one token, then waits for ever (until its replica is killed);
    any other request gets one token and finishes. A parked request that is cancelled leaves a file in `marks`
    (`cancellations`): not a call to an actor, which Ray would cancel with the request it is made from (its
    cancellation is recursive), leaving this replica's next call to that actor waiting for the lost one."""

    def __init__(self, model_dir: str, arrivals, marks: str):
        from neoxray.model.hf import load_model_and_tokenizer

        model, self.tokenizer = load_model_and_tokenizer(model_dir)
        from neoxray.platform.inference.engine import InferenceEngine

        self._info = InferenceEngine(model, self.tokenizer).info
        self.park_id = self.tokenizer.encode("park")[0]
        self.arrivals = arrivals
        self.marks = Path(marks)

    def describe(self):
        return self._info, self.tokenizer, None  # no chat template

    async def generate(self, requests):
        from neoxray.platform.inference.request import Output

        await self.arrivals.add.remote()
        parks = requests[0].prompt_ids[0] == self.park_id
        yield [
            (i, Output(r.request_id, [5], "x", finish_reason=None if parks else "length"))
            for i, r in enumerate(requests)
        ]
        if parks:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:  # the ingress cancelled the call: its client went away
                (self.marks / f"cancelled-{uuid.uuid4().hex}").touch()
                raise

    async def embed(self, token_lists):
        return [[1.0] for _ in token_lists]

    async def stats(self) -> dict:
        return {"running": 0, "waiting": 0}


def neoxray_exe() -> list[str]:
    exe = Path(sys.executable).with_name("neoxray")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "neoxray.cli"]


def start_server(args: list[str], log: Path, url: str, timeout: float = 240) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*neoxray_exe(), "serve", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"neoxray serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1.0)
    proc.kill()
    raise AssertionError(f"neoxray serve did not become healthy in {timeout} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen, log: Path, sig=signal.SIGINT) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(
            f"neoxray serve did not stop on {signal.Signals(sig).name}:\n{log.read_text()[-4000:]}"
        ) from None
