"""The Ray driver of `neoxray train`: validate the config, connect to Ray, build a TorchTrainer with
dp x tp x pp workers, and return when training ends. What each worker runs is `ray_worker.ray_train_loop`;
`local.run_local` trains without Ray."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

from neoxray.errors import NeoxrayError, find_user_error
from neoxray.model.precision import use_gpu as wants_gpu
from neoxray.platform.train.preflight import nothing_to_train, preflight
from neoxray.platform.train.progress import Progress, follow, summary
from neoxray.ray_connection import connect_ray, dashboard_url, started_here


def absolute_paths(cfg):
    """Local paths of the config made absolute: Ray Train workers run in their own working directory."""

    def fix(p):
        return p if (p is None or "://" in str(p) or os.path.isabs(p)) else os.path.abspath(p)

    data = dataclasses.replace(
        cfg.data,
        path=[fix(p) for p in cfg.data.path] if isinstance(cfg.data.path, list) else fix(cfg.data.path),
        validation_path=fix(cfg.data.validation_path),
    )
    return dataclasses.replace(
        cfg,
        data=data,
        model=dataclasses.replace(cfg.model, init_from=fix(cfg.model.init_from)),
        checkpoint=dataclasses.replace(cfg.checkpoint, load_from=fix(cfg.checkpoint.load_from)),
    )


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_train(
    cfg, run_dir: str | None = None, address: str | None = None, max_failures: int = 2, verbose: bool = False
):
    """Validate and check the run (`preflight`), then train under Ray Train. A `NeoxrayError` in any worker (a
    user error: bad data, a non-finite loss) ends the run at once as one line; a fault (a killed worker, a lost
    node) restarts the worker group from the newest intact checkpoint, up to `max_failures` times. The console
    shows the progress (followed from metrics.jsonl) and a summary; the workers' own output (Ray Train,
    DeepSpeed) only with `verbose`. Returns the Ray `Result` of the last attempt."""
    from neoxray.platform.train.config import dump_yaml, resolved, validate

    validate(cfg)
    cfg = absolute_paths(resolved(cfg))
    run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    checked = preflight(cfg, run_dir, _say)
    if checked.finished_at is not None:
        raise nothing_to_train(run_dir, checked, cfg.train.steps)
    cfg = checked.cfg
    if cfg.parallel.auto:
        from neoxray.platform.train.auto_layout import auto_layout_on_ray

        cfg = auto_layout_on_ray(cfg, connect_ray(address, verbose=verbose))
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
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    _say(
        f"[neoxray] run {cfg.name}: layout dp={dp} tp={tp} pp={pp} ({world} workers, "
        f"{'GPU' if use_gpu else 'CPU'}, {cfg.parallel.resolve_backend(use_gpu)}); run dir {run_dir}"
    )
    _say(f"[neoxray] Ray dashboard: {dashboard_url()}")
    started = time.monotonic()
    evaluator = None
    if cfg.eval.tasks:
        from neoxray.platform.train.evaluation import CheckpointEvaluator

        evaluator = CheckpointEvaluator(cfg, run_dir, ray, _say)
    for attempt in range(max_failures + 1):
        if attempt:
            checked = preflight(cfg, run_dir, _say)  # where the last attempt's newest intact checkpoint is
            if checked.finished_at is not None:
                return None  # the failure came after the final checkpoint: the run is complete
        stop = threading.Event()
        watchers = []
        if cfg.logging.metrics_file and not verbose:
            watchers.append(
                follow(run_dir / cfg.logging.metrics_file, Progress(cfg.train.steps, cfg.logging.every), stop)
            )
        if evaluator is not None:
            watchers.append(_every(5.0, evaluator.poll, stop))
        try:
            result, error = _fit(cfg, run_dir, checked.resume_from, use_gpu, world, console=verbose)
        finally:
            stop.set()
            for w in watchers:
                w.join(timeout=10)
        if error is None:
            if evaluator is not None:
                evaluator.finish()
            _say(summary(run_dir, time.monotonic() - started, cfg.logging.metrics_file))
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


def _fit(cfg, run_dir: Path, resume_from: str | None, use_gpu: bool, world: int, console: bool):
    """One attempt: a TorchTrainer of `world` workers running `ray_train_loop`, with Ray's own retries off
    (the caller decides what is retried). Returns (Ray Result or None, the error or None)."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from neoxray.platform.train.config import to_dict
    from neoxray.platform.train.ray_worker import ray_train_loop

    env = {"PYTHONUNBUFFERED": "1", **({"NEOXRAY_VERBOSE": "1"} if console else {})}
    if not use_gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={
            "config": to_dict(cfg),
            "run_dir": str(run_dir),
            "resume_from": resume_from,
            "console": console,
        },
        torch_config=TorchConfig(backend=cfg.parallel.resolve_backend(use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=world, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": 1}
        ),
        run_config=RayRunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train raises TrainingFailedError (a worker group or controller failure)
        return None, e
    return result, result.error
