"""Checking a whole run before any worker starts: the layout against the model, batch arithmetic, sequence
length, precision, optimizer values the optimizer can hold, schedule, data and checkpoint settings. One check per
section of the schema (`_lora`, `_parallel`, ...), each yielding its problems; every problem found is reported
at once, each naming its key(s)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.lora_spec import lora_problems
from neoxray.model.precision import PRECISIONS
from neoxray.paths import is_uri, local_path
from neoxray.platform.train.config.schema import (
    LAYOUT,
    ZERO_STAGES,
    CheckpointSection,
    DataSection,
    EvalSection,
    LoggingSection,
    OptimizerSection,
    ParallelSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
    require_layout,
)

FLOAT32_MAX = 3.4028234663852886e38
"""float32's largest value (torch.finfo(torch.float32).max): AdamW steps on fp32 weights, or on fp32 master copies
of bf16 and fp16 weights, whatever train.precision is."""


def validate(cfg: RunConfig) -> None:
    """Check the whole run before any worker starts; every problem found is reported in one NeoxrayError
    (problems separated by '; '), each naming its key(s). One check per section, in the schema's order."""
    errors: list[str] = []
    model: ModelConfig | None = None
    try:
        model = cfg.model_config()
    except NeoxrayError as e:
        errors.append(str(e))
    errors += _lora(cfg)
    errors += _parallel(cfg.parallel, cfg.train, model)
    errors += _train(cfg.train, cfg.parallel, model)
    errors += _optimizer(cfg.optimizer)
    errors += _schedule(cfg.schedule)
    errors += _data(cfg.data)
    errors += _checkpoint(cfg.checkpoint)
    errors += _logging(cfg.logging)
    errors += _eval(cfg.eval)
    errors += _run_name(cfg.name)
    if errors:
        raise NeoxrayError("; ".join(errors))


Problems = Iterator[str]
"""What a section's check yields: one message per problem, naming its key(s)."""


def _lora(cfg: RunConfig) -> Problems:
    """The rank (0: no LoRA), the base it needs, and the adapters' shape (`neoxray.model.lora_spec`'s checks)."""
    lo = cfg.lora
    if isinstance(lo.rank, bool) or not isinstance(lo.rank, int) or lo.rank < 0:
        yield f"lora.rank={lo.rank!r} must be an integer >= 0 (0: no LoRA)"
        return
    if not lo.rank:
        return
    if not cfg.model.init_from:
        yield (
            f"lora.rank={lo.rank} trains adapters on a frozen base, but model.init_from is not set; name the base "
            f"(a Hugging Face directory, a checkpoint or a run directory)"
        )
    yield from lora_problems(lo.alpha, lo.dropout, lo.targets, lo.use_rslora)


def _parallel(p: ParallelSection, t: TrainSection, model: ModelConfig | None) -> Problems:
    if not p.auto:
        for k in LAYOUT:
            if getattr(p, k) is None:
                yield f"parallel.{k} is not set (set it, or use `parallel: auto` to choose the layout later)"
    for k in LAYOUT:
        v = getattr(p, k)
        if v is not None and v < 1:
            yield f"parallel.{k}={v} must be >= 1"
    if model is not None and p.tensor is not None and p.tensor >= 1:
        tp = p.tensor
        shards = {"model.n_heads": model.n_heads, "model.vocab_size": model.vocab_size, "model.ffn_dim": model.ffn_dim}
        bad = [f"{k}={v}" for k, v in shards.items() if v % tp]
        if bad:
            ok = _divisors(math.gcd(*shards.values()))
            yield (
                f"parallel.tensor={tp} does not divide {' and '.join(bad)} (tensor parallelism splits heads, "
                f"vocabulary rows and MLP columns evenly); valid parallel.tensor values: {_list(ok)}"
            )
    if model is not None and p.pipeline is not None and p.pipeline > model.n_layers:
        yield (
            f"parallel.pipeline={p.pipeline} exceeds model.n_layers={model.n_layers} (every pipeline stage "
            f"needs at least one layer); use parallel.pipeline <= {model.n_layers}"
        )
    if p.zero_stage not in ZERO_STAGES:
        yield (
            f"parallel.zero_stage={p.zero_stage} is not supported: DeepSpeed's pipeline engine supports ZeRO "
            f"stages 0 and 1 only"
        )
    method = p.pipeline_partition.lower()
    if not (method in ("parameters", "uniform") or (method.startswith("type:") and len(method) > 5)):
        yield (
            f"parallel.pipeline_partition={p.pipeline_partition!r} is not a DeepSpeed partition method "
            f"(use 'type:REGEX', 'parameters' or 'uniform')"
        )
    if p.workers is not None and p.workers < 1:
        yield f"parallel.workers={p.workers} must be >= 1 (or null for every worker of the cluster)"
    if p.gpu_memory_gb is not None and not p.gpu_memory_gb > 0:
        yield f"parallel.gpu_memory_gb={p.gpu_memory_gb} must be > 0 (GiB per GPU; or null to read it from the cluster)"
    if p.backend not in ("auto", "nccl", "gloo"):
        yield f"parallel.backend={p.backend!r} must be one of 'auto', 'nccl', 'gloo'"
    if p.backend == "nccl" and t.device == "cpu":
        yield "parallel.backend=nccl needs GPUs, but train.device=cpu (use gloo or auto)"


