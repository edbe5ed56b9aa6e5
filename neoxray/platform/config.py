"""The run config: one typed schema for a training run, in sections, with a docstring per field.

A run is described by a `RunConfig`: `model`, `parallel`, `data`, `optimizer`, `schedule`, `train`,
`checkpoint`, `logging` and `eval` sections plus a run `name` and `run_dir`. Every field has a default, so a
YAML file only overrides (it may set any subset), and `KEY=VALUE` overrides (`parallel.data=2`,
`optimizer.betas=[0.9,0.95]`) go on top. Unknown keys and wrong types are `NeoxrayError`s that name the dotted
key and where it came from. `validate` checks the whole run (layout against the model, batch arithmetic,
sequence length, precision, schedule) before any worker starts, and `deepspeed_config` derives the DeepSpeed
JSON config the engine passes to `deepspeed.initialize`.

Plain data: no torch, no Ray, no DeepSpeed here (the `model.init_from` architecture is read lazily).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig, get_preset, preset_names

# fp16 dynamic loss scaling, as GPT-NeoX-20B and Pythia were trained (gpt-neox configs/20B.yml): start at
# 2**12, halve on overflow after `hysteresis` overflowing steps, double after `window` clean steps.
FP16_INITIAL_SCALE_POWER = 12
FP16_LOSS_SCALE_WINDOW = 1000
FP16_HYSTERESIS = 2
FP16_MIN_LOSS_SCALE = 1
# we log ourselves; DeepSpeed's own periodic print is pushed out of reach
DEEPSPEED_STEPS_PER_PRINT = 10**12
# DeepSpeed's pipeline engine accepts ZeRO stages below 2 only ("ZeRO-2 and ZeRO-3 are incompatible with
# pipeline parallelism", deepspeed/runtime/pipe/engine.py)
ZERO_STAGES = (0, 1)
PRECISIONS = ("fp32", "bf16", "fp16")


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
    """A Hugging Face GPT-NeoX directory to fine-tune from; its `config.json` then gives the architecture
    (the preset is ignored, `overrides` still apply) and its weights the initial values. Null: random init."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (less memory, about a third more compute)."""

    def model_config(self) -> ModelConfig:
        """The architecture: the preset (or `init_from`'s config.json), overrides, activation checkpointing."""
        _check_model_overrides(self.overrides, "model.overrides")
        if self.init_from:
            from neoxray.model.hf import read_config  # imports torch: only when fine-tuning

            try:
                base, _ = read_config(self.init_from)
            except NeoxrayError as e:
                raise NeoxrayError(f"model.init_from={self.init_from}: {e}") from None
            cfg = dataclasses.replace(base, **self.overrides)
        else:
            if self.preset not in preset_names():
                raise NeoxrayError(
                    f"model.preset={self.preset!r} is not a known preset{_suggest(self.preset, preset_names())}; "
                    f"known presets: {', '.join(preset_names())}"
                )
            cfg = get_preset(self.preset, **self.overrides)
        return dataclasses.replace(cfg, activation_checkpointing=self.activation_checkpointing)


