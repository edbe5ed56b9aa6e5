"""Everything a run is checked against before any worker starts, and before anything in its run directory is
touched: where it resumes (the newest intact checkpoint, damaged ones set aside by name), whether that checkpoint
holds this run's model and tokenizer and still has steps to train, and whether the prepared data fits the model
(row length, vocabulary, tokenizer, a validation split when evaluation is on). A problem is one NeoxrayError
naming the keys and paths; the driver (`driver.run_train`) and the Ray-less launcher (`local.run_local`) both
call `preflight` first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.tokenizer import TOKENIZER_FILE
from neoxray.pipelines.dataset_format import read_manifest
from neoxray.pipelines.reader import parse_data_spec
from neoxray.platform.checkpoint import newest_intact_checkpoint, read_meta, verify_checkpoint


@dataclass
class Preflight:
    cfg: object
    """The run config to train with (a warmup longer than the run shortened)."""
    resume_from: str | None = None
    """The checkpoint the workers load (weights, optimizer, step, data position), or None for a fresh start."""
    finished_at: int | None = None
    """Set when the newest checkpoint is already at (or past) train.steps: there is nothing to train."""


def preflight(cfg, run_dir, say: Callable[[str], None] = print) -> Preflight:
    """Check `cfg` (validated and resolved) against its run directory, checkpoints and data; see the module
    docstring. Damaged checkpoints are renamed aside and reported through `say`; nothing else is written."""
    model = cfg.model_config()
    seq = cfg.seq_len(model)
    result = Preflight(cfg=_fit_schedule(cfg, say))
    manifests = _data_manifests(cfg, model, seq)
    tokenizers = {m["tokenizer"]["sha256"]: path for path, m in manifests if m.get("tokenizer")}
    if len(tokenizers) > 1:
        a, b = list(tokenizers.values())[:2]
        raise NeoxrayError(f"data.path: {a} and {b} were prepared with different tokenizers; mix only datasets of one")
    data_tok = next(iter(tokenizers), None)

    resume = newest_intact_checkpoint(run_dir, say) if cfg.checkpoint.resume else None
    if resume is None and cfg.checkpoint.load_from:
        resume = Path(cfg.checkpoint.load_from)
        try:
            verify_checkpoint(resume)
        except NeoxrayError as e:
            raise NeoxrayError(f"checkpoint.load_from: {e}") from None
    if resume is not None:
        meta = read_meta(resume)
        saved = ModelConfig.from_dict(meta["model_config"])
        diffs = saved.function_differences(model)
        if diffs:
            raise NeoxrayError(
                f"{resume} holds another model than this run's config ({'; '.join(diffs)}: checkpoint vs run); "
                f"nothing was changed: fix model.* to match it, or train into a new --run-dir"
            )
        _check_lora_resume(cfg, resume, meta)
        if int(meta["step"]) >= cfg.train.steps:
            result.finished_at = int(meta["step"])
        saved_tok = (meta.get("tokenizer") or {}).get("sha256")
        if saved_tok and data_tok and saved_tok != data_tok:
            raise NeoxrayError(
                f"data.path {tokenizers[data_tok]} was prepared with another tokenizer than {resume} was trained "
                f"with; prepare the data with the checkpoint's tokenizer ({resume / TOKENIZER_FILE})"
            )
        result.resume_from = str(resume)
    elif cfg.model.init_from and data_tok:
        _check_init_from_tokenizer(cfg, tokenizers[data_tok], data_tok)
    return result


def _check_lora_resume(cfg, resume: Path, meta: dict) -> None:
    """A LoRA run resumes only its own kind of checkpoint: adapters of the same shape, on the same base."""
    from neoxray.platform.lora_checkpoint import check_base, is_lora, resolve_base

    spec = cfg.lora.spec()
    if spec is None and is_lora(meta):
        raise NeoxrayError(
            f"{resume} is a LoRA checkpoint (adapters only), but lora.rank is 0 in this run's config; set the lora "
            f"section as it was trained ({meta['lora']}), or train into a new --run-dir"
        )
    if spec is None:
        return
    if not is_lora(meta):
        raise NeoxrayError(
            f"{resume} holds a full model, but lora.rank={cfg.lora.rank} trains adapters; train the adapters into a "
            f"new --run-dir with model.init_from={resume} as their base"
        )
    saved = meta["lora"]
    now = spec.to_dict()
    keys = ("r", "alpha", "targets", "use_rslora", "layers")
    diffs = [f"lora.{'rank' if k == 'r' else k} {saved.get(k)!r} vs {now[k]!r}" for k in keys if saved.get(k) != now[k]]
    if diffs:
        raise NeoxrayError(
            f"{resume} holds other adapters than this run's config ({'; '.join(diffs)}: checkpoint vs run); nothing "
            f"was changed: fix the lora section to match it, or train into a new --run-dir"
        )
    check_base(meta, resume, resolve_base(cfg.model.init_from))


def nothing_to_train(run_dir, checked: Preflight, steps: int) -> NeoxrayError:
    """The error for a run started again when its newest checkpoint is already at train.steps."""
    return NeoxrayError(
        f"run {run_dir} is already at step {checked.finished_at} >= train.steps {steps}: nothing to train (raise "
        f"train.steps to continue it, or train into a new --run-dir)"
    )


def _check_init_from_tokenizer(cfg, data_path: str, data_tok: str) -> None:
    """Fine-tuning: the data must be tokenized with the tokenizer the Hugging Face directory carries."""
    from neoxray.model.tokenizer import Tokenizer
    from neoxray.platform.lora_checkpoint import resolve_base

    tok_file = resolve_base(cfg.model.init_from).path / TOKENIZER_FILE
    if tok_file.exists() and Tokenizer.load(tok_file).sha256 != data_tok:
        raise NeoxrayError(
            f"data.path {data_path} was prepared with another tokenizer than model.init_from={cfg.model.init_from} "
            f"carries; prepare the data with --tokenizer {cfg.model.init_from}"
        )


def _fit_schedule(cfg, say):
    """A warmup longer than the decay steps is shortened to a tenth of them (a short smoke run of a shipped
    config, `train.steps=4`, must work), with a warning."""
    warmup, decay = cfg.warmup_steps(), cfg.decay_steps()
    if cfg.schedule.style == "constant" or warmup <= decay:
        return cfg
    short = decay // 10
    say(
        f"[neoxray] warning: the warmup ({warmup} steps) is longer than the run's decay ({decay} steps); shortened "
        f"to {short} (set schedule.warmup_steps to choose)"
    )
    schedule = dataclasses.replace(cfg.schedule, warmup_steps=short, warmup_fraction=None)
    return dataclasses.replace(cfg, schedule=schedule)


def _data_manifests(cfg, model: ModelConfig, seq: int) -> list[tuple[str, dict]]:
    """Each training dataset's manifest (and the validation dataset's, when evaluation is on), checked against
    the model: rows of seq + 1 tokens, a vocabulary the model's embedding holds, rows to train (and evaluate) on."""
    out = []
    specs = [(spec, "train") for spec in cfg.data.paths()]
    if cfg.eval.every > 0:
        specs += (
            [(cfg.data.validation_path, "validation")]
            if cfg.data.validation_path
            else [(spec, "validation") for spec in cfg.data.paths()]
        )
    for spec, split in specs:
        path, _ = parse_data_spec(spec)
        key = "data.validation_path" if spec == cfg.data.validation_path else "data.path"
        m = read_manifest(path)
        if int(m["seq_len"]) != seq:
            raise NeoxrayError(
                f"{key} {path}: rows hold {m['seq_len']} + 1 tokens, but train.seq_len is {seq}; prepare the data "
                f"with --seq-len {seq} or set train.seq_len={m['seq_len']}"
            )
        vocab = int((m.get("tokenizer") or {}).get("vocab_size", 0))
        if vocab > model.vocab_size:
            raise NeoxrayError(
                f"{key} {path} was tokenized with a {vocab:,}-token vocabulary, but the model's embedding has "
                f"{model.vocab_size:,} rows (model.vocab_size): ids past it would be wrong; use the model's "
                f"tokenizer, or a model with model.overrides.vocab_size >= {vocab}"
            )
        rows = int(m["splits"][split]["rows"])
        if rows == 0:
            if split == "validation":
                raise NeoxrayError(
                    f"{key} {path} has no validation rows, but eval.every={cfg.eval.every} evaluates on them; "
                    f"prepare it with a --val-fraction > 0, set data.validation_path, or set eval.every=0"
                )
            raise NeoxrayError(f"{key} {path} has no training rows")
        out.append((path, m))
    return out
