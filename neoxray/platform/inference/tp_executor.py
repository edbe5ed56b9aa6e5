"""Tensor-parallel replicas: one engine's model split over N workers, Megatron's way, as training splits it.

Each worker (rank r of N) builds the model on the meta device, rewrites it with training's column/row-parallel
layers (`neoxray.model.tensor_parallel.parallelize`: QKV and the MLP's first linear by output, the attention's
and the MLP's output projections by input, the embedding and the output head by vocabulary), reads only its own
slice of each safetensors tensor (`neoxray.platform.model_loading.load_shard`), optionally quantizes its shard
(`neoxray.platform.inference.quantization`), and allocates the KV cache of its own heads. LoRA adapters are
sharded like their layers (`neoxray.model.multi_lora`).

The engine's process (the driver) holds the scheduler and the output processor and no weights; each plan step
goes to every worker (plain data: token ids, positions, block tables, slots), all workers run the same forward,
the layers' all-reduces run over the workers' process group (gloo on CPUs, NCCL on GPUs), and rank 0 returns
the gathered vocabulary-parallel logits. Workers hold no request state.

Workers are started by a launcher: `ProcessLauncher` (local processes, `torch.multiprocessing` spawn, each
talking to the driver over a pipe: `neoxray generate/score/eval`, benchmarks, GPU machines without Ray), or Ray
actors in a placement group (`neoxray.platform.serve.tp_workers`, for Serve replicas). A worker that dies fails
the engine's next step (`EngineDead`), so its requests end with an error and Serve replaces the replica.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from neoxray.errors import NeoxrayError
from neoxray.platform.inference.executor import Executor
from neoxray.platform.inference.kv_cache import PagedKVCache
from neoxray.platform.inference.model_runner import ModelRunner
from neoxray.platform.inference.request import EngineDead
from neoxray.platform.inference.sequence import ForwardBatch, ForwardResult

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("NEOXRAY_TP_TIMEOUT_S", "300")))
"""How long a collective waits for a worker before failing (a worker that died usually fails it at once)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to build its shard (plain data: it travels to processes and Ray actors)."""

    model: str
    """What `--model` named: a local path every worker reads, or a URI each worker's node reads through its
    model cache."""
    tp_size: int
    device: str  # cpu | cuda
    dtype: str  # torch dtype name, e.g. float32
    num_blocks: int
    block_size: int
    init_method: str = ""
    """Where the workers meet: tcp://HOST:PORT on rank 0's node (the launcher sets it)."""
    max_loras: int = 0
    max_lora_rank: int = 0
    quantization: str | None = None

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


