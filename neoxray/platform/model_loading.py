"""What every command that runs a model accepts as `--model` (generate, score, serve, eval, and export's
`--checkpoint`): an exported Hugging Face GPT-NeoX directory, a neoxray training checkpoint (`meta.json`), or a
run directory (its newest verified checkpoint), as `neoxray.platform.checkpoint.resolve_model_path` resolves
it; and loading it: weights are safetensors only, every checkpoint file is checked against its meta.json, and
every model passes a probe forward (`check_forward_finite`) before it is served, scored or exported."""

from __future__ import annotations

from pathlib import Path

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.peft_format import read_peft_adapter
from neoxray.model.precision import inference_dtype, resolve_device
from neoxray.platform.checkpoint import load_checkpoint_model, load_checkpoint_tokenizer, read_meta, resolve_model_path

PROBE_TOKENS = 16
"""Length of the probe batch (at most the model's context)."""


def model_display_name(kind: str, p: Path) -> str:
    """The default model id: the directory's name (with its run directory's for a checkpoint)."""
    if kind == "checkpoint" and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name


def model_config_of(kind: str, p: Path):
    """The ModelConfig of a resolved model (its config.json or checkpoint meta), without reading any weights."""
    if kind == "hf":
        from neoxray.model.hf import read_config

        return read_config(p)[0]
    from neoxray.model.config import ModelConfig

    return ModelConfig.from_dict(read_meta(p)["model_config"])


def model_chat_template(path, lora=None):
    """The chat template of what `--model` names, and `--lora`: the adapter directory's when it ships one, else
    an exported directory's (tokenizer_config.json's `chat_template`, or chat_template.jinja) or a checkpoint's
    (the one its run trained with, from meta.json); None when there is none. Reads no weights."""
    from neoxray.model.chat_template import load_chat_template
    from neoxray.platform.checkpoint import checkpoint_chat_template

    if lora is not None:
        from neoxray.platform.model_cache import local_adapter

        found = load_chat_template(local_adapter(lora))
        if found is not None:
            return found
    kind, p = resolve_model_path(path)
    return load_chat_template(p) if kind == "hf" else checkpoint_chat_template(p, read_meta(p))


def check_forward_finite(model, where) -> None:
    """A NeoxrayError naming `where` when the model's logits on a probe batch (fixed token ids) hold NaN or
    infinity. Weights can be huge and still finite (a diverged update): a per-tensor check lets them through,
    and every token they produce is NaN."""
    config = model.config
    device = next(model.parameters()).device
    ids = (torch.arange(min(PROBE_TOKENS, config.max_seq_len)) * 7919 % config.vocab_size)[None].to(device)
    with torch.no_grad():
        finite = bool(torch.isfinite(model(ids)).all())
    if not finite:
        raise NeoxrayError(
            f"{where}: the model's forward on a probe batch gives non-finite logits (NaN or infinity): its weights "
            f"have diverged; use an earlier checkpoint"
        )


def load_checkpoint_weights(p: Path, device="cpu", dtype: torch.dtype = torch.float32):
    """The plain model of a training checkpoint (a LoRA run's: its base with the adapter folded in), its forward
    checked on a probe batch."""
    from neoxray.platform.lora_checkpoint import is_lora, load_merged

    if is_lora(read_meta(p)):
        model, _ = load_merged(p, device=device, dtype=dtype)
    else:
        model, _ = load_checkpoint_model(p, device=device, dtype=dtype)
    check_forward_finite(model, p)
    return model


def load_for_inference(path, device: str = "auto", dtype: torch.dtype | None = None, lora=None):
    """-> (model in eval mode on `device`, Tokenizer, model name). `device` auto: cuda when this process has a
    GPU; `dtype` None: bf16 on GPUs, fp32 on CPUs. The tokenizer is checked (against the checkpoint's meta.json)
    before any weights are read; the model's forward on a probe batch must be finite.

    `lora`: a peft LoRA adapter directory for this base (`--lora DIR`). It is checked against the base's config
    first (a wrong directory or a tensor of the wrong shape is a NeoxrayError naming it, before the base's weights
    are read), then merged into the weights (W += scaling * B A, computed in fp32): the model then runs at the
    base's speed, exactly as peft's `merge_and_unload()` would have it. The name becomes "BASE+ADAPTER"
    (the adapter directory's name)."""
    kind, p = resolve_model_path(path)
    device = resolve_device(device)
    dtype = inference_dtype(device, dtype)
    if lora is not None:
        from neoxray.platform.model_cache import local_adapter

        lora = local_adapter(lora)  # a URI: this node's cached copy
    adapter = None if lora is None else read_peft_adapter(lora, model_config_of(kind, p))
    if kind == "hf":
        from neoxray.model.hf import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(p, device=device, dtype=dtype)
    else:
        tok = load_checkpoint_tokenizer(p, read_meta(p))
        if tok is None:
            raise NeoxrayError(f"{p}: the checkpoint carries no tokenizer.json")
        model = load_checkpoint_weights(p, device=device, dtype=dtype)
    name = model_display_name(kind, p)
    if adapter is not None:
        from neoxray.model.lora import merge_into

        merge_into(model, adapter)
        name = f"{name}+{Path(lora).expanduser().resolve().name}"
    if kind == "hf" or adapter is not None:
        check_forward_finite(model, p if adapter is None else name)
    return model.eval(), tok, name


