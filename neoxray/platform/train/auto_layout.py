"""`parallel: auto`: the cluster a run finds (Ray nodes, or a torchrun world), the planner's choice of layout for
it (`neoxray.platform.train.plan`), and the run config with that layout."""

from __future__ import annotations

import os
import sys

from neoxray.errors import NeoxrayError
from neoxray.model.info import GIB
from neoxray.model.precision import resolve_device
from neoxray.model.precision import use_gpu as wants_gpu
from neoxray.platform.train.config import with_layout
from neoxray.platform.train.plan import Assumptions, Cluster, Layout, Plan, Training, plan


def cluster_from_nodes(
    nodes: list[dict], use_gpu: bool, gpu_memory_gib: float | None = None, workers: int | None = None
) -> Cluster:
    """The `Cluster` to plan for from `ray.nodes()` (dicts with "Alive" and "Resources"). On GPUs: their
    count, the fewest GPUs on a GPU node (tensor parallelism stays inside one) and `gpu_memory_gib` (which
    the caller must supply). On CPUs (no GPUs, or train.device=cpu): every CPU is a worker, as the driver
    gives each CPU worker one CPU, and each gets the least Ray memory per CPU of any node unless
    `gpu_memory_gib` says otherwise. `workers` (parallel.workers) plans for that many instead of all."""
    key = "GPU" if use_gpu else "CPU"
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    counts = [(int(r.get(key, 0)), r) for r in alive if int(r.get(key, 0)) >= 1]
    total = sum(c for c, _ in counts)
    if total < 1:
        raise NeoxrayError(
            f"parallel: auto found no {key}s in the Ray cluster"
            + ("; use train.device=cpu to plan over CPU workers" if use_gpu else "")
        )
    if workers is not None and not 1 <= workers <= total:
        raise NeoxrayError(f"parallel.workers={workers} must be between 1 and the cluster's {total} {key}s")
    if gpu_memory_gib is None:
        if use_gpu:
            raise NeoxrayError("parallel: auto needs the GPUs' memory: set parallel.gpu_memory_gb")
        gpu_memory_gib = min(r.get("memory", 0) / c for c, r in counts) / GIB
        if not gpu_memory_gib > 0:
            raise NeoxrayError("parallel: auto could not read the nodes' memory from Ray; set parallel.gpu_memory_gb")
    n = workers or total
    return Cluster(gpus=n, gpu_memory_gib=gpu_memory_gib, gpus_per_node=min(min(c for c, _ in counts), n))


def training_of(cfg) -> Training:
    """The planner's `Training` for a run config (`neoxray.platform.train.config.RunConfig`)."""
    model = cfg.model_config()
    return Training(
        global_batch=cfg.train.global_batch,
        micro_batch=cfg.train.micro_batch,
        seq_len=cfg.seq_len(model),
        precision=cfg.train.precision,
        zero_stage=cfg.parallel.zero_stage,
        activation_checkpointing=cfg.model.activation_checkpointing,
        lora_rank=cfg.lora.rank,
        lora_targets=tuple(cfg.lora.targets),
        lora_dropout=cfg.lora.dropout,
    )


