"""The run config's schema: one typed dataclass per section, a docstring per field, defaults everywhere.

A run is described by a `RunConfig`: `model`, `lora`, `parallel`, `data`, `optimizer`, `schedule`, `train`,
`checkpoint`, `logging` and `eval` sections plus a run `name` and `run_dir`. Every field has a default, so a
YAML file only overrides (`loader`); `validate` checks a whole run; `neoxray.platform.train.deepspeed_config`
derives DeepSpeed's config from it. Plain data: no torch, no Ray, no DeepSpeed here (the `model.init_from`
architecture is read lazily).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig, get_preset, preset_names
from neoxray.model.lora_spec import TARGETS, LoRASpec

# DeepSpeed's pipeline engine accepts ZeRO stages below 2 only ("ZeRO-2 and ZeRO-3 are incompatible with
# pipeline parallelism", deepspeed/runtime/pipe/engine.py)
ZERO_STAGES = (0, 1)


# --------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    """Which model to train: a named preset with field overrides, or a Hugging Face directory to fine-tune."""

    preset: str = "tiny"
    """A name from `neoxray.model.config.preset_names()` (`neox-20b`, `pythia-1.4b`, `tiny`, ...)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to change on the preset, e.g. `{vocab_size: 1024, max_seq_len: 512}`."""
    init_from: str | None = None
    """The model to fine-tune from: a Hugging Face GPT-NeoX directory, a neoxray training checkpoint, or a run
    directory (its newest checkpoint). It gives the architecture (the preset is ignored, `overrides` still apply)
    and the initial weights; with `lora.rank > 0` it is the frozen base the adapters train on. Null: random
    init."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (less memory, about a third more compute)."""

    def model_config(self) -> ModelConfig:
        """The architecture: the preset (or `init_from`'s config.json), overrides, activation checkpointing."""
        check_model_overrides(self.overrides, "model.overrides")
        if self.init_from:
            from neoxray.platform.lora_checkpoint import resolve_base  # imports torch: only when fine-tuning

            try:
                base = resolve_base(self.init_from).config()
            except NeoxrayError as e:
                msg = str(e)
                named = msg.startswith("model.init_from")
                raise NeoxrayError(msg if named else f"model.init_from={self.init_from}: {msg}") from None
            cfg = dataclasses.replace(base, **self.overrides)
        else:
            if self.preset not in preset_names():
                raise NeoxrayError(
                    f"model.preset={self.preset!r} is not a known preset{suggest(self.preset, preset_names())}; "
                    f"known presets: {', '.join(preset_names())}"
                )
            cfg = get_preset(self.preset, **self.overrides)
        return dataclasses.replace(cfg, activation_checkpointing=self.activation_checkpointing)


