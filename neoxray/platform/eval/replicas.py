"""`neoxray eval --replicas N`: N inference engines as Ray actors, each loading the model as `neoxray serve` does
(`--num-gpus G` each), with the requests of every lm-eval call spread over them.

The driver (the lm-eval backend, `neoxray.platform.eval.lm`) keeps the tokenizer (its tokenizer.json comes from
a replica, so the driver needs no access to the model's files) and hands each call's requests, already in
submission order, to the replicas in contiguous chunks, several per replica, so that a replica that finishes
early takes the next chunk. A chunk never splits the requests of one context (their shared prefix stays on one
engine). Each request is computed by exactly one engine, the same way whatever the replica count, so results
equal one replica's (up to floating-point noise from different batch compositions).

The cluster: `address` / RAY_ADDRESS (a `ray start` cluster, the cluster of a `ray job submit`), else a local
one started here (`neoxray.ray_connection.connect_ray`), which `close` shuts down again.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

from neoxray.errors import NeoxrayError, find_user_error
from neoxray.platform.eval.runner import EngineOptions, GenItem, ModelInfo, Progress, ScoreItem

CHUNKS_PER_REPLICA = 4
"""Chunks of one call's requests per replica: enough that replicas finish together, few enough to batch well."""


class EngineReplica:
    """The actor: one `EngineRunner` (model and engine) in its own process."""

    def __init__(self, model_path: str, options: EngineOptions):
        from neoxray.platform.eval.runner import EngineRunner

        self.runner = EngineRunner(model_path, options)

    def info(self) -> ModelInfo:
        return self.runner.info()

    def score(self, items: list[ScoreItem]) -> list[tuple[float, bool]]:
        return self.runner.score(items)

    def generate(self, items: list[GenItem]) -> list[list[int]]:
        return self.runner.generate(items)


def chunk_bounds(items: Sequence, n_chunks: int, same_group=None) -> list[tuple[int, int]]:
    """[start, end) ranges cutting `items` into at most n_chunks contiguous, nearly equal chunks; a cut never
    falls between two items for which same_group(a, b) holds."""
    n = len(items)
    size = max(1, -(-n // max(1, n_chunks)))
    bounds, start = [], 0
    while start < n:
        end = min(n, start + size)
        while same_group is not None and 0 < end < n and same_group(items[end - 1], items[end]):
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


class RayEngines:
    """`replicas` engine actors on a Ray cluster, with `EngineRunner`'s interface (info, score, generate)."""

    def __init__(
        self,
        model_path: str,
        options: EngineOptions,
        replicas: int,
        num_gpus: float = 0,
        address: str | None = None,
        verbose: bool = False,
    ):
        from neoxray.model.tokenizer import Tokenizer
        from neoxray.ray_connection import connect_ray, started_here

        if num_gpus < 0:
            raise NeoxrayError(f"--num-gpus must be >= 0, got {num_gpus}")
        self._started_here = started_here(address) and not _ray_initialized()
        ray = connect_ray(address, verbose=verbose)
        self._ray = ray
        _say_if_short(ray, replicas, num_gpus)
        actor = ray.remote(EngineReplica).options(num_cpus=1, num_gpus=num_gpus, max_restarts=0)
        self.actors = [actor.remote(model_path, options) for _ in range(replicas)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except Exception as e:
            self.close()
            err = find_user_error(e)
            if err is not None:
                raise err from None
            raise NeoxrayError(f"an engine replica failed to start: {str(e).strip().splitlines()[0]}") from None
        self._info = infos[0]
        import tokenizers

        self.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(self._info.tokenizer_json), source=model_path)

    def info(self) -> ModelInfo:
        return self._info

    def score(self, items: Sequence[ScoreItem], progress: Progress = None) -> list[tuple[float, bool]]:
        return self._map("score", items, progress, same_group=lambda a, b: a.context == b.context)

    def generate(self, items: Sequence[GenItem], progress: Progress = None) -> list[list[int]]:
        return self._map("generate", items, progress)

    def _map(self, method: str, items: Sequence, progress: Progress, same_group=None) -> list:
        """Run items' chunks on the replicas (a free replica takes the next chunk); results in items' order."""
        from ray.util import ActorPool

        bounds = chunk_bounds(items, len(self.actors) * CHUNKS_PER_REPLICA, same_group)
        pool = ActorPool(self.actors)
        out: list = []
        try:
            chunks = pool.map(lambda a, b: getattr(a, method).remote(list(items[b[0] : b[1]])), bounds)
            for (start, end), result in zip(bounds, chunks):
                out.extend(result)
                if progress is not None:
                    progress(end - start)
        except Exception as e:
            err = find_user_error(e)
            if err is not None:
                raise err from None
            raise
        return out

    def close(self) -> None:
        """End the actors; shut down a local cluster that this object started."""
        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):  # an actor that is already gone
                self._ray.kill(a)
        self.actors = []
        if self._started_here:
            self._ray.shutdown()


def _say_if_short(ray, replicas: int, num_gpus: float) -> None:
    """Tell the user when the cluster has fewer CPUs or GPUs than the replicas need (they would wait, placed
    only when an autoscaling cluster adds nodes)."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if replicas > cpus or replicas * num_gpus > gpus:
        print(
            f"[neoxray] {replicas} replica(s) need {replicas} CPU(s) and {replicas * num_gpus:g} GPU(s); the cluster "
            f"has {cpus:g} CPU(s) and {gpus:g} GPU(s): waiting for nodes to be added",
            file=sys.stderr,
            flush=True,
        )


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()
