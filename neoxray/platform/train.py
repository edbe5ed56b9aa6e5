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

    if cfg.parallel.auto:
        cfg = _auto_layout_local(cfg)
    if dist.get_rank() == 0:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return _run_worker(cfg, str(run_dir), LocalReporter(run_dir, keep=cfg.checkpoint.keep))


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _auto_layout_local(cfg):
    """`parallel: auto` without Ray: plan over this launch's world (WORLD_SIZE processes, LOCAL_WORLD_SIZE per
    node). Memory per worker: parallel.gpu_memory_gb, else this GPU's, else this machine's memory divided
    among its local workers. Rank 0 plans and the others take its choice, so all agree."""
    import torch
    import torch.distributed as dist

    from neoxray.platform.plan import Cluster, describe_choice, resolve_auto_layout

    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    box = [None]
    if dist.get_rank() == 0:
        memory = cfg.parallel.gpu_memory_gb
        if memory is None and torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        if memory is None:
            import psutil

            memory = psutil.virtual_memory().total / per_node / 2**30
        try:
            new, choice, result = resolve_auto_layout(cfg, Cluster(world, memory, per_node))
            box[0] = (new.parallel.data, new.parallel.tensor, new.parallel.pipeline)
            print(f"[neoxray] {describe_choice(choice, result)}", file=sys.stderr)
        except NeoxrayError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise NeoxrayError(box[0])
    from neoxray.platform.config import with_layout

    return with_layout(cfg, *box[0])


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


def auto_layout(cfg, ray):
    """`parallel: auto` on a Ray cluster: plan over its GPUs (all of them, or parallel.workers), with the
    fewest GPUs of any GPU node as the node size and parallel.gpu_memory_gb or the memory read on the GPU
    nodes; on a cluster without GPUs (or with train.device=cpu) over its CPUs, one worker each, with each
    node's Ray memory shared among its CPUs. Returns the config with the plan's first choice, printed."""
    from neoxray.platform.plan import cluster_from_nodes, describe_choice, resolve_auto_layout

    nodes = ray.nodes()
    use_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    memory = cfg.parallel.gpu_memory_gb
    if use_gpu and memory is None:
        memory = gpu_memory_gib(ray, nodes)
    new, choice, result = resolve_auto_layout(cfg, cluster_from_nodes(nodes, use_gpu, memory, cfg.parallel.workers))
    print(f"[neoxray] {describe_choice(choice, result)}", file=sys.stderr)
    return new


def gpu_memory_gib(ray, nodes, timeout_s: float = 120.0) -> float:
    """The smallest total memory of a GPU on the cluster's GPU nodes, GiB: one one-GPU task per node reads
    torch.cuda's device properties (the driver itself may have no GPU)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_gpus=1)
    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    gpu_nodes = [n["NodeID"] for n in nodes if n.get("Alive", True) and n.get("Resources", {}).get("GPU", 0) >= 1]
    refs = [total_memory.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in gpu_nodes]
    try:
        values = ray.get(refs, timeout=timeout_s)
    except Exception as e:  # busy GPUs (GetTimeoutError), a node without CUDA, ...
        for ref in refs:
            ray.cancel(ref, force=True)
        raise NeoxrayError(f"parallel: auto could not read the GPUs' memory on the cluster ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); set parallel.gpu_memory_gb") from None
    return min(values) / 2**30


def run_train(cfg, run_dir: str | None = None, address: str | None = None, max_failures: int = 2):
    """Validate, then train under Ray Train. Returns the Ray `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from neoxray.platform.config import dump_yaml, resolved, to_dict, validate

    validate(cfg)
    cfg = absolute_paths(resolved(cfg))
    run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.parallel.auto:
        cfg = auto_layout(cfg, connect_ray(address))
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
