"""Connecting to Ray, for every driver (`neoxray train`, `neoxray serve`): join the cluster named by `--address`
or RAY_ADDRESS (a `ray start` cluster, or the cluster of a `ray job submit`), else start a local one.

A local cluster is started with token authentication on by our choice (RAY_AUTH_MODE=token, set before Ray is
imported: the CLI calls `require_token_auth` first thing; Ray keeps or creates the token in ~/.ray/auth_token,
which `ray get-auth-token` prints), the dashboard
on 127.0.0.1, and no Ray Client server. Quiet by default: Ray's own log lines and the workers' output reach the
console only with `verbose` (the drivers print what a person needs: progress, the dashboard's address, errors).
"""

from __future__ import annotations

import logging
import os
import sys

_dashboard: dict[str, str | None] = {"url": None}


def connect_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False):
    """Join `address` / RAY_ADDRESS, or start a local cluster (with `num_cpus` logical CPUs); returns `ray`.
    Already connected (a Ray job's driver, a test session): nothing changes."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        require_token_auth()
    import ray

    if ray.is_initialized():
        return ray
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address:
        context = ray.init(address=address, **quiet)
    else:
        # "local": a new cluster of our own, never the newest `ray start` cluster on the machine (Ray's default)
        context = ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", **quiet)
    _dashboard["url"] = getattr(context, "dashboard_url", None) or None
    return ray


def require_token_auth() -> None:
    """Token authentication for a cluster this process starts, by our choice: RAY_AUTH_MODE=token unless the
    environment says otherwise. Ray reads the mode once, when it is imported, so this must run first; where Ray
    is already imported (a test session, a library caller), its own default for a new local cluster is token
    authentication too."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def started_here(address: str | None = None) -> bool:
    """True when `connect_ray(address)` starts (or started) a cluster of its own rather than joining one."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def dashboard_url() -> str:
    """The Ray dashboard's address as the cluster reported it when this process connected, with how to sign in
    (the cluster's token), or a hint."""
    url = _dashboard["url"]
    if not url:
        return "not known to this process (`ray status` on the head node shows it; port 8265 by default)"
    url = url if url.startswith("http") else f"http://{url}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return f"{url} (sign in with the cluster's token: `ray get-auth-token`)"
    return url