@dataclass
class ParallelSection:
    """The 3D layout: data x tensor x pipeline ranks (world size = their product), ZeRO, backend.

    `parallel: auto` in a file (or the override `parallel=auto`) sets `auto` and leaves data/tensor/pipeline
    unset, to be chosen from the cluster when the run starts (`neoxray.platform.plan.resolve_auto_layout`,
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
        _require_layout(self)
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

    def resolve_device(self, cuda_available: bool) -> str:
        """`device`, with `auto` made concrete."""
        if self.device != "auto":
            return self.device
        return "cuda" if cuda_available else "cpu"


@dataclass
class CheckpointSection:
    """Training checkpoints under `<run_dir>/checkpoints` (weights, optimizer, data position)."""

    every: int = 0
    """Save every this many optimizer steps; 0: only at the end of the run."""
    keep: int = 2
    """How many recent checkpoints to keep (older ones are deleted); 0 keeps all."""
    resume: bool = True
    """Resume from the newest checkpoint in the run directory when there is one."""
    load_from: str | None = None
    """A checkpoint directory (of any run and any dp x tp x pp layout) to continue from when this run has no
    checkpoint of its own: weights, optimizer state, step and data position carry over."""


@dataclass
class LoggingSection:
    """Metrics: loss, learning rate, throughput, memory."""

    every: int = 10
    """Log metrics every this many optimizer steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files under `<run_dir>/tensorboard`."""
    peak_tflops: float = 989.0
    """Per-GPU peak (dense bf16 TFLOP/s) that MFU is measured against; 989 is the H100/H200 SXM datasheet."""
    metrics_file: str | None = "metrics.jsonl"
    """JSON-lines metrics file, relative to the run directory; null: none."""
    ray_metrics: bool = True
    """Report metrics to Ray Train (`ray.train.report`) as well."""


@dataclass
class EvalSection:
    """Periodic evaluation loss on held-out data."""

    every: int = 0
    """Evaluate every this many optimizer steps; 0: never."""
    batches: int = 10
    """Global batches per evaluation."""


@dataclass
class RunConfig:
    """One training run."""

    name: str = "run"
    """Run name (a directory name: no path separators)."""
    run_dir: str | None = None
    """Where checkpoints, metrics and the resolved config go; null: `runs/<name>`."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model: preset, overrides, fine-tuning source."""
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


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "parallel": ParallelSection,
    "data": DataSection,
    "optimizer": OptimizerSection,
    "schedule": ScheduleSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "eval": EvalSection,
}
_TOP_LEVEL = ("name", "run_dir")
_LAYOUT = ("data", "tensor", "pipeline")
# ModelConfig fields that are not per-run overrides: `name` is the preset's, activation checkpointing has
# its own field in the model section
_NOT_OVERRIDABLE = {"name": "model.preset", "activation_checkpointing": "model.activation_checkpointing"}


# --------------------------------------------------------------------------------------------------------
# loading: defaults <- YAML file <- KEY=VALUE overrides
# --------------------------------------------------------------------------------------------------------
def load_run_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """The run config: defaults, overridden by the YAML file at `path` (if any), then by `KEY=VALUE`
    overrides (dotted keys, values parsed as YAML: `train.steps=5`, `optimizer.betas=[0.9,0.95]`,
    `parallel=auto`, `model.overrides.vocab_size=1024`). Not validated against the model: call `validate`."""
    builder = _Builder()
    if path is not None:
        builder.apply_mapping(_read_yaml(path), source=str(path))
    for item in overrides:
        builder.apply_override(item)
    return builder.build()


def from_dict(d: dict, source: str = "run config") -> RunConfig:
    """A RunConfig from a (possibly partial) nested dict, such as `to_dict`'s output stored in a checkpoint."""
    builder = _Builder()
    builder.apply_mapping(d, source=source)
    return builder.build()