def _train(t: TrainSection, p: ParallelSection, model: ModelConfig | None) -> Problems:
    if t.steps <= 0:
        yield f"train.steps={t.steps} must be > 0"
    if t.global_batch <= 0:
        yield f"train.global_batch={t.global_batch} must be > 0"
    if t.micro_batch <= 0:
        yield f"train.micro_batch={t.micro_batch} must be > 0"
    dp = p.data if (p.data is not None and p.data >= 1) else None
    if t.global_batch > 0 and t.micro_batch > 0:
        problem = _batch_problem(t.global_batch, t.micro_batch, dp or 1, dp is not None)
        if problem:
            yield problem
    if t.seq_len is not None:
        if t.seq_len <= 0:
            yield f"train.seq_len={t.seq_len} must be > 0"
        elif model is not None and t.seq_len > model.max_seq_len:
            yield (
                f"train.seq_len={t.seq_len} exceeds the model's max_seq_len={model.max_seq_len} "
                f"(raise it with model.overrides.max_seq_len)"
            )
    if t.precision not in PRECISIONS:
        yield f"train.precision={t.precision!r} must be one of {', '.join(PRECISIONS)}"
    if t.device not in ("auto", "cpu", "cuda"):
        yield f"train.device={t.device!r} must be one of auto, cpu, cuda"
    if t.precision == "fp16" and t.device == "cpu":
        yield "train.precision=fp16 needs GPUs, but train.device=cpu (use fp32 or bf16 on CPUs)"


def _optimizer(o: OptimizerSection) -> Problems:
    if not o.lr > 0:
        yield f"optimizer.lr={o.lr} must be > 0"
    if o.min_lr < 0:
        yield f"optimizer.min_lr={o.min_lr} must be >= 0"
    if o.lr < o.min_lr:
        yield f"optimizer.lr={o.lr} is below optimizer.min_lr={o.min_lr} (need lr >= min_lr)"
    betas_ok = len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas)
    if not betas_ok:
        yield f"optimizer.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]"
    if not o.eps > 0:
        yield f"optimizer.eps={o.eps} must be > 0"
    if o.weight_decay < 0:
        yield f"optimizer.weight_decay={o.weight_decay} must be >= 0"
    if o.clip_grad < 0:
        yield f"optimizer.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping)"
    yield from _beyond_float32(o, o.betas[0] if betas_ok else 0.0)


def _beyond_float32(o: OptimizerSection, beta1: float) -> Problems:
    """Values that leave float32 in AdamW's step (torch.optim.AdamW, on fp32 weights: `FLOAT32_MAX`). Its step
    size lr / (1 - beta1^t), largest at the first step, is handed to the weights as a float32 scalar, and beyond
    float32 torch raises "value cannot be converted to type float without overflow" inside every worker; eps
    beyond it is infinity in the denominator (every update silently zero); lr x weight_decay beyond it makes the
    decay factor 1 - lr x weight_decay, and every weight, infinite."""
    where = f"float32's largest value ({FLOAT32_MAX:.3g}), in which the optimizer steps"
    step = o.lr / (1 - beta1)
    if step > FLOAT32_MAX:
        yield f"optimizer.lr={o.lr} is too large: AdamW's first step size lr / (1 - beta1) = {step:.3g} exceeds {where}"
    if o.eps > FLOAT32_MAX:
        yield f"optimizer.eps={o.eps} exceeds {where}: every update would be zero"
    if o.lr * o.weight_decay > FLOAT32_MAX:
        yield (
            f"optimizer.weight_decay={o.weight_decay} x optimizer.lr={o.lr} = {o.lr * o.weight_decay:.3g} exceeds "
            f"{where}: AdamW's decay would make every weight infinite"
        )