def check_tensor_parallel(config, tp: int, what: str = "--tensor-parallel-size") -> None:
    """A NeoxrayError (one line, before any weight is read) when the model cannot be split over `tp` workers:
    its heads, MLP width and vocabulary must divide."""
    if not isinstance(tp, int) or tp < 1:
        raise NeoxrayError(f"{what} must be a positive integer, got {tp!r}")
    for n, name in (
        (config.n_heads, "attention heads"),
        (config.intermediate_size, "MLP width"),
        (config.vocab_size, "padded vocabulary"),
    ):
        if n % tp:
            raise NeoxrayError(f"{what} {tp}: the model's {n} {name} do not divide into {tp} equal shards")


def load_shard(path, group, device: str, dtype: torch.dtype):
    """This tensor-parallel rank's shard of what `--model` names (a Hugging Face directory or a full training
    checkpoint): the model is built on the meta device, rewritten with the column/row-parallel layers of
    training (`neoxray.model.tensor_parallel.parallelize`), materialised, and each parameter read as this
    rank's slice only (safetensors slices): no process holds the full weights. Every rank runs the probe
    forward together (it is collective)."""
    from neoxray.model.gptneox import GPTNeoX
    from neoxray.model.tensor_parallel import parallelize
    from neoxray.platform.checkpoint import CheckpointSource, HFSource, check_finite_tensor

    kind, p = resolve_model_path(path)
    if kind == "checkpoint":
        from neoxray.platform.lora_checkpoint import is_lora

        if is_lora(read_meta(p)):
            raise NeoxrayError(
                f"{p}: a LoRA run's checkpoint is served tensor-parallel as its base with the adapter: "
                "--model BASE --lora NAME=ADAPTER (or `neoxray export --merge` it first)"
            )
    config = model_config_of(kind, p)
    with torch.device("meta"):
        model = GPTNeoX(config)
    parallelize(model, group)
    model.to_empty(device=device)
    source = HFSource(p) if kind == "hf" else CheckpointSource(p)
    with torch.no_grad():
        for name, param in model.named_parameters():
            t = source.get(
                f"model/{name}",
                getattr(param, "tp_dim", None),
                getattr(param, "tp_rank", 0),
                getattr(param, "tp_size", 1),
            )
            if t.shape != param.shape:
                raise NeoxrayError(
                    f"{source}: {name} has shape {tuple(t.shape)}, the shard expects {tuple(param.shape)}"
                )
            check_finite_tensor(name, t, p)
            param.copy_(t)
    model = model.to(dtype).eval()
    check_forward_finite(model, p)
    return model


def prepare_sharded(path, tp: int, device: str = "auto", dtype: torch.dtype | None = None):
    """Everything a tensor-parallel engine needs before its workers load: (local model path, ModelConfig,
    Tokenizer, name, device, dtype), the layout checked against the model (`check_tensor_parallel`) and no
    weight read."""
    kind, p = resolve_model_path(path)
    config = model_config_of(kind, p)
    check_tensor_parallel(config, tp)
    device = resolve_device(device)
    dtype = inference_dtype(device, dtype)
    if kind == "hf":
        from neoxray.model.tokenizer import Tokenizer

        if not (p / "tokenizer.json").exists():
            raise NeoxrayError(f"{p}: no tokenizer.json (a model directory must carry its tokenizer)")
        tok = Tokenizer.load(p)
    else:
        tok = load_checkpoint_tokenizer(p, read_meta(p))
        if tok is None:
            raise NeoxrayError(f"{p}: the checkpoint carries no tokenizer.json")
    return p, config, tok, model_display_name(kind, p), device, dtype
