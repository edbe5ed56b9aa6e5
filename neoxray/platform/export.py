"""`neoxray export`: a training checkpoint written out as a Hugging Face GPT-NeoX directory (every shard merged,
any layout), or a LoRA run's checkpoint as a peft adapter directory (or, with `merge`, a full model with the
adapter folded in). Everything it reads is checked first: the files against meta.json, a LoRA adapter's base
against the identity the checkpoint recorded, the weights by a probe forward (diverged weights are never
exported). The chat template the run trained with (meta.json's `chat_template`), or the one `--chat-template`
names, goes into the written tokenizer_config.json (`chat_template`), where transformers' `apply_chat_template`,
`neoxray serve` and `neoxray eval --apply-chat-template` find it. What it writes goes to a temporary name and is
renamed into place (`neoxray.model.hf`). A checkpoint named by a URI is read through the model cache; an `--out`
URI (`s3://bucket/model`) gets the directory written in a local temporary folder (`TMPDIR`), then uploaded file by
file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.chat_template import resolve_chat_template
from neoxray.paths import is_uri, local_path
from neoxray.platform.checkpoint import (
    checkpoint_chat_template,
    checkpoint_dtype,
    load_checkpoint_tokenizer,
    read_meta,
    resolve_model_path,
)
from neoxray.platform.lora_checkpoint import check_base, is_lora, read_checkpoint_adapter
from neoxray.platform.model_loading import load_checkpoint_weights


@dataclass(frozen=True)
class Exported:
    checkpoint: Path
    """The checkpoint that was exported (a run directory's newest verified one)."""
    out: Path | str
    """The directory written (its URI when it went to object storage)."""
    what: str
    """What it holds, for people: "a Hugging Face model", "a peft LoRA adapter", ..."""
    chat_template: str | None = None
    """Where the chat template written into its tokenizer_config.json came from, or None (none written)."""


def export(
    checkpoint, out_dir, merge: bool = False, dtype: torch.dtype | None = None, chat_template: str | None = None
) -> Exported:
    """Export the checkpoint `checkpoint` names (a checkpoint directory, or a run directory: its newest verified
    checkpoint) into `out_dir`: a full run's as a Hugging Face directory, a LoRA run's as a peft adapter (with
    `merge`: a Hugging Face directory of its base with the adapter folded in). `dtype` None: the precision it
    trained in. `chat_template` (`--chat-template`: a template file, a model directory or the template itself)
    replaces the one the run trained with in the written tokenizer_config.json."""
    if is_uri(str(out_dir)):
        return _export_to_store(checkpoint, str(out_dir), merge, dtype, chat_template)
    local_path(out_dir, "--out")
    given = None if chat_template is None else resolve_chat_template(chat_template)
    ckpt = resolve_checkpoint_path(checkpoint)
    meta = read_meta(ckpt)
    tokenizer = load_checkpoint_tokenizer(ckpt, meta)
    template = given or checkpoint_chat_template(ckpt, meta)
    if given is not None and tokenizer is None:
        raise NeoxrayError(f"--chat-template: {ckpt} carries no tokenizer, so there is no tokenizer_config.json")
    text, source = (None, None) if template is None or tokenizer is None else (template.text, template.source)
    if is_lora(meta):
        if merge:
            out = _save_model(ckpt, meta, out_dir, tokenizer, dtype, text)
            return Exported(ckpt, out, "a Hugging Face model with the adapter merged", source)
        return Exported(ckpt, _save_adapter(ckpt, out_dir, tokenizer, text), "a peft LoRA adapter", source)
    if merge:
        raise NeoxrayError(f"--merge: {ckpt} holds a full model, not LoRA adapters (export it without --merge)")
    return Exported(ckpt, _save_model(ckpt, meta, out_dir, tokenizer, dtype, text), "a Hugging Face model", source)


def _export_to_store(checkpoint, uri: str, merge: bool, dtype, chat_template) -> Exported:
    """`export` into a local temporary folder, then every file uploaded to `uri` (checked writable first)."""
    import tempfile

    from neoxray.platform.run_store import RunStore

    resolve_checkpoint_path(checkpoint)  # a wrong checkpoint first, before anything touches the store
    store = RunStore(uri)
    store.probe("--out")
    with tempfile.TemporaryDirectory(prefix="neoxray-export-") as tmp:
        done = export(checkpoint, Path(tmp) / "out", merge=merge, dtype=dtype, chat_template=chat_template)
        for f in sorted(p for p in Path(done.out).rglob("*") if p.is_file()):
            store.upload(f, str(f.relative_to(done.out)))
    return Exported(done.checkpoint, store.uri, done.what, done.chat_template)


def resolve_checkpoint_path(path) -> Path:
    """A training checkpoint, or a run directory's newest one; anything else is a NeoxrayError naming it."""
    kind, p = resolve_model_path(path, "--checkpoint")
    if kind != "checkpoint":
        raise NeoxrayError(f"{path}: a Hugging Face model directory, not a training checkpoint (nothing to export)")
    return p


def _save_model(ckpt: Path, meta: dict, out_dir, tokenizer, dtype, chat_template: str | None) -> Path:
    """The checkpoint's whole model (read one tensor at a time into a model built on the meta device; a LoRA
    run's: its base with the adapter folded in) as a Hugging Face directory with the tokenizer (and the chat
    template in its tokenizer_config.json)."""
    from neoxray.model.hf import save_pretrained

    model = load_checkpoint_weights(ckpt)
    dtype = dtype or checkpoint_dtype(meta)
    return save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype, chat_template=chat_template)


def _save_adapter(ckpt: Path, out_dir, tokenizer, chat_template: str | None) -> Path:
    """A LoRA checkpoint's adapter as a peft directory (`adapter_config.json`, `adapter_model.safetensors`, the
    tokenizer with the chat template in its tokenizer_config.json), once the adapter on its base has passed the
    probe forward."""
    from neoxray.model.peft_format import write_peft_adapter

    load_checkpoint_weights(ckpt)  # the probe: an adapter whose merged model diverged is not exported
    adapter, meta = read_checkpoint_adapter(ckpt)
    base = check_base(meta, ckpt)
    out = write_peft_adapter(adapter, out_dir, base_model_name_or_path=str(base.path))
    if tokenizer is not None:
        tokenizer.save(out, chat_template=chat_template)
    return Path(out)
