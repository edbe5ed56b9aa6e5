"""The Ray driver of `neoxray train`: validate the config, connect to Ray, build a TorchTrainer with
dp x tp x pp workers, and return when training ends. What each worker runs is `ray_worker.ray_train_loop`;
`local.run_local` trains without Ray."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.precision import use_gpu as wants_gpu
from neoxray.platform.ray_cluster import connect_ray, started_here


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


def run_train(cfg, run_dir: str | None = None, address: str | None = None, max_failures: int = 2):
    """Validate, then train under Ray Train. Returns the Ray `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from neoxray.platform.train.config import dump_yaml, resolved, to_dict, validate
    from neoxray.platform.train.ray_worker import ray_train_loop

    validate(cfg)
    cfg = absolute_paths(resolved(cfg))
    run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.parallel.auto:
        from neoxray.platform.train.auto_layout import auto_layout_on_ray

        cfg = auto_layout_on_ray(cfg, connect_ray(address))
    dp, tp, pp = cfg.parallel.data, cfg.parallel.tensor, cfg.parallel.pipeline
    world = dp * tp * pp
    ray = connect_ray(address, num_cpus=max(world, 2) if started_here(address) else None)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = wants_gpu(cfg.train.device, gpus, world)
    if cfg.train.device == "auto" and 0 < gpus < world:
        print(
            f"[neoxray] the layout needs {world} GPUs and the cluster has {gpus:g}: training on CPUs "
            f"(set train.device=cuda to wait for GPUs, or choose a smaller layout)",
            file=sys.stderr,
        )
    backend = cfg.parallel.resolve_backend(use_gpu)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    print(
        f"[neoxray] run {cfg.name}: layout dp={dp} tp={tp} pp={pp} ({world} workers, "
        f"{'GPU' if use_gpu else 'CPU'}, {backend}); run dir {run_dir}",
        file=sys.stderr,
    )
    env = {"PYTHONUNBUFFERED": "1"}
    if not use_gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=world, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": 1}
        ),
        run_config=RayRunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep or None),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise NeoxrayError(f"training failed: {result.error}")
    return result