def apply_overrides(cfg: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """A copy of `cfg` with `KEY=VALUE` overrides applied (as in `load_run_config`)."""
    builder = _Builder()
    builder.apply_mapping(to_dict(cfg), source="run config")
    for item in overrides:
        builder.apply_override(item)
    return builder.build()


def with_layout(cfg: RunConfig, data: int, tensor: int, pipeline: int) -> RunConfig:
    """A copy of `cfg` with a concrete layout (used once an `auto` layout has been chosen)."""
    parallel = dataclasses.replace(cfg.parallel, auto=False, data=data, tensor=tensor, pipeline=pipeline)
    return dataclasses.replace(cfg, parallel=parallel)


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise NeoxrayError(f"run config file not found: {p}")
    if not p.is_file():
        raise NeoxrayError(f"run config {p} is not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise NeoxrayError(f"{p}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise NeoxrayError(f"{p}: not a UTF-8 text file ({e.reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NeoxrayError(f"{p}: a run config must be a mapping of sections, got {_type_name(data)}")
    return data


class _Builder:
    """Collects values over the defaults, checking every key and type as it goes."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = to_dict(RunConfig())
        self.explicit_layout: set[str] = set()

    # a whole mapping (a file, or a dict from a checkpoint)
    def apply_mapping(self, data: dict, source: str) -> None:
        if not isinstance(data, dict):
            raise NeoxrayError(f"{source}: a run config must be a mapping of sections, got {_type_name(data)}")
        for key, value in data.items():
            key = str(key)
            if key in _TOP_LEVEL:
                self.set_value((key,), value, source)
            elif key in _SECTIONS:
                self.set_section(key, value, source)
            else:
                raise _unknown_key(key, source)

    def set_section(self, section: str, value: Any, source: str) -> None:
        if section == "parallel" and value == "auto":
            self.state["parallel"]["auto"] = True
            self.explicit_layout.clear()
            return
        if value is None:  # an empty section (`logging:`) changes nothing
            return
        if not isinstance(value, dict):
            hint = " (or the string 'auto')" if section == "parallel" else ""
            raise NeoxrayError(
                f"{section} must be a mapping of keys{hint}, got {_type_name(value)} {value!r} ({source})"
            )
        for key, v in value.items():
            self.set_value((section, str(key)), v, source)

    def set_value(self, keys: tuple[str, ...], value: Any, source: str) -> None:
        dotted = ".".join(keys)
        if len(keys) == 1:
            (name,) = keys
            if name in _SECTIONS:
                self.set_section(name, value, source)
                return
            if name not in _TOP_LEVEL:
                raise _unknown_key(name, source)
            self.state[name] = _coerce(value, _hints(RunConfig)[name], name, source)
            return
        section, name, *rest = keys
        if section not in _SECTIONS:
            raise _unknown_key(dotted, source)
        cls = _SECTIONS[section]
        hints = _hints(cls)
        if name not in hints:
            raise _unknown_key(dotted, source)
        if section == "model" and name == "overrides":
            if rest:  # model.overrides.FIELD=VALUE sets one field
                if len(rest) > 1:
                    raise _unknown_key(dotted, source)
                field_name = rest[0]
                _check_model_overrides({field_name: None}, "model.overrides", source)
                self.state["model"]["overrides"][field_name] = _coerce(
                    value, _hints(ModelConfig)[field_name], dotted, source
                )
                return
            value = _coerce(value, hints[name], dotted, source)
            _check_model_overrides(value, "model.overrides", source)
            mhints = _hints(ModelConfig)
            self.state["model"]["overrides"] = {
                k: _coerce(v, mhints[k], f"model.overrides.{k}", source) for k, v in value.items()
            }
            return
        if rest:
            raise _unknown_key(dotted, source)
        self.state[section][name] = _coerce(value, hints[name], dotted, source)
        if section == "parallel" and name in _LAYOUT:
            self.explicit_layout.add(name)

    # one KEY=VALUE string
    def apply_override(self, item: str) -> None:
        source = f"override {item!r}"
        if not isinstance(item, str) or "=" not in item:
            raise NeoxrayError(f"{source}: expected KEY=VALUE, e.g. train.steps=5 or parallel.data=2")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise NeoxrayError(f"{source}: expected KEY=VALUE with a dotted key such as train.steps")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise NeoxrayError(f"{source}: the value of {key} is not valid YAML ({problem})") from None
        self.set_value(tuple(key.split(".")), value, source)

    def build(self) -> RunConfig:
        s = self.state
        parallel = s["parallel"]
        defaults = ParallelSection()
        for k in _LAYOUT:
            if k not in self.explicit_layout:
                parallel[k] = None if parallel["auto"] else getattr(defaults, k)
        sections = {name: cls(**s[name]) for name, cls in _SECTIONS.items()}
        return RunConfig(name=s["name"], run_dir=s["run_dir"], **sections)


def _check_model_overrides(overrides: dict, key: str, source: str | None = None) -> None:
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_OVERRIDABLE]
    where = f" in {source}" if source else ""
    for name in overrides:
        if name in _NOT_OVERRIDABLE:
            raise NeoxrayError(f"{key}.{name}{where} cannot be overridden; set {_NOT_OVERRIDABLE[name]} instead")
        if name not in fields:
            raise NeoxrayError(
                f"unknown key '{key}.{name}'{where}{_suggest(name, fields, prefix=key + '.')}; "
                f"ModelConfig fields: {', '.join(fields)}"
            )


def _unknown_key(dotted: str, source: str) -> NeoxrayError:
    """An error naming the unknown dotted key and its source, with the closest valid key."""
    parts = dotted.split(".")
    top = [*_TOP_LEVEL, *_SECTIONS]
    if len(parts) == 1:
        hint = _suggest(parts[0], top)
        if not hint:  # a field written without its section: `lr` -> `optimizer.lr`
            hint = _suggest(parts[0], _all_dotted_keys(), leaf=True)
        return NeoxrayError(f"unknown key '{dotted}' in {source}{hint}; top-level keys: {', '.join(top)}")
    if parts[0] not in _SECTIONS:
        hint = _suggest(parts[0], list(_SECTIONS))
        if hint:  # `optimiser.lr` -> `optimizer.lr`
            hint = hint.replace("'?)", f".{'.'.join(parts[1:])}'?)")
        return NeoxrayError(
            f"unknown key '{dotted}' in {source}: there is no section '{parts[0]}'{hint}; "
            f"sections: {', '.join(_SECTIONS)}"
        )
    section = parts[0]
    valid = list(_hints(_SECTIONS[section]))
    hint = _suggest(parts[1], valid, prefix=section + ".")
    if not hint:  # right field, wrong section: `train.lr` -> `optimizer.lr`
        hint = _suggest(parts[1], _all_dotted_keys(), leaf=True)
    return NeoxrayError(
        f"unknown key '{dotted}' in {source}{hint}; keys of {section}: {', '.join(valid)}"
    )


def _all_dotted_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _SECTIONS.items() for k in _hints(cls)]


def _suggest(word: str, candidates: typing.Iterable[str], prefix: str = "", leaf: bool = False) -> str:
    """" (did you mean 'X'?)" for the closest candidate (by the last dotted part when `leaf`), or ""."""
    candidates = list(candidates)
    if leaf:
        by_leaf: dict[str, str] = {}
        for c in candidates:
            by_leaf.setdefault(c.rsplit(".", 1)[-1], c)
        match = difflib.get_close_matches(word, list(by_leaf), n=1, cutoff=0.75)
        return f" (did you mean '{by_leaf[match[0]]}'?)" if match else ""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


# --------------------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation, in field order."""
    if cls not in _HINTS:
        resolved = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    import types

    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    if tp is Any:
        return "anything"
    if _is_union(tp):
        args = typing.get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_plural(item)}"
    if origin is dict or tp is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, _describe(tp))


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` checked against (and converted to) the annotation `tp`; a NeoxrayError naming `key`."""
    try:
        return _convert(value, tp)
    except _Mismatch as e:
        detail = f" ({e})" if str(e) else ""
        raise NeoxrayError(
            f"{key} must be {_describe(tp)}, got {_type_name(value)}{'' if value is None else f' {value!r}'}"
            f"{detail} ({source})"
        ) from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Mismatch("not a finite number")
        return value
    if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
        try:
            x = float(value.replace("_", ""))
        except ValueError:
            raise _Mismatch() from None
        if math.isfinite(x):
            return int(x) if x.is_integer() and not any(c in value for c in ".eE") else x
    raise _Mismatch()


def _convert(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch()
    if value is None:
        raise _Mismatch()
    origin = typing.get_origin(tp)
    if origin is Literal:
        options = typing.get_args(tp)
        if value in options and type(value) in {type(o) for o in options}:
            return value
        hint = _suggest(str(value), [str(o) for o in options]) if isinstance(value, str) else ""
        raise _Mismatch(hint.strip(" ()")) if hint else _Mismatch()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        (item,) = typing.get_args(tp)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, item))
            except _Mismatch:
                raise _Mismatch(f"item {i}: {v!r} is not {_describe(item)}") from None
        return out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch()
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        x = _number(value)
        if isinstance(x, float):
            if not x.is_integer():
                raise _Mismatch()
            x = int(x)
        return x
    if tp is float:
        return float(_number(value))
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch()
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug in this module, not bad input


# --------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------
def validate(cfg: RunConfig) -> None:
    """Check the whole run before any worker starts; every problem found is reported in one NeoxrayError
    (problems separated by '; '), each naming its key(s)."""
    errors: list[str] = []
    err = errors.append

    # model
    model: ModelConfig | None = None
    try:
        model = cfg.model_config()
    except NeoxrayError as e:
        err(str(e))

    # parallel
    p = cfg.parallel
    if not p.auto:
        for k in _LAYOUT:
            if getattr(p, k) is None:
                err(f"parallel.{k} is not set (set it, or use `parallel: auto` to choose the layout later)")
    for k in _LAYOUT:
        v = getattr(p, k)
        if v is not None and v < 1:
            err(f"parallel.{k}={v} must be >= 1")
    if model is not None and p.tensor is not None and p.tensor >= 1:
        tp = p.tensor
        shards = {"model.n_heads": model.n_heads, "model.vocab_size": model.vocab_size, "model.ffn_dim": model.ffn_dim}
        bad = [f"{k}={v}" for k, v in shards.items() if v % tp]
        if bad:
            ok = _divisors(math.gcd(*shards.values()))
            err(f"parallel.tensor={tp} does not divide {' and '.join(bad)} (tensor parallelism splits heads, "
                f"vocabulary rows and MLP columns evenly); valid parallel.tensor values: {_list(ok)}")
    if model is not None and p.pipeline is not None and p.pipeline > model.n_layers:
        err(f"parallel.pipeline={p.pipeline} exceeds model.n_layers={model.n_layers} (every pipeline stage "
            f"needs at least one layer); use parallel.pipeline <= {model.n_layers}")
    if p.zero_stage not in ZERO_STAGES:
        err(f"parallel.zero_stage={p.zero_stage} is not supported: DeepSpeed's pipeline engine supports ZeRO "
            f"stages 0 and 1 only")
    method = p.pipeline_partition.lower()
    if not (method in ("parameters", "uniform") or (method.startswith("type:") and len(method) > 5)):
        err(f"parallel.pipeline_partition={p.pipeline_partition!r} is not a DeepSpeed partition method "
            f"(use 'type:REGEX', 'parameters' or 'uniform')")
    if p.workers is not None and p.workers < 1:
        err(f"parallel.workers={p.workers} must be >= 1 (or null for every worker of the cluster)")
    if p.gpu_memory_gb is not None and not p.gpu_memory_gb > 0:
        err(f"parallel.gpu_memory_gb={p.gpu_memory_gb} must be > 0 (GiB per GPU; or null to read it from the "
            f"cluster)")
    if p.backend not in ("auto", "nccl", "gloo"):
        err(f"parallel.backend={p.backend!r} must be one of 'auto', 'nccl', 'gloo'")
    if p.backend == "nccl" and cfg.train.device == "cpu":
        err("parallel.backend=nccl needs GPUs, but train.device=cpu (use gloo or auto)")

    # train
    t = cfg.train
    if t.steps <= 0:
        err(f"train.steps={t.steps} must be > 0")
    if t.global_batch <= 0:
        err(f"train.global_batch={t.global_batch} must be > 0")
    if t.micro_batch <= 0:
        err(f"train.micro_batch={t.micro_batch} must be > 0")
    dp = p.data if (p.data is not None and p.data >= 1) else None
    if t.global_batch > 0 and t.micro_batch > 0:
        problem = _batch_problem(t.global_batch, t.micro_batch, dp or 1, dp is not None)
        if problem:
            err(problem)
    if t.seq_len is not None:
        if t.seq_len <= 0:
            err(f"train.seq_len={t.seq_len} must be > 0")
        elif model is not None and t.seq_len > model.max_seq_len:
            err(f"train.seq_len={t.seq_len} exceeds the model's max_seq_len={model.max_seq_len} "
                f"(raise it with model.overrides.max_seq_len)")
    if t.precision not in PRECISIONS:
        err(f"train.precision={t.precision!r} must be one of {', '.join(PRECISIONS)}")
    if t.device not in ("auto", "cpu", "cuda"):
        err(f"train.device={t.device!r} must be one of auto, cpu, cuda")
    if t.precision == "fp16" and t.device == "cpu":
        err("train.precision=fp16 needs GPUs, but train.device=cpu (use fp32 or bf16 on CPUs)")

    # optimizer
    o = cfg.optimizer
    if not o.lr > 0:
        err(f"optimizer.lr={o.lr} must be > 0")
    if o.min_lr < 0:
        err(f"optimizer.min_lr={o.min_lr} must be >= 0")
    if o.lr < o.min_lr:
        err(f"optimizer.lr={o.lr} is below optimizer.min_lr={o.min_lr} (need lr >= min_lr)")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        err(f"optimizer.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not o.eps > 0:
        err(f"optimizer.eps={o.eps} must be > 0")
    if o.weight_decay < 0:
        err(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if o.clip_grad < 0:
        err(f"optimizer.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping)")

    # schedule
    s = cfg.schedule
    if s.warmup_steps is not None and s.warmup_fraction is not None:
        err(f"schedule.warmup_steps={s.warmup_steps} and schedule.warmup_fraction={s.warmup_fraction} are both "
            f"set; set one (the other to null)")
    if s.warmup_steps is not None and s.warmup_steps < 0:
        err(f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
    if s.warmup_fraction is not None and not 0.0 <= s.warmup_fraction <= 1.0:
        err(f"schedule.warmup_fraction={s.warmup_fraction} must be in [0, 1]")
    if s.decay_steps is not None and s.decay_steps <= 0:
        err(f"schedule.decay_steps={s.decay_steps} must be > 0 (or null for train.steps)")
    elif s.style != "constant" and s.warmup_steps is not None and s.warmup_steps > cfg.decay_steps():
        err(f"schedule.warmup_steps={s.warmup_steps} exceeds the decay steps ({cfg.decay_steps()}, "
            f"schedule.decay_steps or train.steps)")
    if s.style not in ("cosine", "linear", "constant"):
        err(f"schedule.style={s.style!r} must be one of cosine, linear, constant")

    # data
    d = cfg.data
    paths = d.paths()
    if not paths or any(not str(x).strip() for x in paths):
        err("data.path must name a prepared dataset directory (or a non-empty list of them)")
    if d.weights is not None:
        if len(d.weights) != len(paths):
            err(f"data.weights has {len(d.weights)} entries but data.path has {len(paths)}; give one weight "
                f"per dataset")
        elif any(w < 0 for w in d.weights) or not sum(d.weights) > 0:
            err(f"data.weights={d.weights} must be >= 0 with a positive sum")

    # checkpoint, logging, eval, run
    if cfg.checkpoint.every < 0:
        err(f"checkpoint.every={cfg.checkpoint.every} must be >= 0 (0: only at the end)")
    if cfg.checkpoint.keep < 0:
        err(f"checkpoint.keep={cfg.checkpoint.keep} must be >= 0 (0: keep all)")
    if cfg.logging.every < 1:
        err(f"logging.every={cfg.logging.every} must be >= 1")
    if cfg.logging.metrics_file is not None and not cfg.logging.metrics_file.strip():
        err("logging.metrics_file must be a file name (or null for none)")
    if cfg.eval.every < 0:
        err(f"eval.every={cfg.eval.every} must be >= 0 (0: never)")
    if cfg.eval.every > 0 and cfg.eval.batches < 1:
        err(f"eval.batches={cfg.eval.batches} must be >= 1 when eval.every > 0")
    if not cfg.name or "/" in cfg.name or "\\" in cfg.name or cfg.name in (".", ".."):
        err(f"name={cfg.name!r} must be a plain directory name (no path separators)")

    if errors:
        raise NeoxrayError("; ".join(errors))


def check_paths(cfg: RunConfig) -> None:
    """Check that the input paths exist on this machine (`data.path`, `data.validation_path`,
    `model.init_from`); separate from `validate` because a driver may name paths only the workers see."""
    def absent(p) -> bool:  # URIs (s3://, gs://, ...) are read through the data reader's filesystems
        return "://" not in str(p) and not Path(p).exists()

    missing = [f"data.path={p}" for p in cfg.data.paths() if absent(p)]
    if cfg.data.validation_path and absent(cfg.data.validation_path):
        missing.append(f"data.validation_path={cfg.data.validation_path}")
    if cfg.checkpoint.load_from and not Path(cfg.checkpoint.load_from).exists():
        missing.append(f"checkpoint.load_from={cfg.checkpoint.load_from}")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        missing.append(f"model.init_from={cfg.model.init_from}")
    if missing:
        raise NeoxrayError("not found: " + ", ".join(missing))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _list(xs: list[int], limit: int = 12) -> str:
    return ", ".join(map(str, xs[:limit])) + (", ..." if len(xs) > limit else "")


def _batch_problem(global_batch: int, micro_batch: int, dp: int, dp_known: bool) -> str | None:
    unit = micro_batch * dp
    if global_batch % unit == 0:
        return None
    if not dp_known:
        desc = f"train.micro_batch={micro_batch}"
    else:
        desc = f"train.micro_batch={micro_batch} x parallel.data={dp} = {unit}"
    lower = (global_batch // unit) * unit
    gb = [x for x in (lower, lower + unit) if x > 0]
    hint = f"valid train.global_batch values near it: {' or '.join(map(str, gb))}"
    if global_batch % dp == 0:
        hint += f"; or a train.micro_batch dividing {global_batch // dp}: {_list(_divisors(global_batch // dp))}"
    return f"train.global_batch={global_batch} is not divisible by {desc}; {hint}"


def _require_layout(p: ParallelSection) -> None:
    missing = ", ".join(f"parallel.{k}" for k in _LAYOUT if getattr(p, k) is None)
    if missing:
        raise NeoxrayError(
            f"the parallel layout is not chosen yet ({missing} unset, as `parallel: auto` leaves them); "
            f"choose one with with_layout() or set them"
        )


# --------------------------------------------------------------------------------------------------------
# derived: gradient accumulation, DeepSpeed config
# --------------------------------------------------------------------------------------------------------
def gradient_accumulation_steps(cfg: RunConfig) -> int:
    """Micro-batches per optimizer step on each data-parallel replica: global_batch / (micro_batch x dp)."""
    _require_layout(cfg.parallel)
    t, dp = cfg.train, cfg.parallel.data
    problem = _batch_problem(t.global_batch, t.micro_batch, dp, True) if t.micro_batch > 0 and dp > 0 else None
    if problem or t.global_batch <= 0 or t.micro_batch <= 0 or dp <= 0:
        raise NeoxrayError(problem or "train.global_batch, train.micro_batch and parallel.data must be > 0")
    return t.global_batch // (t.micro_batch * dp)


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON config for `deepspeed.initialize`. We pass our own torch AdamW and set the learning
    rate ourselves (`lr_at`), so there is no `optimizer` or `scheduler` entry; DeepSpeed owns the batch
    arithmetic, gradient clipping, ZeRO and mixed precision."""
    gas = gradient_accumulation_steps(cfg)
    precision = cfg.train.precision
    if precision not in PRECISIONS:
        raise NeoxrayError(f"train.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    if cfg.parallel.zero_stage not in ZERO_STAGES:
        raise NeoxrayError(f"parallel.zero_stage={cfg.parallel.zero_stage}: DeepSpeed's pipeline engine supports "
                           f"ZeRO stages 0 and 1 only")
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(cfg.optimizer.clip_grad),
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # a torch.optim.AdamW instance is not on ZeRO's list of tested optimizers
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": DEEPSPEED_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": FP16_HYSTERESIS,
            "min_loss_scale": FP16_MIN_LOSS_SCALE,
        }
    if precision == "bf16" and cfg.parallel.zero_stage == 1:
        # accumulate micro-batch gradients in fp32 (DeepSpeed's BF16_Optimizer path); with ZeRO 0 DeepSpeed
        # accepts only gradient accumulation in the model dtype
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


# --------------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------------
def to_dict(cfg: RunConfig) -> dict:
    """The config as a plain nested dict (YAML/JSON-safe); `from_dict` reads it back."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Sections in block style, lists (betas, paths, weights) inline."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML, sections in schema order; `load_run_config` reads it back."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def resolved(cfg: RunConfig) -> RunConfig:
    """A copy with the derived defaults written out (train.seq_len, schedule.decay_steps, run_dir), as stored
    with checkpoints and in the run directory."""
    train = dataclasses.replace(cfg.train, seq_len=cfg.seq_len())
    schedule = dataclasses.replace(cfg.schedule, decay_steps=cfg.decay_steps())
    return dataclasses.replace(cfg, train=train, schedule=schedule, run_dir=str(cfg.run_path()))


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write `dump_yaml(cfg)` to `path` atomically (a temporary sibling renamed into place)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_yaml(cfg))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
