"""The `neoxray serve` driver: start (or join) a Ray cluster, deploy the Serve application, keep it up until
interrupted, then take it down gracefully. `--no-ray` serves one engine with uvicorn in this process, behind
the same HTTP API (no Ray is imported then)."""

from __future__ import annotations

import ipaddress
import signal
import sys
import time

from neoxray.platform.serve.args import API_KEY_ENV, ServeArgs

APP_NAME = "neoxray"


def _log(msg: str) -> None:
    print(f"[neoxray] {msg}", file=sys.stderr, flush=True)


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_serve(
    args: ServeArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    no_ray: bool = False,
    verbose: bool = False,
) -> None:
    """`neoxray serve`: on Ray Serve (a local cluster, or the one at `address`), or with `no_ray` in this process."""
    _sigterm_as_interrupt()
    args = args.with_env_api_key()  # an empty NEOXRAY_API_KEY is refused before anything starts
    if exposed_without_key(host, args.api_key):
        _log(
            f"warning: serving on {host} without an API key: anyone who can reach port {port} can use the model "
            f"(give --api-key or {API_KEY_ENV})"
        )
    if no_ray:
        _serve_without_ray(args, host, port)
    else:
        _serve_on_ray(args, host, port, address, verbose)


def exposed_without_key(host: str, api_key: str | None) -> bool:
    """Whether a server on `host` without a key answers other machines: any address but a loopback one (a
    host name may resolve to any interface)."""
    if api_key is not None or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _serve_on_ray(args: ServeArgs, host: str, port: int, address: str | None, verbose: bool) -> None:
    """Deploy the Serve application and keep it up until Ctrl-C or SIGTERM, then take it down gracefully."""
    from ray import serve

    from neoxray.platform.serve.app import build_app
    from neoxray.ray_connection import connect_ray, dashboard_url, started_here

    app = build_app(args)  # validates args and the model path before any cluster work
    connect_ray(address, verbose=verbose)
    if args.tensor_parallel_size > 1:  # a placement group that can never be placed: say so now, not never
        import ray

        from neoxray.platform.serve.tp_workers import check_placement, placement_bundles

        bundles = placement_bundles(args.tensor_parallel_size, args.num_cpus, args.num_gpus, args.worker_num_cpus)
        check_placement(bundles, args.placement_strategy, ray.nodes())
    _sigterm_as_interrupt()  # again: joining Ray installs its own SIGTERM handler, which would abort the process
    url = f"http://{host}:{port}"
    try:
        serve.start(http_options={"host": host, "port": port})
        _log(
            f"deploying {args.model} on Ray Serve ({args.num_replicas if args.max_replicas is None else 'autoscaling'} "
            f"model replica(s), {args.tensor_parallel_size} worker(s) of {args.num_gpus:g} GPU each"
            f"{', ' + args.quantization if args.quantization else ''}, behind {args.ingress_replicas} ingress "
            "replica(s)); "
            "the first start loads the model"
        )
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        _log(f"serving at {url}/v1 (OpenAI API: chat/completions, completions, models, embeddings); a page at {url}/")
        _log(f"Ray dashboard: {dashboard_url()}; Ctrl-C to stop")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, also while still deploying
        _log("stopping: running requests get up to graceful_shutdown_timeout_s to finish")
    finally:
        try:
            serve.delete(APP_NAME)
            if started_here(address):  # a cluster we started: take Serve down too
                serve.shutdown()
        except KeyboardInterrupt:
            _log("interrupted again: leaving without waiting for the replicas")


def _serve_without_ray(args: ServeArgs, host: str, port: int) -> None:
    """One engine behind the same HTTP API under uvicorn in this process (no Ray imported): for a single
    machine, and for GPU hosts where Ray is not installed. Running requests get 30 s to finish at the end."""
    import uvicorn

    from neoxray.platform.serve.api import create_app
    from neoxray.platform.serve.client import LocalEngineClient

    template = args.model_chat_template()  # a broken one fails here, before the model loads
    engine = args.build_engine().start()
    client = LocalEngineClient(engine, None, args.allowed_lora_path, template)
    _log(f"serving {engine.model_name} at http://{host}:{port}/v1 without Ray (one engine, uvicorn)")
    try:
        uvicorn.run(create_app(client, args), host=host, port=port, log_level="warning")
    finally:
        engine.stop(timeout=30)
