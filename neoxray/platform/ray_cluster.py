"""Connecting to Ray, for every driver (`neoxray train`, `neoxray serve`): join the cluster named by `--address`
or RAY_ADDRESS (a `ray start` cluster, or the cluster of a `ray job submit`), else start a local one."""

from __future__ import annotations

import os

_dashboard: dict[str, str | None] = {"url": None}


def connect_ray(address: str | None = None, num_cpus: int | None = None):
    """Join `address` / RAY_ADDRESS, or start a local cluster (with `num_cpus` logical CPUs); returns `ray`.
    Already connected (a Ray job's driver, a test session): nothing changes."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    context = (
        ray.init(address=address, log_to_driver=True) if address else ray.init(num_cpus=num_cpus, log_to_driver=True)
    )
    _dashboard["url"] = getattr(context, "dashboard_url", None) or None
    return ray


def started_here(address: str | None = None) -> bool:
    """True when `connect_ray(address)` starts (or started) a cluster of its own rather than joining one."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def dashboard_url() -> str:
    """The Ray dashboard's address as the cluster reported it when this process connected, or a hint."""
    url = _dashboard["url"]
    if not url:
        return "not known to this process (see `ray status` or the cluster's head node, port 8265 by default)"
    return url if url.startswith("http") else f"http://{url}"
