"""Models, checkpoints and runs named by a URI (`--model s3://bucket/model`), read through a node-local cache.

`local_model(uri)` finds what the URI holds (a Hugging Face directory: config.json; a checkpoint: meta.json; a
run directory: its newest complete checkpoint), and returns a local folder with its files, downloaded once per
node into `NEOXRAY_MODEL_CACHE` (default `~/.cache/neoxray/models`). The folder is keyed by the URI and the
files' identity (a checkpoint's meta.json, which holds every file's sha256; a Hugging Face directory's file
sizes and modification times), so a model written again under the same URI is downloaded again, never served
stale. Processes of one node (serve replicas, evaluation actors) share it: the first fills it under a lock,
saying what it downloads, and the others wait; a checkpoint's files are checked against their checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.paths import is_uri
from neoxray.platform.checkpoint_format import META
from neoxray.platform.run_store import (
    FETCHED,
    STORE_ENV,
    RunStore,
    fetch_checkpoint,
    node_lock,
    store_checkpoints,
)

CACHE_ENV = "NEOXRAY_MODEL_CACHE"


def forwarded_env() -> dict[str, str]:
    """What a driver passes on to the processes it starts (training workers, evaluation tasks, Serve replicas)
    from its own environment: the object-storage endpoint and credentials (`run_store.STORE_ENV`) and where
    nodes cache models."""
    return {k: v for k, v in os.environ.items() if k in (*STORE_ENV, CACHE_ENV)}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "neoxray" / "models").expanduser()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pin_model_uri(uri: str, what: str = "--model") -> tuple[str, str]:
    """What the URI `uri` holds, pinned: ("hf", uri) for a Hugging Face directory, ("checkpoint", uri) for a
    checkpoint, and for a run directory ("checkpoint", the URI of its newest complete checkpoint), so that every
    node of a run reads the same one. A URI that holds no model is a NeoxrayError naming `what`."""
    store = RunStore(str(uri))
    names = store.names()
    if not names:
        raise NeoxrayError(f"{what} {store.uri}: nothing there (or it cannot be listed)")
    if "config.json" in names:
        return "hf", store.uri
    if META in names:
        return "checkpoint", store.uri
    for name, _, problem in store_checkpoints(store):
        if problem is None:
            return "checkpoint", store.path(name)
    raise NeoxrayError(
        f"{what} {store.uri}: not a Hugging Face model directory (no config.json), a neoxray checkpoint (no "
        f"{META}) or a run directory with a complete checkpoint"
    )


def local_model(path, what: str = "--model"):
    """`path` unchanged when it is local; for a URI, the local cached copy of what it holds (see the module
    docstring). A URI that holds no model is a NeoxrayError naming `what`."""
    if not is_uri(str(path)):
        return path
    kind, uri = pin_model_uri(str(path), what)
    if kind == "hf":
        return _fetch_files(RunStore(uri), "", what)
    parent, name = uri.rsplit("/", 1)
    return _fetch_checkpoint(RunStore(parent), name, what)


def local_adapter(path, what: str = "--lora"):
    """`path` unchanged when it is local; for a URI, the local cached copy of the peft adapter directory it
    names (adapter_config.json and the weights), filled once per node like a model's."""
    if not is_uri(str(path)):
        return path
    from neoxray.model.peft_format import ADAPTER_CONFIG

    store = RunStore(str(path))
    names = store.names()
    if ADAPTER_CONFIG not in names:
        found = "nothing there (or it cannot be listed)" if not names else f"no {ADAPTER_CONFIG}"
        raise NeoxrayError(f"{what} {store.uri}: {found}; a LoRA adapter is a peft directory with {ADAPTER_CONFIG}")
    return _fetch_files(store, "", what)


def _folder(uri: str, identity: str, depth: int) -> Path:
    """The cache folder of `uri`: KEY/ and the URI's last `depth` names (a checkpoint keeps its run's name, so the
    model's default name is the same as from a local copy)."""
    key = hashlib.sha256(f"{uri}\n{identity}".encode()).hexdigest()[:16]
    names = uri.split("://", 1)[1].strip("/").split("/")
    return cache_root().joinpath(key, *names[-depth:])


def _fetch_checkpoint(store: RunStore, name: str, what: str) -> Path:
    meta_text = store.read_text(f"{name}/{META}") or ""
    local = _folder(store.path(name), meta_text, depth=2)
    if not (local / FETCHED).exists():
        size = sum(e.get("bytes", 0) for e in json.loads(meta_text).get("files", {}).values())
        _say(f"[neoxray] {what} {store.path(name)}: downloading {size / 2**20:,.1f} MiB into the cache {local}")
    return fetch_checkpoint(store, name, local)


def _fetch_files(store: RunStore, rel: str, what: str) -> Path:
    """Every file under `rel` into a cache folder keyed by their names, sizes and modification times."""
    listing = store.files(rel, with_mtime=True)
    local = _folder(store.path(rel), json.dumps(sorted(listing.items())), depth=1)
    with node_lock(local.parent / f".{local.name}.lock"):
        if (local / FETCHED).exists():
            return local
        total = sum(size for size, _ in listing.values())
        _say(f"[neoxray] {what} {store.path(rel)}: downloading {len(listing)} files, {total / 2**20:,.1f} MiB")
        for i, (name, (size, _)) in enumerate(sorted(listing.items()), 1):
            store.download(f"{rel}/{name}" if rel else name, local / name)
            if (local / name).stat().st_size != size:
                raise NeoxrayError(
                    f"{store.path(rel, name)}: downloaded {(local / name).stat().st_size} bytes of {size}"
                )
            _say(f"[neoxray]   {i}/{len(listing)} {name} ({size / 2**20:,.1f} MiB)")
        (local / FETCHED).touch()
    return local
