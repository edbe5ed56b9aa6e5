"""The per-worker training engine: one rank of a dp x tp x pp layout. Runs under Ray Train or without Ray.

Build order, per rank:
  1. process groups from DeepSpeed's pipe/data/model topology (tensor parallel is its "model" axis);
  2. the layer list as pipe modules (embedding, L transformer layers, final norm + head). DeepSpeed's
     `PipelineModule` builds only this stage's share; each piece is made on the meta device, rewritten by
     `neoxray.model.tensor_parallel.parallelize`, materialised, and initialised layout-independently
     (or loaded from a checkpoint / Hugging Face directory, reading only this rank's shards);
  3. `deepspeed.initialize`: the 1F1B pipeline engine, ZeRO-1 across data parallel, gradient accumulation
     to the global batch, clipping, fp32 / bf16 / fp16 with dynamic loss scaling.

LoRA runs (`lora.rank > 0`) freeze the base in the training precision and give the optimizer (and ZeRO-1, and
checkpoints) only the adapters.

Every micro-batch is a `MicroBatch`: input ids, and as the target its labels (-100 where a loss mask drops them:
prompt tokens of prompt-completion data) with a weight w = n * GAS * dp / N (n: this micro-batch's trained
labels, N: the global batch's). Its loss is its mean token loss times w, which DeepSpeed's averaging over
micro-batches and data parallel turns into the mean over the global batch's trained labels: the same figure and
gradient under every layout. For text data (every label trained) w is exactly 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from neoxray.errors import NeoxrayError
from neoxray.model.tensor_parallel import tp_loss
from neoxray.platform.train.distributed import Coord, init_distributed, quiet, worker_device
from neoxray.platform.train.pipe import EmbeddingPipe, HeadPipe, LayerPipe, Piece, no_decay

IGNORE_INDEX = -100


class MicroBatch(NamedTuple):
    """One micro-batch of this data-parallel rank, as the engine trains and evaluates on it (the (inputs, target)
    pair DeepSpeed's pipeline hands to its first and last stage)."""

    input_ids: torch.Tensor
    """[micro, seq] token ids."""
    target: tuple[torch.Tensor, torch.Tensor]
    """(labels [micro, seq], IGNORE_INDEX where untrained; weight [1] float32, see the module docstring)."""


def micro_batch(input_ids, labels, weight: float = 1.0) -> MicroBatch:
    """A MicroBatch of `weight` (1: every label of every micro-batch of the global batch is trained), the weight
    on the labels' device."""
    return MicroBatch(input_ids, (labels, torch.tensor([weight], dtype=torch.float32, device=labels.device)))


# ---------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------
class TrainEngine:
    """One rank's training engine. Collective: every rank of the world constructs it and calls each method
    that says so, in the same order. `model_config`: the model (resolved by the driver; None: from `cfg`).
    `loader(piece)` fills a freshly built piece's parameters (checkpoint resume or Hugging Face fine-tuning);
    without it pieces are initialised from `cfg.train.seed`. In a LoRA run `loader` fills the frozen base and
    `adapter_loader(piece)` the adapters (resume); without it they are initialised from the seed. `ds_engine`
    is DeepSpeed's pipeline engine."""

    def __init__(self, cfg, model_config=None, loader=None, adapter_loader=None):
        with quiet():
            import deepspeed
            from deepspeed.pipe import LayerSpec, PipelineModule
            from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

        from neoxray.platform.train.deepspeed_config import deepspeed_config

        self.cfg = cfg
        init_distributed(cfg.parallel.backend, cfg.train.device)
        self.model_config = model_config or cfg.model_config()
        dp, tp, pp = cfg.parallel.data, cfg.parallel.tensor, cfg.parallel.pipeline
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        if dp * tp * pp != self.world_size:
            raise NeoxrayError(
                f"parallel.data x parallel.tensor x parallel.pipeline = {dp} x {tp} x {pp} = {dp * tp * pp}, "
                f"but the job has {self.world_size} workers"
            )
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        c = topo.get_coord(self.rank)
        self.coord = Coord(dp=c.data, tp=c.model, pp=c.pipe)
        self.layout = (dp, tp, pp)
        with quiet():
            grid = PipelineParallelGrid(topology=topo)
        self.tp_group = grid.get_slice_parallel_group()
        self.dp_group = grid.get_data_parallel_group()
        self.device = worker_device(cfg.train.device)
        seed = cfg.train.seed
        torch.manual_seed(seed)

        mc = self.model_config
        self.lora = cfg.lora.spec()
        lora = None if self.lora is None else (self.lora, adapter_loader)
        args = (self.tp_group, seed, self.device, loader, lora)
        specs = [LayerSpec(EmbeddingPipe, mc, *args)]
        specs += [LayerSpec(LayerPipe, mc, i, *args) for i in range(mc.n_layers)]
        specs += [LayerSpec(HeadPipe, mc, *args)]
        tp_group = self.tp_group
        with quiet():
            module = PipelineModule(
                layers=specs,
                topology=topo,
                loss_fn=lambda logits, labels: training_loss(logits, labels, tp_group),
                partition_method=cfg.parallel.pipeline_partition,
            )
        self.pieces = [m for m in module.forward_funcs if isinstance(m, Piece)]

        named = list(self.named_parameters())
        groups = [
            {"params": [p for n, p in named if not no_decay(n)], "weight_decay": cfg.optimizer.weight_decay},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        o = cfg.optimizer
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=self.device.type == "cuda"
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_multiplier)
        self.ds_config = deepspeed_config(cfg)
        with quiet():
            self.ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
            )
        self.step = 0
        self.consumed_samples = 0
        self.seq_len = cfg.seq_len(self.model_config)
        self.tokens_per_step = cfg.train.global_batch * self.seq_len
        self.flops_per_token = self.model_config.train_flops_per_token(self.seq_len)

    # -- parameters by canonical name (this rank's shards) ---------------------------------------------
    def named_parameters(self):
        """The trained parameters (all of them; in a LoRA run the adapters only) by plain-model name."""
        for piece in self.pieces:
            for name, p in piece.canonical_parameters():
                if p.requires_grad:
                    yield name, p

    def frozen_parameters(self):
        """The parameters a LoRA run does not train (the base), by plain-model name."""
        for piece in self.pieces:
            for name, p in piece.canonical_parameters():
                if not p.requires_grad:
                    yield name, p

    def set_step(self, step: int, consumed_samples: int) -> None:
        """Position the schedule after a resume: the next optimizer step is number `step + 1`."""
        self.step, self.consumed_samples = step, consumed_samples
        self.ds_engine.global_steps = step
        self.ds_engine.global_samples = consumed_samples
        self.scheduler.last_epoch = step
        for g, base, factor in zip(
            self.scheduler.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
        ):
            g["lr"] = base * factor(step)
        self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]

    # -- one optimizer step (collective) -----------------------------------------------------------------
    def train_step(self, micro_batches: Iterator[MicroBatch]) -> dict:
        """Run one global batch: `micro_batches` yields this data-parallel rank's micro-batches;
        gradient_accumulation_steps of them are pulled. Returns the step's metrics (identical on every rank)."""
        lr = self.scheduler.get_last_lr()[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = self.ds_engine.train_batch(_to_device(micro_batches, self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        self.consumed_samples += self.cfg.train.global_batch
        grad_norm = self.ds_engine.get_global_grad_norm()
        tokens_per_s = self.tokens_per_step / dt
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        peak = self.cfg.logging.peak_tflops if self.device.type == "cuda" else None
        metrics = {
            "step": self.step,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "consumed_samples": self.consumed_samples,
            "step_time_s": dt,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops,
            "mfu": (tflops / peak) if peak else None,
        }
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if scaler is not None and self.cfg.train.precision == "fp16":
            metrics["loss_scale"] = float(scaler.cur_scale)
        return metrics

    @torch.no_grad()
    def eval_loss(self, micro_batches: Iterator[MicroBatch], num_global_batches: int) -> float:
        """Mean loss over `num_global_batches` global batches of held-out data: each dp rank evaluates its share
        in micro-batches; DeepSpeed averages over micro-batches and data parallel, so the figure does not depend
        on the layout. Collective."""
        n = num_global_batches * self.ds_engine.gradient_accumulation_steps()
        loss = self.ds_engine.eval_batch(_to_device(micro_batches, self.device), num_micro_batches=n)
        return float(loss)

    @torch.no_grad()
    def probe_loss(self, micro_batches: Iterator[MicroBatch]) -> float:
        """The loss of the current weights on one micro-batch per dp rank (averaged; the same on every rank),
        without training: whether they still give a finite loss. Collective."""
        return float(self.ds_engine.eval_batch(_to_device(micro_batches, self.device), num_micro_batches=1))


def training_loss(logits, target, tp_group):
    """The loss of one micro-batch: the mean cross-entropy of its trained labels times its weight (see the
    module docstring); a micro-batch without trained labels gives a zero loss that still reaches every
    parameter (the mean of no labels is 0). No host sync: the step's kernels queue ahead of the GPU."""
    labels, weight = target
    return tp_loss(logits, labels, tp_group, IGNORE_INDEX) * weight.reshape(()).float()


def _to_device(batches: Iterator[MicroBatch], device) -> Iterator[MicroBatch]:
    for ids, (labels, weight) in batches:
        labels, weight = labels.to(device, non_blocking=True), weight.to(device, non_blocking=True)
        yield MicroBatch(ids.to(device, non_blocking=True), (labels, weight))