def resolve_auto_layout(cfg, cluster: Cluster, assumptions: Assumptions | None = None):
    """For a run config with `parallel: auto`: the plan for `cluster` (with the run's model, batch, precision,
    ZeRO stage and activation checkpointing setting, and `logging.peak_tflops` as the peak), and its first
    feasible layout that keeps the pinned parallel.data/tensor/pipeline. Returns (config with that layout,
    the Layout, the Plan); a NeoxrayError naming the keys when no layout works."""
    model = cfg.model_config()
    assumptions = assumptions or Assumptions(peak_tflops=cfg.logging.peak_tflops)
    result = plan(model, cluster, training_of(cfg), assumptions)
    pins = {
        k: v
        for k, v in (("data", cfg.parallel.data), ("tensor", cfg.parallel.tensor), ("pipeline", cfg.parallel.pipeline))
        if v is not None
    }
    attr = {"data": "dp", "tensor": "tp", "pipeline": "pp"}
    ok = [x for x in result.feasible if all(getattr(x, attr[k]) == v for k, v in pins.items())]
    if ok:
        choice = ok[0]
        return with_layout(cfg, choice.dp, choice.tp, choice.pp), choice, result
    pinned = "".join(f" with parallel.{k}={v}" for k, v in pins.items())
    misses = [r for r in result.rejected if all(getattr(r, attr[k]) == v for k, v in pins.items())]
    why = "; ".join(f"dp {r.dp} tp {r.tp} pp {r.pp}: {r.reason}" for r in misses[:3])
    hints = []
    if not cfg.model.activation_checkpointing and any(r.memory_bytes for r in misses):
        hints.append("model.activation_checkpointing=true")
    if pins:
        hints.append("fewer pinned parallel.* values")
    hints.append("a smaller train.micro_batch")
    raise NeoxrayError(
        f"parallel: auto found no layout of {model.name} for {cluster.gpus} workers of "
        f"{cluster.gpu_memory_gib:.1f} GiB ({cluster.per_node()} per node){pinned}"
        f"{': ' + why if why else ''}; try {' or '.join(hints)} (`neoxray plan` lists every layout)"
    )


def describe_choice(choice: Layout, result: Plan) -> str:
    """One line for the driver's log: the layout `parallel: auto` took, and why."""
    c = result.cluster
    workers = f"{c.gpus} worker{'s' if c.gpus > 1 else ''}"
    return (
        f"parallel: auto chose dp={choice.dp} tp={choice.tp} pp={choice.pp} for {workers} of "
        f"{c.gpu_memory_gib:.1f} GiB ({c.per_node()} per node): about {choice.memory / GIB:.1f} GiB per worker, "
        f"estimated step {choice.time.total_s:.3g} s, first of {len(result.feasible)} feasible layouts "
        f"({len(result.rejected)} rejected; `neoxray plan` shows them)"
    )


# ---------------------------------------------------------------------------------------------------------
# where the cluster comes from
# ---------------------------------------------------------------------------------------------------------
def auto_layout_on_ray(cfg, ray):
    """`parallel: auto` on a Ray cluster: plan over its GPUs (all of them, or parallel.workers), with the
    fewest GPUs of any GPU node as the node size and parallel.gpu_memory_gb or the memory read on the GPU
    nodes; on a cluster without GPUs (or with train.device=cpu) over its CPUs, one worker each, with each
    node's Ray memory shared among its CPUs. Returns the config with the plan's first choice, printed."""
    nodes = ray.nodes()
    use_gpu = wants_gpu(cfg.train.device, ray.cluster_resources().get("GPU", 0), cfg.parallel.workers or 1)
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
    refs = [
        total_memory.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in gpu_nodes
    ]
    try:
        values = ray.get(refs, timeout=timeout_s)
    except Exception as e:  # busy GPUs (GetTimeoutError), a node without CUDA, ...
        for ref in refs:
            ray.cancel(ref, force=True)
        raise NeoxrayError(
            f"parallel: auto could not read the GPUs' memory on the cluster ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); set parallel.gpu_memory_gb"
        ) from None
    return min(values) / 2**30


def auto_layout_local(cfg):
    """`parallel: auto` without Ray: plan over this launch's world (WORLD_SIZE processes, LOCAL_WORLD_SIZE per
    node). Memory per worker: parallel.gpu_memory_gb, else this GPU's, else this machine's memory divided
    among its local workers. Rank 0 plans and the others take its choice, so all agree."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    box = [None]
    if dist.get_rank() == 0:
        memory = cfg.parallel.gpu_memory_gb
        if memory is None and resolve_device(cfg.train.device) == "cuda":
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
    return with_layout(cfg, *box[0])