@dataclass
class LoraSection:
    """LoRA fine-tuning (Hu et al., 2021): low-rank adapters on a frozen base (`model.init_from`). The base gets
    no gradients and no optimizer state; checkpoints hold only the adapters (`neoxray.platform.lora_checkpoint`),
    and `neoxray export` writes them as a peft adapter (or, with --merge, a full model)."""

    rank: int = 0
    """The adapters' rank r (A is [r, in], B is [out, r]); 0: no LoRA, every weight trains."""
    alpha: float = 16.0
    """Scale numerator: each update is multiplied by alpha / rank (alpha / sqrt(rank) with `use_rslora`)."""
    dropout: float = 0.0
    """Dropout probability on each adapter's input during training, in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    """Which linears of every layer get an adapter (GPT-NeoX module names, as peft's `target_modules`):
    query_key_value, dense, dense_h_to_4h, dense_4h_to_h."""
    use_rslora: bool = False
    """Rank-stabilised scaling, alpha / sqrt(rank) (peft's `use_rslora`)."""

    def spec(self) -> LoRASpec | None:
        """The adapters' shape as a `neoxray.model.lora_spec.LoRASpec`, or None when `rank` is 0."""
        if not self.rank:
            return None
        return LoRASpec(
            r=self.rank,
            alpha=float(self.alpha),
            dropout=float(self.dropout),
            targets=tuple(self.targets),
            use_rslora=self.use_rslora,
        )


@dataclass
class ParallelSection:
    """The 3D layout: data x tensor x pipeline ranks (world size = their product), ZeRO, backend.

    `parallel: auto` in a file (or the override `parallel=auto`) sets `auto` and leaves data/tensor/pipeline
    unset, to be chosen from the cluster when the run starts (`neoxray.platform.train.auto_layout.resolve_auto_layout`,
    then `with_layout`); any of them given explicitly is kept as a pin.
    """

    auto: bool = False
    """Choose the layout when the run starts: the fastest layout that fits the cluster's workers by the
    topology planner (`neoxray plan`, docs/planner.md); data/tensor/pipeline left null are then free."""
    data: int | None = 1
    """Data-parallel replicas (dp): each sees a different slice of every global batch."""
    tensor: int | None = 1
    """Tensor-parallel ranks (tp, Megatron-style): must divide the model's heads, vocabulary rows and MLP width."""
    pipeline: int | None = 1
    """Pipeline stages (pp): the layers are split into this many consecutive stages (at most n_layers)."""
    zero_stage: int = 1
    """ZeRO stage: 1 shards optimizer states across the data-parallel ranks, 0 turns ZeRO off. DeepSpeed's
    pipeline engine supports only these two."""
    pipeline_partition: str = "type:LayerPipe"
    """DeepSpeed's `PipelineModule` partition method: `type:REGEX` (balance layers whose class name matches),
    `parameters` (balance parameter counts) or `uniform` (balance layer counts)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: `auto` is nccl on GPUs and gloo on CPUs."""
    workers: int | None = None
    """With `auto`: how many workers to plan for; null: every GPU of the cluster, or on a cluster without
    GPUs (or with train.device=cpu) every CPU."""
    gpu_memory_gb: float | None = None
    """With `auto`: memory of one GPU in GiB (2**30 bytes, what GPU datasheets call GB: 40 for an A100 40GB);
    null: read from the cluster's GPU nodes. CPU workers get their node's Ray memory divided by its CPUs."""

    def world_size(self) -> int:
        """dp x tp x pp (the number of training workers); an error while the layout is still `auto`."""
        require_layout(self)
        return self.data * self.tensor * self.pipeline

    def resolve_backend(self, use_gpu: bool) -> str:
        """The torch.distributed backend to use: `backend`, or for `auto` nccl on GPUs and gloo on CPUs."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if use_gpu else "gloo"


@dataclass
class DataSection:
    """The training data: prepared datasets (token rows of seq_len + 1 written by the data pipeline)."""

    path: str | list[str] = "runs/demo/data"
    """A prepared dataset directory, or a list of them to mix."""
    weights: list[float] | None = None
    """Mixing weights, one per `path` (normalised; null: in proportion to each dataset's size)."""
    seed: int = 1234
    """Seed of the data order (shuffling and mixing); the same seed and step give the same batches."""
    validation_path: str | None = None
    """A prepared dataset for evaluation; null: the data pipeline's held-out split of `path`, if any."""

    def paths(self) -> list[str]:
        """`path` as a list."""
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass
class OptimizerSection:
    """AdamW (decoupled weight decay), with global gradient-norm clipping."""

    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay (and after it)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam's beta1, beta2."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleSection:
    """Learning-rate schedule: linear warmup from 0 to `optimizer.lr`, then a decay to `optimizer.min_lr`."""

    warmup_steps: int | None = None
    """Warmup length in optimizer steps. Set this or `warmup_fraction`, not both (neither: no warmup)."""
    warmup_fraction: float | None = None
    """Warmup length as a fraction of the decay steps (GPT-NeoX's `warmup: 0.01`)."""
    decay_steps: int | None = None
    """Steps from 0 to the end of the decay (warmup included); null: `train.steps`."""
    style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay shape after warmup: cosine or linear to min_lr, or constant at the peak lr."""

    def lr_at(self, step: int, lr: float, min_lr: float, total_steps: int) -> float:
        """Learning rate for optimizer step `step` (0-based: the update made after `step` earlier updates)."""
        decay = self.decay_steps or total_steps
        warmup = self.resolved_warmup_steps(total_steps)
        if warmup > 0 and step < warmup:
            return lr * step / warmup
        if self.style == "constant":
            return lr
        if step >= decay:
            return min_lr
        progress = (step - warmup) / max(1, decay - warmup)
        if self.style == "linear":
            return lr - (lr - min_lr) * progress
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def resolved_warmup_steps(self, total_steps: int) -> int:
        """Warmup length in steps (`warmup_fraction` x decay steps when given as a fraction)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_fraction is not None:
            return int(round(self.warmup_fraction * (self.decay_steps or total_steps)))
        return 0


@dataclass
class TrainSection:
    """Length, batch arithmetic, precision and device of the run."""

    steps: int = 100
    """Optimizer steps to train for."""
    global_batch: int = 8
    """Sequences per optimizer step, over all data-parallel replicas and micro-batches."""
    micro_batch: int = 2
    """Sequences per forward/backward pass on one data-parallel replica; global_batch / (micro_batch x
    parallel.data) is the gradient-accumulation count (the pipeline's micro-batches per step)."""
    seq_len: int | None = None
    """Tokens per training sequence; null: the model's max_seq_len."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision: fp32, bf16 (fp32 gradient accumulation and master weights) or fp16 (dynamic loss
    scaling)."""
    seed: int = 1234
    """Seed of the model initialisation and of any other randomness in training."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the workers run: `auto` uses GPUs when the cluster has them."""


@dataclass
class CheckpointSection:
    """Training checkpoints, `<run_dir>/checkpoint-step-N` (weights, optimizer, data position)."""

    every: int = 0
    """Save every this many optimizer steps; 0: only at the end of the run."""
    keep: int = 2
    """How many recent checkpoints to keep (older ones are deleted); 0 keeps all."""
    resume: bool = True
    """Resume from the newest checkpoint in the run directory when there is one."""
    load_from: str | None = None
    """A checkpoint directory (of any run and any dp x tp x pp layout) to continue from when this run has no
    checkpoint of its own: weights, optimizer state, step and data position carry over."""
    staging_dir: str | None = None
    """For a run directory on object storage (`--run-dir s3://...`): the local folder of each node where its
    ranks write checkpoints before uploading them, and download the one a run resumes from; null: the system's
    temp folder. Needs room for one checkpoint's share of the node's ranks (two while an upload runs)."""


@dataclass
class WandbLogging:
    """Weights & Biases (`logging.wandb`): rank 0 sends it what metrics.jsonl gets, the config, and the summary.
    `WANDB_MODE` (online, offline, disabled), `WANDB_API_KEY`, `WANDB_BASE_URL` and `WANDB_DIR` are honoured and
    passed on to the workers; a W&B that cannot be reached is one warning, and the run trains on."""

    enabled: bool = False
    """Send the run to W&B (needs `pip install wandb`)."""
    project: str = "neoxray"
    """The W&B project."""
    entity: str | None = None
    """The W&B entity (a user or team); null: the API key's default."""
    run_name: str | None = None
    """The W&B run's display name; null: the run's `name`. A resumed run continues the same W&B run (its id is
    kept in the run directory)."""


@dataclass
class MlflowLogging:
    """MLflow (`logging.mlflow`): rank 0 logs what metrics.jsonl gets as metrics, the config as parameters, and
    the summary; a tracking server that cannot be reached is one warning, and the run trains on."""

    enabled: bool = False
    """Log the run to MLflow (needs `pip install mlflow-skinny`; its SQLite store needs sqlalchemy and
    alembic, which `pip install neoxray[trackers]` brings)."""
    tracking_uri: str | None = None
    """Where: a tracking server (`http://host:5000`) or a database (`sqlite:///path/mlflow.db`); null:
    MLFLOW_TRACKING_URI when set, else `sqlite:///<run directory>/mlflow.db` (MLflow 3 keeps its `./mlruns` file
    store read-only; on object storage that database stays in the node's staging folder: name a server)."""
    experiment: str = "neoxray"
    """The MLflow experiment (made when missing)."""
    run_name: str | None = None
    """The MLflow run's name; null: the run's `name`. A resumed run continues the same MLflow run."""


@dataclass
class LoggingSection:
    """Metrics: loss, learning rate, throughput, memory; and the experiment trackers they go to."""

    every: int = 10
    """Print a metrics line on the console every this many optimizer steps (and at the last step and at every
    evaluation); metrics.jsonl, TensorBoard and the Ray metrics get every step."""
    tensorboard: bool = True
    """Also write TensorBoard event files under `<run_dir>/tensorboard`."""
    peak_tflops: float = 989.0
    """Per-GPU peak (dense bf16 TFLOP/s) that MFU is measured against; 989 is the H100/H200 SXM datasheet."""
    metrics_file: str | None = "metrics.jsonl"
    """JSON-lines metrics file, relative to the run directory; null: none."""
    ray_metrics: bool = True
    """Also publish the metrics as Ray metrics (gauges `neoxray_train_*`, seen in the Ray dashboard and on the
    Prometheus export port) when the run is on Ray."""
    wandb: WandbLogging = field(default_factory=WandbLogging)
    """Weights & Biases (`logging.wandb.enabled=true logging.wandb.project=P`)."""
    mlflow: MlflowLogging = field(default_factory=MlflowLogging)
    """MLflow (`logging.mlflow.enabled=true logging.mlflow.tracking_uri=URI`)."""


@dataclass
class EvalSection:
    """Evaluation while training: the validation loss on held-out data every `every` steps (in the training
    loop), and lm-evaluation-harness tasks on each new checkpoint (on Ray actors of their own, beside the run)."""

    every: int = 0
    """Compute the validation loss every this many optimizer steps; 0: never."""
    batches: int = 10
    """Global batches per validation loss."""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (names, as `neoxray eval --tasks` takes them) to run on each new checkpoint
    while training goes on; empty: none. Needs Ray (the tasks run on separate actors, never blocking training);
    results go to metrics.jsonl as {"step": N, "eval": {task: {metric: value}}}, TensorBoard and the Ray
    metrics `neoxray_eval_*`. A failed evaluation is reported and never stops training."""
    num_fewshot: int | None = None
    """Few-shot examples per task (null: each task's default)."""
    limit: int | None = None
    """At most this many examples per task (null: all), to keep evaluations short beside training."""
    include_path: str | None = None
    """A folder of extra lm-eval task YAMLs (local tasks with local data files, for clusters without the hub)."""
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    """Ray resources of each evaluation actor, e.g. {CPU: 1} or {GPU: 1}."""


@dataclass
class RunConfig:
    """One training run."""

    name: str = "run"
    """Run name (a directory name: no path separators)."""
    run_dir: str | None = None
    """Where checkpoints, metrics and the resolved config go; null: `runs/<name>`."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model: preset, overrides, fine-tuning source."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapters on a frozen base (off unless lora.rank > 0)."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """The data x tensor x pipeline layout."""
    data: DataSection = field(default_factory=DataSection)
    """The training data."""
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    """AdamW settings."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """The learning-rate schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Steps, batch sizes, precision, device."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoint cadence and retention."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics logging."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation cadence."""

    def model_config(self) -> ModelConfig:
        """The model architecture (see `ModelSection.model_config`)."""
        return self.model.model_config()

    def seq_len(self, model: ModelConfig | None = None) -> int:
        """Training sequence length: `train.seq_len`, or the model's max_seq_len."""
        if self.train.seq_len is not None:
            return self.train.seq_len
        return (model or self.model_config()).max_seq_len

    def decay_steps(self) -> int:
        """Steps to the end of the learning-rate decay: `schedule.decay_steps`, or `train.steps`."""
        return self.schedule.decay_steps or self.train.steps

    def warmup_steps(self) -> int:
        """Warmup length in optimizer steps."""
        return self.schedule.resolved_warmup_steps(self.train.steps)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        return self.schedule.lr_at(step, self.optimizer.lr, self.optimizer.min_lr, self.train.steps)

    def lr_multiplier(self, step: int) -> float:
        """`lr_at(step) / optimizer.lr`: the factor for `torch.optim.lr_scheduler.LambdaLR`."""
        return self.lr_at(step) / self.optimizer.lr

    def run_path(self) -> Path:
        """The run directory: `run_dir`, or `runs/<name>`."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "lora": LoraSection,
    "parallel": ParallelSection,
    "data": DataSection,
    "optimizer": OptimizerSection,
    "schedule": ScheduleSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "eval": EvalSection,
}
TOP_LEVEL = ("name", "run_dir")
LAYOUT = ("data", "tensor", "pipeline")
# ModelConfig fields that are not per-run overrides: `name` is the preset's, activation checkpointing has
# its own field in the model section
NOT_OVERRIDABLE = {"name": "model.preset", "activation_checkpointing": "model.activation_checkpointing"}


def check_model_overrides(overrides: dict, key: str, source: str | None = None) -> None:
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in NOT_OVERRIDABLE]
    where = f" in {source}" if source else ""
    for name in overrides:
        if name in NOT_OVERRIDABLE:
            raise NeoxrayError(f"{key}.{name}{where} cannot be overridden; set {NOT_OVERRIDABLE[name]} instead")
        if name not in fields:
            raise NeoxrayError(
                f"unknown key '{key}.{name}'{where}{suggest(name, fields, prefix=key + '.')}; "
                f"ModelConfig fields: {', '.join(fields)}"
            )


def suggest(word: str, candidates: typing.Iterable[str], prefix: str = "", leaf: bool = False) -> str:
    """ " (did you mean 'X'?)" for the closest candidate (by the last dotted part when `leaf`), or ""."""
    candidates = list(candidates)
    if leaf:
        by_leaf: dict[str, str] = {}
        for c in candidates:
            by_leaf.setdefault(c.rsplit(".", 1)[-1], c)
        match = difflib.get_close_matches(word, list(by_leaf), n=1, cutoff=0.75)
        return f" (did you mean '{by_leaf[match[0]]}'?)" if match else ""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def require_layout(p: ParallelSection) -> None:
    missing = ", ".join(f"parallel.{k}" for k in LAYOUT if getattr(p, k) is None)
    if missing:
        raise NeoxrayError(
            f"the parallel layout is not chosen yet ({missing} unset, as `parallel: auto` leaves them); "
            f"choose one with with_layout() or set them"
        )


# --------------------------------------------------------------------------------------------------------
# derived copies
# --------------------------------------------------------------------------------------------------------
def to_dict(cfg: RunConfig) -> dict:
    """The config as a plain nested dict (YAML/JSON-safe); `from_dict` reads it back."""
    return dataclasses.asdict(cfg)


def resolved(cfg: RunConfig) -> RunConfig:
    """A copy with the derived defaults written out (train.seq_len, schedule.decay_steps, run_dir), as stored
    with checkpoints and in the run directory."""
    train = dataclasses.replace(cfg.train, seq_len=cfg.seq_len())
    schedule = dataclasses.replace(cfg.schedule, decay_steps=cfg.decay_steps())
    return dataclasses.replace(cfg, train=train, schedule=schedule, run_dir=str(cfg.run_path()))


def with_layout(cfg: RunConfig, data: int, tensor: int, pipeline: int) -> RunConfig:
    """A copy of `cfg` with a concrete layout (used once an `auto` layout has been chosen)."""
    parallel = dataclasses.replace(cfg.parallel, auto=False, data=data, tensor=tensor, pipeline=pipeline)
    return dataclasses.replace(cfg, parallel=parallel)
