"""The Ray driver of `neoxray train`: plan the run (`preflight.plan_run`: validate, resolve, preflight), connect
to Ray, build a TorchTrainer with dp x tp x pp workers, and return when training ends. What each worker runs is
`ray_worker.ray_train_loop`; `local.run_local` trains without Ray."""

from __future__ import annotations

import os
import sys
import threading
import time

from neoxray.errors import NeoxrayError, find_user_error
from neoxray.model.precision import use_gpu as wants_gpu
from neoxray.platform.model_cache import forwarded_env
from neoxray.platform.run_store import RunStore, mirror_dir
from neoxray.platform.train.preflight import plan_run, replan
from neoxray.platform.train.progress import Progress, follow, summary
from neoxray.platform.train.run_plan import RunPlan, start_run_dir
from neoxray.platform.train.trackers import ENV_PREFIXES as TRACKER_ENV
from neoxray.ray_connection import connect_ray, dashboard_url, started_here

RAY_TRAIN_TOLERANCE = {
    "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "3600",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
}
"""Ray Train's own settings (Ray 2.60's Train V2 reads them from the driver's environment, in
`ray.train.v2._internal.constants`, and hands them to its controller and workers) for a node whose CPUs are
oversubscribed, by design (8 tiny workers on 2 cores in tests) or by a user's other work: a worker whose
health poll goes unanswered is declared dead after an hour (default 10 minutes) rather than while it is merely
starved, and a worker group may take 10 minutes to start (default 1 minute). A worker whose process died is
still found at once (its poll fails). The poll interval keeps Ray's 2 s: the controller moves from one state
to the next (workers started, training, finished) once per poll, so a longer interval adds its multiple to
every run (10 s made a 5-step tiny run take 71 s instead of 29). A value the user set in the environment
wins."""