def _schedule(s: ScheduleSection) -> Problems:
    if s.warmup_steps is not None and s.warmup_fraction is not None:
        yield (
            f"schedule.warmup_steps={s.warmup_steps} and schedule.warmup_fraction={s.warmup_fraction} are both "
            f"set; set one (the other to null)"
        )
    if s.warmup_steps is not None and s.warmup_steps < 0:
        yield f"schedule.warmup_steps={s.warmup_steps} must be >= 0"
    if s.warmup_fraction is not None and not 0.0 <= s.warmup_fraction <= 1.0:
        yield f"schedule.warmup_fraction={s.warmup_fraction} must be in [0, 1]"
    if s.decay_steps is not None and s.decay_steps <= 0:
        yield f"schedule.decay_steps={s.decay_steps} must be > 0 (or null for train.steps)"
    # a warmup longer than the decay is shortened with a warning when the run starts (train/preflight.py)
    if s.style not in ("cosine", "linear", "constant"):
        yield f"schedule.style={s.style!r} must be one of cosine, linear, constant"


def _data(d: DataSection) -> Problems:
    paths = d.paths()
    if not paths or any(not str(x).strip() for x in paths):
        yield "data.path must name a prepared dataset directory (or a non-empty list of them)"
    if d.weights is not None:
        if len(d.weights) != len(paths):
            yield (
                f"data.weights has {len(d.weights)} entries but data.path has {len(paths)}; give one weight per dataset"
            )
        elif any(w < 0 for w in d.weights) or not sum(d.weights) > 0:
            yield f"data.weights={d.weights} must be >= 0 with a positive sum"


def _checkpoint(c: CheckpointSection) -> Problems:
    if c.every < 0:
        yield f"checkpoint.every={c.every} must be >= 0 (0: only at the end)"
    if c.keep < 0:
        yield f"checkpoint.keep={c.keep} must be >= 0 (0: keep all)"


def _logging(lg: LoggingSection) -> Problems:
    if lg.every < 1:
        yield f"logging.every={lg.every} must be >= 1"
    if lg.metrics_file is not None and not lg.metrics_file.strip():
        yield "logging.metrics_file must be a file name (or null for none)"


def _eval(e: EvalSection) -> Problems:
    if e.every < 0:
        yield f"eval.every={e.every} must be >= 0 (0: never)"
    if e.every > 0 and e.batches < 1:
        yield f"eval.batches={e.batches} must be >= 1 when eval.every > 0"
    if any(not isinstance(t, str) or not t.strip() for t in e.tasks):
        yield f"eval.tasks={e.tasks} must be task names"
    if e.num_fewshot is not None and e.num_fewshot < 0:
        yield f"eval.num_fewshot={e.num_fewshot} must be >= 0 (or null for each task's default)"
    if e.limit is not None and e.limit < 1:
        yield f"eval.limit={e.limit} must be >= 1 (or null for every example)"
    if any(not (isinstance(v, int | float) and v >= 0) for v in e.resources.values()):
        yield f"eval.resources={e.resources} must map resource names to amounts >= 0, e.g. {{CPU: 1}}"


def _run_name(name: str) -> Problems:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        yield f"name={name!r} must be a plain directory name (no path separators)"


def check_local_paths(cfg: RunConfig) -> None:
    """What is on this node's disk by definition (`checkpoint.staging_dir`) is not a URI: one line naming the
    key, before a local folder named `s3:` is made. The run directory, `checkpoint.load_from` and
    `model.init_from` may be URIs (`neoxray.platform.run_store`, `neoxray.platform.model_cache`)."""
    if cfg.checkpoint.staging_dir:
        local_path(cfg.checkpoint.staging_dir, "checkpoint.staging_dir")


def check_paths(cfg: RunConfig) -> None:
    """Check that the input paths exist on this machine (`data.path`, `data.validation_path`,
    `model.init_from`); separate from `validate` because a driver may name paths only the workers see. The
    local-only ones are checked first (`check_local_paths`)."""
    check_local_paths(cfg)

    def absent(p) -> bool:  # URIs (s3://, gs://, ...) are read through pyarrow's filesystems, checked there
        return not is_uri(p) and not Path(p).exists()

    missing = [f"data.path={p}" for p in cfg.data.paths() if absent(p)]
    if cfg.data.validation_path and absent(cfg.data.validation_path):
        missing.append(f"data.validation_path={cfg.data.validation_path}")
    if cfg.checkpoint.load_from and absent(cfg.checkpoint.load_from):
        missing.append(f"checkpoint.load_from={cfg.checkpoint.load_from}")
    if cfg.model.init_from and absent(cfg.model.init_from):
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


def gradient_accumulation_steps(cfg: RunConfig) -> int:
    """Micro-batches per optimizer step on each data-parallel replica: global_batch / (micro_batch x dp)."""
    require_layout(cfg.parallel)
    t, dp = cfg.train, cfg.parallel.data
    problem = _batch_problem(t.global_batch, t.micro_batch, dp, True) if t.micro_batch > 0 and dp > 0 else None
    if problem or t.global_batch <= 0 or t.micro_batch <= 0 or dp <= 0:
        raise NeoxrayError(problem or "train.global_batch, train.micro_batch and parallel.data must be > 0")
    return t.global_batch // (t.micro_batch * dp)
