"""A world of CPU processes joined by gloo, for tests of distributed code against a single-process reference.

Each world is spawned once (a module's fixture); in every process, `make_checks(rank, world)` creates the process
groups the checks need (every rank creates every group, in the same order) and returns {name: (fn, *args)}; every
check runs on every rank, and each rank writes its results after every check, so a check that fails inside a
collective still leaves what finished. One pytest test per check then reads every rank's result
(`assert_passed`). Checks compare with `Soft`, which collects mismatches and raises them at the end, so a rank
that finds a difference still takes part in the collectives that follow.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neoxray.model.tensor_parallel import group_size

GLOO_TIMEOUT_S = 200
"""gloo's timeout, for the rendezvous and every collective (the barrier after each check too): ranks that start
on a loaded machine can arrive long apart, so it is generous; a rank that fails inside a collective still ends
the world this long after, well before the world's deadline, and the world's error is reported."""
WORLD_DEADLINE_S = 600
"""A failure guard for a whole world (spawning returns as soon as every rank is done): a world that hangs
outside gloo's reach is ended and reported."""

Checks = Callable[[int, int], dict[str, tuple]]
"""(rank, world size) -> {check name: (function, *args)}; a module-level function (it is pickled by name)."""


class Soft:
    """Collects failed comparisons and raises them at the end of a check, so that a rank that finds a
    difference still takes part in the collectives that follow (else the other ranks would wait forever)."""

    def __init__(self):
        self.errors: list[str] = []

    def close(self, actual, expected, what: str, **tol):
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as e:
            self.errors.append(f"{what}: {e}")

    def true(self, ok: bool, what: str):
        if not ok:
            self.errors.append(what)

    def check(self):
        if self.errors:
            raise AssertionError(f"{len(self.errors)} mismatches:\n" + "\n".join(self.errors[:12]))


def all_equal_across_ranks(t: torch.Tensor, group) -> bool:
    parts = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return all(torch.equal(p, t) for p in parts)


def _worker(rank: int, world: int, tmp: str, make_checks: Checks) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=GLOO_TIMEOUT_S),
    )
    results, times = {}, {}
    for name, (fn, *args) in make_checks(rank, world).items():
        t0 = time.perf_counter()
        try:
            fn(*args)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
        times[name] = time.perf_counter() - t0
        # written after every check: if a rank fails inside a collective the others time out (GLOO_TIMEOUT_S)
        # and the world dies, but what finished is still reported, and the rest is reported as unfinished
        Path(tmp, f"rank{rank}.json").write_text(json.dumps({"results": results, "times": times}))
        dist.barrier()
    dist.destroy_process_group()


def spawn_world(n: int, make_checks: Checks, deadline_s: float = WORLD_DEADLINE_S) -> list[dict]:
    """Spawn a gloo world of n CPU processes that runs every check on every rank; returns each rank's
    {"results": {check: None or its traceback}, "times": {check: seconds}, "died": None or why the world died}."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_worker, args=(n, tmp, make_checks), nprocs=n, join=False)
        deadline, died = time.monotonic() + deadline_s, None
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    died = f"did not finish in {deadline_s} s"
                    break
        except Exception as e:  # a rank raised outside a check (e.g. a collective timed out): others are ended
            died = str(e)
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        out = []
        for r in range(n):
            f = Path(tmp, f"rank{r}.json")
            out.append({**(json.loads(f.read_text()) if f.exists() else {"results": {}, "times": {}}), "died": died})
        return out


def assert_passed(ranks: list[dict], check: str) -> None:
    """`check` passed on every rank of a world `spawn_world` returned."""
    failures = [
        f"rank {r}:\n{res['results'][check]}"
        if check in res["results"]
        else f"rank {r} never finished this check; the world died: {res['died']}"
        for r, res in enumerate(ranks)
        if res["results"].get(check, "missing")
    ]
    assert not failures, "\n".join(failures)
