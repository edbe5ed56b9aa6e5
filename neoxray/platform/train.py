"""The Ray driver of `neoxray train`: validate the config, connect to Ray, build a TorchTrainer with
dp x tp x pp workers, and return when training ends. The per-worker loop is `worker.train_worker`."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.platform.worker import Reporter, checkpoint_dir_name


# ---------------------------------------------------------------------------------------------------------
# inside each Ray Train worker
# ---------------------------------------------------------------------------------------------------------
class RayReporter(Reporter):
    """Metrics and checkpoints through `ray.train.report` (a barrier all workers call every step)."""

    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(None)

    def report(self, metrics, checkpoint_dir=None):
        import ray.train

        clean = {k: v for k, v in metrics.items() if v is not None}
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(clean, checkpoint=ckpt,
                         checkpoint_dir_name=checkpoint_dir_name(metrics["step"]) if ckpt else None)


def _run_worker(cfg, run_dir, reporter) -> list[dict]:
    from neoxray.platform.data import load_run_tokenizer, make_data_fn
    from neoxray.platform.metrics import MetricsSink
    from neoxray.platform.worker import train_worker

    def sink(engine):
        return MetricsSink(run_dir, cfg.name, tensorboard=cfg.logging.tensorboard,
                           ray_metrics=cfg.logging.ray_metrics, metrics_file=cfg.logging.metrics_file or "metrics.jsonl")

    return train_worker(cfg, reporter, make_data_fn(cfg), tokenizer=load_run_tokenizer(cfg), metrics_sink_fn=sink)


def _ray_train_loop(payload: dict) -> None:
    from neoxray.platform.config import from_dict

    _run_worker(from_dict(payload["config"]), payload["run_dir"], RayReporter())


def run_local(cfg, run_dir: str | None = None) -> list[dict]:
    """Train without Ray: one process, or each process of a `torchrun --nproc-per-node N` launch (the world
    comes from torchrun's environment; dp x tp x pp must equal it). Returns this rank's per-step metrics."""
    from neoxray.platform.config import dump_yaml, resolved, validate
    from neoxray.platform.engine import init_distributed
    from neoxray.platform.worker import LocalReporter

    validate(cfg)
    cfg = resolved(cfg)
    run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not torch_cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed(cfg.parallel.backend)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return _run_worker(cfg, str(run_dir), LocalReporter(run_dir, keep=cfg.checkpoint.keep))


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------
def absolute_paths(cfg):
    """Local paths of the config made absolute: Ray Train workers run in their own working directory."""
    import dataclasses

    def fix(p):
        return p if (p is None or "://" in str(p) or os.path.isabs(p)) else os.path.abspath(p)

    data = dataclasses.replace(
        cfg.data,
        path=[fix(p) for p in cfg.data.path] if isinstance(cfg.data.path, list) else fix(cfg.data.path),
        validation_path=fix(cfg.data.validation_path),
    )
    return dataclasses.replace(cfg, data=data,
                               model=dataclasses.replace(cfg.model, init_from=fix(cfg.model.init_from)),
                               checkpoint=dataclasses.replace(cfg.checkpoint, load_from=fix(cfg.checkpoint.load_from)))


def connect_ray(address: str | None, num_cpus: int | None = None):
    """Join RAY_ADDRESS / --address, or start a local cluster."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True)
    return ray


def run_train(cfg, run_dir: str | None = None, address: str | None = None, max_failures: int = 2):
    """Validate, then train under Ray Train. Returns the Ray `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from neoxray.platform.config import dump_yaml, resolved, to_dict, validate

    validate(cfg)
    cfg = absolute_paths(resolved(cfg))
    run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dp, tp, pp = cfg.parallel.data, cfg.parallel.tensor, cfg.parallel.pipeline
    world = dp * tp * pp
    ray = connect_ray(address, num_cpus=None if address or os.environ.get("RAY_ADDRESS") else max(world, 2))
    use_gpu = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and ray.cluster_resources().get("GPU", 0) >= world
    )
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_gpu else "gloo")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    print(f"[neoxray] run {cfg.name}: layout dp={dp} tp={tp} pp={pp} ({world} workers, "
          f"{'GPU' if use_gpu else 'CPU'}, {backend}); run dir {run_dir}", file=sys.stderr)
    env = {"PYTHONUNBUFFERED": "1"}
    if not use_gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
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