def free_address(host: str = "127.0.0.1") -> str:
    """tcp://HOST:PORT with a port free now on this node."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class Worker:
    """One rank: its process group and its shard's model runner (in a worker process or a Ray actor)."""

    def __init__(self, spec: WorkerSpec, rank: int, local_device: str | None = None):
        device = local_device or spec.device
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        else:  # the node's cores shared between the workers, not each worker's threads fighting for all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.tp_size))
        dist.init_process_group(
            spec.backend, init_method=spec.init_method, rank=rank, world_size=spec.tp_size, timeout=TIMEOUT
        )
        self.rank = rank
        from neoxray.platform.model_loading import load_shard

        model = load_shard(spec.model, dist.group.WORLD, device, getattr(torch, spec.dtype))
        if spec.quantization:
            from neoxray.platform.inference.quantization import quantize_weights

            quantize_weights(model, spec.quantization)
        cache = PagedKVCache.for_model(model, spec.num_blocks, spec.block_size)
        self.runner = ModelRunner(model, cache, spec.max_loras, spec.max_lora_rank)

    def call(self, cmd: str, arg: tuple):
        """Run one of the runner's methods; only rank 0's result goes back (the others' are the same)."""
        out = getattr(self.runner, cmd)(*arg)
        if self.rank != 0:
            return None
        if isinstance(out, ForwardResult):  # to the driver's memory, where sampling happens
            out = ForwardResult(None if out.logits is None else out.logits.cpu(), [t.cpu() for t in out.score_logprobs])
        return out

    def reply(self, cmd: str, arg: tuple) -> tuple:
        """("ok", `call`'s result) or ("error", the exception, picklable): what goes back to the driver."""
        try:
            return ("ok", self.call(cmd, arg))
        except BaseException as e:
            return ("error", portable_error(e))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_main(spec: WorkerSpec, rank: int, local_device: str | None, conn) -> None:
    """A worker process's whole life: build the shard, then answer the driver's commands until `stop`. Every
    reply is ("ok", result) or ("error", exception)."""
    try:
        worker = Worker(spec, rank, local_device)
    except BaseException as e:
        conn.send(("error", portable_error(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:  # the driver went away
            break
        if cmd == "stop":
            break
        conn.send(worker.reply(cmd, arg))
    worker.close()


def portable_error(e: BaseException) -> BaseException:
    """`e` if it survives pickling (NeoxrayError and its kind do), else a RuntimeError with its repr."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(repr(e))


class ProcessLauncher:
    """Every rank as a local process (spawned: a fresh interpreter each), talking to the driver over a pipe.
    On GPUs rank r takes cuda:r."""

    def launch(self, spec: WorkerSpec) -> list:
        import torch.multiprocessing as mp

        if spec.device.startswith("cuda") and torch.cuda.device_count() < spec.tp_size:
            raise NeoxrayError(
                f"--tensor-parallel-size {spec.tp_size}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
        spec = dataclasses.replace(spec, init_method=spec.init_method or free_address())
        ctx = mp.get_context("spawn")
        handles = []
        for rank in range(spec.tp_size):
            device = f"cuda:{rank}" if spec.device.startswith("cuda") else None
            ours, theirs = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(spec, rank, device, theirs), name=f"neoxray-tp-{rank}", daemon=True
            )
            p.start()
            theirs.close()
            handles.append(ProcessHandle(p, ours, rank))
        return handles


class ProcessHandle:
    """The driver's end of one worker process."""

    def __init__(self, proc, conn, rank: int):
        self.proc, self.conn, self.rank = proc, conn, rank

    def send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionError, OSError):
            raise EngineDead(self.dead() or f"tensor-parallel worker {self.rank} is unreachable") from None

    def recv(self):
        while not self.conn.poll(0.5):  # a worker killed mid-forward never answers: notice it
            if not self.proc.is_alive() and not self.conn.poll(0):
                raise EngineDead(self.dead())
        try:
            return self.conn.recv()
        except (EOFError, ConnectionError, OSError):
            raise EngineDead(self.dead() or f"tensor-parallel worker {self.rank} is unreachable") from None

    def dead(self) -> str | None:
        """None while alive; else what happened to it."""
        return None if self.proc.is_alive() else f"tensor-parallel worker {self.rank} exited ({self.proc.exitcode})"

    def stop(self, timeout: float = 10.0) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


class TensorParallelExecutor(Executor):
    """N workers started by `launcher` (`ProcessLauncher` by default); this process holds no weights. Logits
    come back to this process's memory, where the engine samples."""

    def __init__(self, spec: WorkerSpec, launcher=None, model_config=None):
        self.spec = spec
        self.tensor_parallel_size = spec.tp_size
        self.workers = (launcher or ProcessLauncher()).launch(spec)
        # the workers go when this executor does, even if nobody calls shutdown (an engine dropped unstopped)
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers)
        try:
            self._gather([w.recv() for w in self.workers])  # every shard loaded (or the first failure, raised)
            info = self._call("describe")
        except BaseException:
            self.shutdown()
            raise
        self.info = info
        self.model_config, self.num_blocks = model_config, spec.num_blocks
        self.dtype, self.device = getattr(torch, spec.dtype), torch.device("cpu")
        self.mixed_forwards = 0

    @staticmethod
    def _gather(replies: list) -> object:
        for kind, value in replies:
            if kind == "error":
                raise value
        return replies[0][1]

    def _call(self, cmd: str, *arg):
        """Send a command to every worker, wait for all of them, return rank 0's result (or raise the first
        worker's error)."""
        for w in self.workers:
            w.send((cmd, arg))
        return self._gather([w.recv() for w in self.workers])

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        if self.spec.max_loras:
            self.mixed_forwards += len(set(batch.lora_slots)) > 1
        return self._call("execute", batch)

    def load_lora(self, slot: int, adapter) -> None:
        self._call("load_lora", slot, adapter)  # every worker checks it whole before changing its slot

    def unload_lora(self, slot: int) -> None:
        self._call("unload_lora", slot)

    def embed(self, token_lists: Sequence[Sequence[int]], slot: int | None):
        return self._call("embed", [list(t) for t in token_lists], slot)

    def check_alive(self) -> None:
        for w in self.workers:
            why = w.dead()
            if why is not None:
                raise EngineDead(why)

    def shutdown(self) -> None:
        self._finalizer()

    def describe(self) -> dict:
        return {"tensor_parallel_size": self.spec.tp_size, **self.info}


def _stop_workers(workers: list) -> None:
    """Tell every worker to stop, then make sure each has (a worker already gone is stopped anyway)."""
    for w in workers:
        with contextlib.suppress(Exception):
            w.send(("stop", ()))
    for w in workers:
        with contextlib.suppress(Exception):
            w.stop()
