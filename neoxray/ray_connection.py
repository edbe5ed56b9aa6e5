"""Connecting to Ray, the one way every driver does it (`neoxray train`, `serve`, `eval` and `prepare`): join the
cluster named by `--address` or RAY_ADDRESS (a `ray start` cluster, or the cluster of a `ray job submit`), else
start a local one. It sits beside `neoxray.errors`, below the pipelines and the platform, so that both use it.

A local cluster that neoxray starts is closed to the network as far as Ray allows, by our choice:

- its node address is the loopback address, so that every port it opens (GCS, raylet and object manager, each
  worker's, the dashboard agent's and the runtime-env agent's, the metrics export port, the dashboard's and the
  autoscaler's metrics ports) listens on 127.0.0.1 only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's switch for a
  machine-local Ray (without it Ray replaces a loopback node address with the machine's, in
  `services.resolve_ip_for_localhost`, and its servers bind every interface);
- token authentication: RAY_AUTH_MODE=token (Ray keeps or creates the token in ~/.ray/auth_token, which
  `ray get-auth-token` prints);
- the dashboard on 127.0.0.1, and no Ray Client server.

Ray reads both variables once, when it is imported: `prepare_local_cluster` sets them and must run before
anything imports Ray (the CLI calls it first thing; `connect_ray` calls it too, for callers that have not imported
Ray yet). A cluster that neoxray joins keeps its own settings (docs/reliability.md lists what guards each port).
Quiet by default: Ray's own log lines and the workers' output reach the console only with `verbose` (the drivers
print what a person needs: progress, the dashboard's address, errors).
"""

from __future__ import annotations

import logging
import os
import sys

LOCAL_CLUSTER_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""What a local cluster that neoxray starts is started with (unless the environment already says otherwise):
token authentication, and its node address on the loopback interface."""

_dashboard: dict[str, str | None] = {"url": None}


def connect_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False):
    """Join `address` / RAY_ADDRESS, or start a local cluster (with `num_cpus` logical CPUs; default: the
    machine's); returns `ray`. Already connected (a Ray job's driver, a test session): nothing changes."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        prepare_local_cluster()
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


def prepare_local_cluster() -> None:
    """Set `LOCAL_CLUSTER_ENV` for a cluster this process may start, unless the environment says otherwise. Ray
    reads these once, when it is imported, so this must run first; where Ray is already imported (a test session,
    a library caller), a new local cluster gets Ray's own defaults: token authentication, every interface."""
    if "ray" not in sys.modules:
        for name, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(name, value)


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