def _ray_storage(plan: RunPlan) -> dict:
    """Where Ray Train keeps its own run state: in the run directory, on object storage too (neoxray reads its own
    checkpoints back, never Ray Train's state). On S3 the filesystem carries the driver's endpoint and
    credentials: Ray Train's controller, an actor, does not have the driver's environment."""
    if plan.store_uri is None:
        return {"name": plan.run_dir.name, "storage_path": str(plan.run_dir.parent)}
    import pyarrow.fs as pafs

    from neoxray.pipelines import fs

    filesystem, inner = fs.resolve(plan.store_uri)
    if isinstance(filesystem, pafs.S3FileSystem) and os.environ.get("AWS_ACCESS_KEY_ID"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        given = {
            "access_key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
            "session_token": os.environ.get("AWS_SESSION_TOKEN"),
            "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
            "endpoint_override": endpoint,
        }
        filesystem = pafs.S3FileSystem(**{k: v for k, v in given.items() if v})
    parent, _, name = inner.rstrip("/").rpartition("/")
    return {"name": name, "storage_path": parent, "storage_filesystem": filesystem}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_train(
    cfg,
    run_dir: str | None = None,
    address: str | None = None,
    max_failures: int = 2,
    verbose: bool = False,
    start_over: bool = False,
):
    """Plan and check the run (`preflight.plan_run`), then train under Ray Train. A `NeoxrayError` in any worker
    (a user error: bad data, a non-finite loss) ends the run at once as one line; a fault (a killed worker, a
    lost node) restarts the worker group from the newest intact checkpoint, up to `max_failures` times. The
    console shows the progress (followed from metrics.jsonl) and a summary; the workers' own output (Ray Train,
    DeepSpeed) only with `verbose`. `start_over`: train from step 0 in a run directory whose checkpoints are set
    aside. Returns the Ray `Result` of the last attempt."""
    plan = plan_run(cfg, run_dir, _say, start_over=start_over)
    cfg = plan.cfg
    if cfg.parallel.auto:
        from neoxray.platform.train.auto_layout import auto_layout_on_ray

        plan = plan.with_cfg(auto_layout_on_ray(cfg, connect_ray(address, verbose=verbose)))
        cfg = plan.cfg
    dp, tp, pp = cfg.parallel.data, cfg.parallel.tensor, cfg.parallel.pipeline
    world = dp * tp * pp
    ray = connect_ray(address, num_cpus=max(world, 2) if started_here(address) else None, verbose=verbose)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = wants_gpu(cfg.train.device, gpus, world)
    if cfg.train.device == "auto" and 0 < gpus < world:
        _say(
            f"[neoxray] the layout needs {world} GPUs and the cluster has {gpus:g}: training on CPUs "
            f"(set train.device=cuda to wait for GPUs, or choose a smaller layout)"
        )
    start_run_dir(plan)
    where = plan.run_dir if plan.store_uri is None else f"{plan.store_uri} (staged on each node in {plan.run_dir})"
    _say(
        f"[neoxray] run {cfg.name}: layout dp={dp} tp={tp} pp={pp} ({world} workers, "
        f"{'GPU' if use_gpu else 'CPU'}, {cfg.parallel.resolve_backend(use_gpu)}); run dir {where}"
    )
    _say(f"[neoxray] Ray dashboard: {dashboard_url()}")
    evaluator = None
    if cfg.eval.tasks:
        from neoxray.platform.train.evaluation import CheckpointEvaluator

        if plan.store_uri is None:
            evaluator = CheckpointEvaluator(cfg, plan.run_dir, ray, _say)
        else:  # the store's checkpoints, the records kept beside the metrics there
            staging = mirror_dir(plan.store_uri, cfg.checkpoint.staging_dir, "driver")
            evaluator = CheckpointEvaluator(cfg, staging, ray, _say, store=RunStore(plan.store_uri))
    return _attempts(plan, evaluator, use_gpu, max_failures, verbose)


def _attempts(plan: RunPlan, evaluator, use_gpu: bool, max_failures: int, verbose: bool):
    """Up to `max_failures` + 1 attempts of the run, each from where the last one left its checkpoints."""
    cfg, started = plan.cfg, time.monotonic()
    store = RunStore(plan.store_uri) if plan.store_uri else None
    # the metrics the console follows: rank 0's file, or on object storage the driver's copy of the store's
    seen = plan.run_dir if store is None else mirror_dir(store.uri, cfg.checkpoint.staging_dir, "driver")
    for attempt in range(max_failures + 1):
        if attempt:
            plan = replan(plan, _say)  # where the last attempt's newest intact checkpoint is
            if plan is None:
                return None  # the failure came after the final checkpoint: the run is complete
        stop = threading.Event()
        watchers = []
        if cfg.logging.metrics_file and not verbose:
            watchers.append(follow(seen / cfg.logging.metrics_file, Progress(cfg.train.steps, cfg.logging.every), stop))
            if store is not None:
                watchers.append(_every(5.0, lambda: _pull(store, cfg.logging.metrics_file, seen), stop))
        if evaluator is not None:
            watchers.append(_every(5.0, evaluator.poll, stop))
        try:
            result, error = _fit(plan, use_gpu, console=verbose)
        finally:
            stop.set()
            for w in watchers:
                w.join(timeout=10)
        if error is None:
            if evaluator is not None:
                evaluator.finish()
            if store is not None and cfg.logging.metrics_file:
                _pull(store, cfg.logging.metrics_file, seen)
            _say(summary(seen, time.monotonic() - started, cfg.logging.metrics_file, store=store))
            return result
        user_error = find_user_error(error)
        if user_error is not None:
            raise user_error
        if attempt == max_failures:
            raise NeoxrayError(f"training failed after {max_failures} restart(s): {_first_line(error)}")
        _say(
            f"[neoxray] the worker group failed ({_first_line(error)}); restarting it from the newest checkpoint "
            f"(restart {attempt + 1} of {max_failures}, --max-failures)"
        )
    return None


def _pull(store: RunStore, name: str, into) -> None:
    """The store's copy of a run file, into the driver's folder (when there is one yet)."""
    if store.exists(name):
        store.download(name, into / name)


def _every(period_s: float, fn, stop: threading.Event) -> threading.Thread:
    """A daemon thread calling `fn` every `period_s` seconds until `stop` is set; an exception in `fn` is
    reported and the thread goes on (a side job never stops training)."""

    def run() -> None:
        while not stop.wait(period_s):
            try:
                fn()
            except Exception as e:
                _say(f"[neoxray] {fn.__qualname__} failed: {_first_line(e)}")

    thread = threading.Thread(target=run, name="neoxray-every", daemon=True)
    thread.start()
    return thread


def _fit(plan: RunPlan, use_gpu: bool, console: bool):
    """One attempt: a TorchTrainer of dp x tp x pp workers running `ray_train_loop`, with Ray's own retries off
    (the caller decides what is retried) and Ray Train's health checks set for a busy node
    (`RAY_TRAIN_TOLERANCE`). Returns (Ray Result or None, the error or None)."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from neoxray.platform.train.ray_worker import ray_train_loop

    cfg = plan.cfg
    env = {"PYTHONUNBUFFERED": "1", **({"NEOXRAY_VERBOSE": "1"} if console else {})}
    # the endpoint and credentials the driver reached object storage with (the run, data.path, load_from, init_from)
    env.update(forwarded_env())  # and where nodes cache models
    env.update({k: v for k, v in os.environ.items() if k.startswith(TRACKER_ENV)})  # W&B's and MLflow's settings
    if not use_gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for name, value in RAY_TRAIN_TOLERANCE.items():
        os.environ.setdefault(name, value)  # read when the trainer starts its controller
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={**plan.to_payload(), "console": console},
        torch_config=TorchConfig(backend=cfg.parallel.resolve_backend(use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=cfg.parallel.world_size(),
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": 1},
        ),
        run_config=RayRunConfig(
            **_ray_storage(plan),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train raises TrainingFailedError (a worker group or controller failure)
        return None, e
    return result, result.error
