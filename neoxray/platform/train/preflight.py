"""Everything a run is checked against before any worker starts, and before anything in its run directory is
touched: where it resumes (`neoxray.platform.train.resume`: the newest intact checkpoint; a run directory whose
checkpoints are all unusable is refused), whether that checkpoint holds this run's model and tokenizer and still
has steps to train, whether the model it starts from (`model.init_from`, `checkpoint.load_from`) is intact, and
whether the prepared data fits the model (the row length its files hold, vocabulary, tokenizer, a validation
split when evaluation is on). A problem is one NeoxrayError naming the keys and paths; only once every check has
passed are damaged checkpoints set aside. `plan_run` is the start of every run, the Ray driver's and the Ray-less
launcher's alike: validate, resolve, `preflight`, and the `RunPlan` the workers receive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.tokenizer import TOKENIZER_FILE
from neoxray.paths import is_uri
from neoxray.pipelines.dataset_format import read_manifest, stored_row_length
from neoxray.pipelines.reader import parse_data_spec
from neoxray.platform.checkpoint import read_meta, verify_checkpoint
from neoxray.platform.run_store import RunStore, is_store, mirror_dir
from neoxray.platform.train.resume import find_resume_point, find_store_resume_point
from neoxray.platform.train.run_plan import RunPlan, absolute_paths


def plan_run(cfg, run_dir=None, say: Callable[[str], None] = print, start_over: bool = False) -> RunPlan:
    """Validate `cfg`, resolve it, and check it against its run directory (`run_dir`, else the config's
    `run_dir`, else runs/<name>), its checkpoints and data; a run already at train.steps is a NeoxrayError.
    `start_over`: train from step 0 in a run directory whose checkpoints are set aside."""
    from neoxray.platform.train.config import check_local_paths, resolved, validate

    check_local_paths(cfg)
    validate(cfg)
    cfg = absolute_paths(resolved(cfg))
    target = run_dir or cfg.run_dir or Path("runs") / cfg.name
    store = None
    if is_store(target):
        store = RunStore(str(target))
        store.probe("--run-dir" if run_dir else "run_dir")
        run_dir = mirror_dir(store.uri, cfg.checkpoint.staging_dir)
    else:
        run_dir = Path(target).resolve()
    plan, finished_at = preflight(cfg, run_dir, say, start_over=start_over, store=store)
    if finished_at is not None:
        raise NeoxrayError(
            f"run {store or run_dir} is already at step {finished_at} >= train.steps {cfg.train.steps}: nothing to "
            f"train (raise train.steps to continue it, or train into a new --run-dir)"
        )
    return plan


def replan(plan: RunPlan, say: Callable[[str], None] = print) -> RunPlan | None:
    """The plan of a restart after a fault: where the run stands now (its newest intact checkpoint); None when
    the run reached train.steps before the fault."""
    store = RunStore(plan.store_uri) if plan.store_uri else None
    new, finished_at = preflight(plan.cfg, plan.run_dir, say, store=store)
    return None if finished_at is not None else new


def preflight(
    cfg, run_dir: Path, say: Callable[[str], None] = print, start_over: bool = False, store=None
) -> tuple[RunPlan, int | None]:
    """Check `cfg` (validated and resolved) against its run directory, checkpoints and data; see the module
    docstring. -> (the run's plan, the step its newest checkpoint is at when that is train.steps or more: nothing
    to train; else None). `start_over`: set the run directory's checkpoints aside and train from step 0.
    Damaged checkpoints are renamed aside and reported through `say` once everything else has passed. `store`:
    the run's `RunStore` when it lives on object storage (`run_dir` is then the workers' local mirror)."""
    model = cfg.model_config()
    cfg = _fit_schedule(_resolve_init_from(cfg), say)
    manifests = _data_manifests(cfg, model, cfg.seq_len(model))
    tokenizers = {m["tokenizer"]["sha256"]: path for path, m in manifests if m.get("tokenizer")}
    if len(tokenizers) > 1:
        a, b = list(tokenizers.values())[:2]
        raise NeoxrayError(f"data.path: {a} and {b} were prepared with different tokenizers; mix only datasets of one")
    data_tok = next(iter(tokenizers), None)
    chat_template = _chat_template(cfg, manifests)

    point = None
    if (cfg.checkpoint.resume or start_over) and store is not None:
        point = find_store_resume_point(store, run_dir, start_over, cfg.logging.metrics_file)
    elif cfg.checkpoint.resume or start_over:
        point = find_resume_point(run_dir, start_over, cfg.logging.metrics_file)
    resume = point.checkpoint if point is not None else None
    resume_from = None if resume is None else str(resume)
    if resume is None and cfg.checkpoint.load_from:
        resume_from, resume = _load_from(cfg.checkpoint.load_from)
    finished_at = None
    if resume is not None:
        meta = point.meta if getattr(point, "meta", None) is not None else read_meta(resume)
        _check_same_model(resume, meta, model)
        _check_lora_resume(cfg, resume, meta)
        finished_at = int(meta["step"]) if int(meta["step"]) >= cfg.train.steps else None
        _check_data_tokenizer(resume, meta, tokenizers, data_tok)
    elif cfg.model.init_from and data_tok:
        _check_init_from_tokenizer(cfg, tokenizers[data_tok], data_tok)
    own = point is not None and point.checkpoint is not None
    plan = RunPlan(
        cfg=cfg,
        model_config=model,
        run_dir=Path(run_dir),
        resume_from=resume_from,
        resume_verified=point.verified if own else True,
        newest_checkpoint=point.newest_verified if own else resume_from,
        store_uri=None if store is None else store.uri,
        chat_template=chat_template,
    )
    if point is not None and finished_at is None:
        point.apply(say)
    return plan, finished_at


def _verify(checkpoint: Path, key: str) -> None:
    """A checkpoint a run starts from, every file checked against its meta.json; a NeoxrayError naming `key`."""
    try:
        verify_checkpoint(checkpoint)
    except NeoxrayError as e:
        raise NeoxrayError(f"{key}: {e}") from None


def _load_from(load_from: str) -> tuple[str, Path]:
    """`checkpoint.load_from` checked file by file -> (what the workers load: the path, or for a URI the pinned
    URI of the checkpoint, which each node reads through its model cache; the local folder the checks read). A
    URI's files are checked against their checksums as this node's cache is filled."""
    key = "checkpoint.load_from"
    if not is_uri(load_from):
        _verify(Path(load_from), key)
        return load_from, Path(load_from)
    from neoxray.platform.model_cache import local_model, pin_model_uri

    kind, uri = pin_model_uri(load_from, key)
    if kind != "checkpoint":
        raise NeoxrayError(
            f"{key}={load_from}: a Hugging Face model directory, not a checkpoint; name it in "
            f"model.init_from to start from its weights"
        )
    return uri, Path(local_model(uri, key))


def _resolve_init_from(cfg):
    """`model.init_from` resolved once (a run directory: its newest checkpoint) and, when it is a checkpoint,
    checked file by file, before any worker reads it."""
    if not cfg.model.init_from:
        return cfg
    from neoxray.platform.lora_checkpoint import resolve_base

    base = resolve_base(cfg.model.init_from)
    if base.kind == "checkpoint" and base.origin is None:  # a URI's files were checked filling the cache
        _verify(base.path, f"model.init_from={cfg.model.init_from}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=base.origin or str(base.path)))


def _check_same_model(resume: Path, meta: dict, model: ModelConfig) -> None:
    diffs = ModelConfig.from_dict(meta["model_config"]).function_differences(model)
    if diffs:
        raise NeoxrayError(
            f"{resume} holds another model than this run's config ({'; '.join(diffs)}: checkpoint vs run); "
            f"nothing was changed: fix model.* to match it, or train into a new --run-dir"
        )


def _check_data_tokenizer(resume: Path, meta: dict, tokenizers: dict, data_tok: str | None) -> None:
    saved_tok = (meta.get("tokenizer") or {}).get("sha256")
    if saved_tok and data_tok and saved_tok != data_tok:
        raise NeoxrayError(
            f"data.path {tokenizers[data_tok]} was prepared with another tokenizer than {resume} was trained "
            f"with; prepare the data with the checkpoint's tokenizer ({resume / TOKENIZER_FILE})"
        )


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


def check_row_length(key: str, path: str, rows: int, seq: int) -> None:
    """The one rule for the data's row length: rows of train.seq_len + 1 tokens. A NeoxrayError naming `key`,
    `path` and both lengths otherwise."""
    if rows != seq + 1:
        raise NeoxrayError(
            f"{key} {path}: rows hold {rows - 1} + 1 tokens, but train.seq_len is {seq}; prepare the data with "
            f"--seq-len {seq} or set train.seq_len={rows - 1}"
        )


def _data_manifests(cfg, model: ModelConfig, seq: int) -> list[tuple[str, dict]]:
    """Each training dataset's manifest (and the validation dataset's, when evaluation is on), checked against
    the model: rows of seq + 1 tokens (in the manifest and in the files themselves), a vocabulary the model's
    embedding holds, rows to train (and evaluate) on."""
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
        check_row_length(key, path, int(m["seq_len"]) + 1, seq)
        _check_stored_rows(key, path, m, split)
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


def _chat_template(cfg, manifests: list[tuple[str, dict]]) -> dict | None:
    """The chat template of the conversation datasets the run trains on (their manifests' `chat_template`), or
    None when none holds conversations; datasets prepared with different templates are refused (a checkpoint
    records one template)."""
    train = {parse_data_spec(spec)[0] for spec in cfg.data.paths()}
    found: dict[str, tuple[str, dict]] = {}
    for path, m in manifests:
        spec = m.get("chat_template")
        if path in train and spec:
            found.setdefault(spec["sha256"], (path, spec))
    if len(found) > 1:
        (a, x), (b, y) = list(found.values())[:2]
        raise NeoxrayError(
            f"data.path: {a} and {b} were prepared with different chat templates ({x['source']} and "
            f"{y['source']}); a run trains on one: prepare them with the same --chat-template"
        )
    return next(iter(found.values()), (None, None))[1]


def _check_stored_rows(key: str, path: str, manifest: dict, split: str) -> None:
    """The files' own row length against the manifest's (a manifest edited by hand, or written for other files)."""
    stored = stored_row_length(path, manifest, split)
    claimed = int(manifest["seq_len"]) + 1
    if stored is not None and stored != claimed:
        raise NeoxrayError(
            f"{key} {path}: its files hold rows of {stored} tokens, but its manifest.json says seq_len "
            f"{manifest['seq_len']} (rows of {claimed}); the manifest does not describe these files: prepare the "
            f"data again"
        )
