"""Tensor-parallel workers of a Serve model replica, as Ray actors in the replica's placement group.

A replica with `tensor_parallel_size` N is deployed with N + 1 bundles (`placement_group_bundles`: the
replica's own, then one per worker with `num_gpus` GPUs and `worker_num_cpus` CPUs; `placement_strategy` PACK
or STRICT_PACK), as Ray Serve LLM places vLLM's workers. The replica holds the engine (scheduler, output
processor) and no weights; `RayActorLauncher` starts one `TPWorkerActor` per bundle after the first, each
building its shard (`neoxray.platform.inference.tp_executor.Worker`), and hands the executor one handle per
actor. A worker actor that dies fails the engine's next step; the replica's health check then fails and Serve
replaces the replica (with a new placement group and new workers).
"""

from __future__ import annotations

import dataclasses

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from neoxray.errors import NeoxrayError
from neoxray.platform.inference.request import EngineDead
from neoxray.platform.inference.tp_executor import Worker, WorkerSpec, free_address, portable_error


def placement_bundles(tp: int, num_cpus: float, num_gpus: float, worker_num_cpus: float) -> list[dict]:
    """The replica's bundle (its driver: CPUs only; Ray refuses an all-zero bundle, so at least 0.01), then one
    per tensor-parallel worker."""
    worker = {"CPU": max(worker_num_cpus, 0.01), **({"GPU": num_gpus} if num_gpus else {})}
    return [{"CPU": max(num_cpus, 0.01)}] + [dict(worker) for _ in range(tp)]


@ray.remote
class TPWorkerActor:
    """One tensor-parallel rank in a Ray actor: `address` (for rank 0: where the ranks meet), `start` (build the
    shard; returns when every rank has joined), `call` (one runner command)."""

    def __init__(self):
        self.worker = None

    def address(self) -> str:
        return free_address(ray.util.get_node_ip_address())

    def start(self, spec: WorkerSpec, rank: int):
        try:
            self.worker = Worker(spec, rank)
        except BaseException as e:
            return ("error", portable_error(e))
        return ("ok", None)

    def call(self, cmd: str, arg: tuple):
        if cmd == "stop":
            if self.worker is not None:
                self.worker.close()
            return ("ok", None)
        return self.worker.reply(cmd, arg)


def check_placement(bundles: list[dict], strategy: str, nodes: list[dict]) -> None:
    """A NeoxrayError (one line, before anything is deployed) when no placement of `bundles` exists on the
    cluster's alive `nodes` (`ray.nodes()`): Serve would otherwise wait for it for ever."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
    if strategy == "STRICT_PACK":
        if not any(all(res.get(k, 0) >= v for k, v in need.items()) for res in alive):
            raise NeoxrayError(
                f"placement group: no node has {need['CPU']:g} CPUs and {need['GPU']:g} GPUs for a replica "
                f"of {len(bundles) - 1} tensor-parallel workers with STRICT_PACK (PACK may spread it over nodes)"
            )
        return
    for k, v in need.items():
        have = sum(res.get(k, 0) for res in alive)
        if have < v:
            raise NeoxrayError(
                f"placement group: a replica of {len(bundles) - 1} tensor-parallel workers needs {v:g} {k}s, "
                f"the cluster has {have:g}"
            )
    if need["GPU"] and not all(any(res.get("GPU", 0) >= b.get("GPU", 0) for res in alive) for b in bundles):
        raise NeoxrayError("placement group: no node has the GPUs one tensor-parallel worker asks for")


class RayActorLauncher:
    """Starts a replica's workers in its placement group (bundle i + 1 for rank i)."""

    def __init__(self, gpus_per_worker: float, cpus_per_worker: float):
        self.gpus, self.cpus = gpus_per_worker, cpus_per_worker

    def launch(self, spec: WorkerSpec) -> list:
        pg = ray.util.get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < spec.tp_size + 1:
            raise NeoxrayError(
                f"--tensor-parallel-size {spec.tp_size}: this replica has no placement group with "
                f"{spec.tp_size + 1} bundles (deploy it with neoxray.platform.serve.app.build_app)"
            )
        actors = [
            TPWorkerActor.options(
                num_cpus=self.cpus,
                num_gpus=self.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank + 1
                ),
                name=None,
            ).remote()
            for rank in range(spec.tp_size)
        ]
        spec = dataclasses.replace(spec, init_method=ray.get(actors[0].address.remote()))
        return [ActorHandle(actor, rank, actor.start.remote(spec, rank)) for rank, actor in enumerate(actors)]


class ActorHandle:
    """The driver's end of one worker actor (`send` then `recv`, as `ProcessHandle`)."""

    def __init__(self, actor, rank: int, pending):
        self.actor, self.rank, self.pending = actor, rank, pending
        self.gone: str | None = None

    def send(self, msg) -> None:
        if self.gone:
            raise EngineDead(self.gone)
        self.pending = self.actor.call.remote(*msg)

    def recv(self):
        try:
            return ray.get(self.pending)
        except ray.exceptions.RayActorError as e:
            self.gone = f"tensor-parallel worker {self.rank} died ({type(e).__name__})"
            raise EngineDead(self.gone) from None

    def dead(self) -> str | None:
        return self.gone

    def stop(self, timeout: float = 10.0) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            ray.get(self.pending, timeout=timeout)
        with contextlib.suppress(Exception):
            ray.kill(self.actor)
