"""The LoRA adapters of one inference engine: names -> slots of a `neoxray.model.multi_lora.MultiLoRA` wrapped
around the engine's model, with the bookkeeping serving needs.

- `add(name, adapter)` puts a peft adapter (`neoxray.model.peft_format.read_peft_adapter`) into a free slot.
  When every slot is taken, the least recently used idle adapter (no request running or waiting on it) is
  evicted to make room; when none is idle, `AdapterBusy`.
- `remove(name)` frees a slot (`AdapterBusy` while requests use it); an unknown name is `UnknownAdapter`.
- `acquire(name)` / `release(slot)` count the requests of each adapter from intake to their end and mark it
  used (the LRU order); the model runners bind each batch row's slot before a forward.
- `prefix_salt(name)`: what the prefix cache chains a request's block names from, so that KV blocks are shared
  only between requests of the same loaded adapter (a name reloaded with other weights gets a new salt).

Used on the engine thread only, except `names()` / `known()`, which read a snapshot from any thread.
"""

from __future__ import annotations

import time

from neoxray.errors import NeoxrayError
from neoxray.platform.inference.request import AdapterBusy, InvalidRequest, UnknownAdapter


class AdapterSlots:
    """Up to `max_loras` adapters of rank at most `max_rank`, in the slots the executor's model runners hold
    (their models are wrapped when max_loras > 0). The names, counts and eviction live here, on the engine's
    driver; the tensors live with the workers."""

    def __init__(self, executor, max_loras: int, max_rank: int):
        self.max_loras, self.max_rank = max_loras, max_rank
        self.executor = executor
        """Puts adapters into the slots of every worker's model (`neoxray.platform.inference.executor`)."""
        self.slot: dict[str, int] = {}  # name -> slot
        self.source: dict[str, str] = {}  # name -> where it was read from
        self.users: dict[str, int] = {}  # name -> requests taken in and not yet ended
        self.last_used: dict[str, float] = {}
        self.salt: dict[str, bytes] = {}
        self._loads = 0
        self.evictions = 0

    # -- any thread -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The loaded adapters' names, in load order (a snapshot)."""
        return list(dict(self.slot))

    def known(self, name: str) -> bool:
        return name in self.slot

    def describe(self) -> list[dict]:
        """[{name, source, slot, requests}] of each loaded adapter (a snapshot)."""
        return [
            {"name": n, "source": self.source.get(n), "slot": s, "requests": self.users.get(n, 0)}
            for n, s in dict(self.slot).items()
        ]

    # -- the engine thread ------------------------------------------------------------------------------------
    def add(self, name: str, adapter, source: str | None = None) -> list[str]:
        """Load `adapter` (a LoRAAdapter) as `name`; returns the names evicted to make room."""
        if self.max_loras == 0:
            raise InvalidRequest(
                "this server holds no LoRA adapters (start it with max_loras > 0 to load some)", "lora_name"
            )
        if not name or not isinstance(name, str):
            raise InvalidRequest("lora_name must be a non-empty string", "lora_name")
        if name in self.slot:
            raise InvalidRequest(
                f"LoRA adapter {name!r} is already loaded (unload it first to replace it)", "lora_name"
            )
        ranks = [adapter.rank(p) for p in adapter.modules()]
        if max(ranks, default=0) > self.max_rank:
            raise InvalidRequest(
                f"LoRA adapter {name!r} has rank {max(ranks)}, more than this server's max_lora_rank {self.max_rank}",
                "lora_path",
            )
        victim = None
        if len(self.slot) >= self.max_loras:
            idle = [n for n in self.slot if self.users.get(n, 0) == 0]
            if not idle:
                raise AdapterBusy(
                    f"cannot load LoRA adapter {name!r}: all {self.max_loras} adapter slots hold adapters with "
                    "requests running or waiting; retry when one is idle, or unload one"
                )
            victim = min(idle, key=lambda n: self.last_used.get(n, 0.0))
            slot = self.slot[victim]
        else:
            slot = min(set(range(self.max_loras)) - set(self.slot.values()))
        try:
            self.executor.load_lora(slot, adapter)  # checked whole before the slot changes: a refusal evicts nothing
        except NeoxrayError as e:
            raise InvalidRequest(f"LoRA adapter {name!r}: {e}", "lora_path") from None
        evicted = []
        if victim is not None:  # its slot now holds the new adapter
            self._forget(victim)
            self.evictions += 1
            evicted.append(victim)
        self._loads += 1
        self.salt[name] = f"lora:{name}:{self._loads}".encode()
        self.source[name] = source or name
        self.users.setdefault(name, 0)
        self.last_used[name] = time.monotonic()
        self.slot[name] = slot
        return evicted

    def remove(self, name: str) -> None:
        if name not in self.slot:
            raise UnknownAdapter(f"LoRA adapter {name!r} is not loaded", "lora_name")
        n = self.users.get(name, 0)
        if n:
            raise AdapterBusy(f"LoRA adapter {name!r} has {n} request(s) running or waiting; retry when they finish")
        self._drop(name)

    def _drop(self, name: str) -> None:
        self.executor.unload_lora(self.slot[name])
        self._forget(name)

    def _forget(self, name: str) -> None:
        for d in (self.slot, self.source, self.users, self.last_used, self.salt):
            d.pop(name, None)

    def acquire(self, name: str | None) -> tuple[int | None, bytes]:
        """A request of adapter `name` (None: the base) is taken in: (its slot, its prefix-cache salt)."""
        if name is None:
            return None, b""
        if name not in self.slot:
            raise UnknownAdapter(unknown_message(name), "model")
        self.users[name] += 1
        self.last_used[name] = time.monotonic()
        return self.slot[name], self.salt[name]

    def release(self, name: str | None) -> None:
        if name is not None and name in self.users:
            self.users[name] = max(0, self.users[name] - 1)
            self.last_used[name] = time.monotonic()


def unknown_message(name: str) -> str:
    return f"model {name!r} does not exist (no such LoRA adapter is loaded); GET /v1/models lists what is served"
