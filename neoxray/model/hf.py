"""The Hugging Face GPT-NeoX directory: the platform's model checkpoint format.

A directory holds `config.json` (`GPTNeoXForCausalLM`), safetensors weights (`model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` above a size threshold) and the
tokenizer files. `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads what `save_pretrained` writes,
and `load_pretrained` reads EleutherAI's own checkpoints. Weights are read with safetensors only: nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neoxray.errors import NeoxrayError
from neoxray.model import precision
from neoxray.model.config import ModelConfig
from neoxray.model.gptneox import GPTNeoX, build_model

HF_PREFIX = "gpt_neox."
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# buffers some older GPT-NeoX checkpoints carry; they are derived, never learned
_IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


# --------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------------
def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` of a GPTNeoXForCausalLM with this architecture. Rotary settings are written both
    in the legacy keys (`rotary_pct`, `rotary_emb_base`) and in `rope_parameters`, so old and new
    transformers releases read them the same."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.ffn_dim,
        "hidden_act": "gelu",
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rotary_base,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rotary_base,
            "partial_rotary_factor": config.rotary_pct,
        },
        "max_position_embeddings": config.max_seq_len,
        "layer_norm_eps": config.layernorm_eps,
        "use_parallel_residual": config.parallel_residual,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": precision.hf_name(dtype),
        "dtype": precision.hf_name(dtype),
        "neoxray": {"preset": config.name, "tokenizer_vocab_size": config.tokenizer_vocab_size},
    }


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a GPT-NeoX `config.json` dict; anything that is not GPT-NeoX is a NeoxrayError."""
    model_type = hf.get("model_type")
    if model_type != "gpt_neox":
        raise NeoxrayError(f"{source}: not a GPT-NeoX model (model_type is {model_type!r}, expected 'gpt_neox')")
    if hf.get("tie_word_embeddings"):
        raise NeoxrayError(f"{source}: tie_word_embeddings=true is not GPT-NeoX (the output head is untied)")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise NeoxrayError(f"{source}: hidden_act {act!r} is not supported (GPT-NeoX uses exact 'gelu')")
    if hf.get("attention_bias", True) is False:
        raise NeoxrayError(f"{source}: attention_bias=false is not supported (GPT-NeoX has biases)")
    rope = hf.get("rope_parameters") or {}
    if (hf.get("rope_scaling") or {}).get("rope_type", "default") not in (None, "default") or rope.get(
        "rope_type", "default"
    ) != "default":
        raise NeoxrayError(f"{source}: rope scaling is not supported (only the default rotary embedding)")
    try:
        extra = hf.get("neoxray") or {}
        return ModelConfig(
            n_layers=int(hf["num_hidden_layers"]),
            d_model=int(hf["hidden_size"]),
            n_heads=int(hf["num_attention_heads"]),
            vocab_size=int(hf["vocab_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rotary_pct=float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))),
            rotary_base=float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
            intermediate_size=int(hf.get("intermediate_size") or 0),
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            layernorm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            bos_token_id=int(hf.get("bos_token_id") or 0),
            eos_token_id=int(_first(hf.get("eos_token_id")) or 0),
            tokenizer_vocab_size=int(extra.get("tokenizer_vocab_size", 0)),
            name=str(extra.get("preset", "custom")),
        )
    except KeyError as e:
        raise NeoxrayError(f"{source}: missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise NeoxrayError(f"{source}: invalid value: {e}") from None


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (a directory's config.json, a peft adapter's adapter_config.json); a file
    that is not one is a NeoxrayError naming it."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NeoxrayError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NeoxrayError(f"{path}: expected a JSON object")
    return data


def read_config(model_dir: str | os.PathLike) -> tuple[ModelConfig, torch.dtype]:
    """ModelConfig and stored dtype of a Hugging Face GPT-NeoX directory."""
    d = Path(model_dir)
    if not d.exists():
        raise NeoxrayError(f"model directory not found: {d}")
    if not d.is_dir():
        raise NeoxrayError(f"not a directory: {d} (expected a Hugging Face GPT-NeoX model directory)")
    path = d / "config.json"
    if not path.exists():
        raise NeoxrayError(f"{path} not found: {d} is not a Hugging Face model directory")
    hf = read_json_object(path)
    dtype = precision.hf_dtype(hf.get("torch_dtype") or hf.get("dtype"))
    return config_from_hf(hf, str(path)), dtype


# --------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------
def to_hf_name(name: str) -> str:
    """Our parameter name -> the transformers name (only the head lives outside `gpt_neox.`)."""
    return name if name.startswith("embed_out.") else HF_PREFIX + name


def from_hf_name(name: str) -> str:
    """The transformers name -> ours; transformers >= 5 calls the head `lm_head`, EleutherAI's files `embed_out`."""
    if name.startswith("lm_head."):
        return "embed_out." + name.removeprefix("lm_head.")
    return name.removeprefix(HF_PREFIX)


def weight_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Map of HF tensor name -> safetensors file that holds it."""
    d = Path(model_dir)
    index = d / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise NeoxrayError(f"{index}: not a safetensors index ({e})") from None
        return {k: d / v for k, v in weight_map.items()}
    single = d / WEIGHTS_NAME
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise NeoxrayError(
            f"{d}: only pickled weights (*.bin/*.pt) found; neoxray reads safetensors only "
            "(convert them with transformers' save_pretrained(safe_serialization=True))"
        )
    raise NeoxrayError(f"{d}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def iter_tensors(model_dir, names: list[str] | None = None, slicer=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, tensor) one at a time, file by file, never holding the whole checkpoint.
    `slicer(our_name, safetensors_slice) -> Tensor` lets a caller read only its own shard of a tensor
    (tensor-parallel ranks do this)."""
    files = weight_files(model_dir)
    wanted = None if names is None else set(names)
    by_file: dict[Path, list[str]] = {}
    for hf_name, path in files.items():
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        if wanted is None or from_hf_name(hf_name) in wanted:
            by_file.setdefault(path, []).append(hf_name)
    for path, keys in sorted(by_file.items()):
        if not path.exists():
            raise NeoxrayError(f"weights file missing: {path}")
        with safe_open(path, framework="pt") as f:
            for key in keys:
                ours = from_hf_name(key)
                yield ours, (slicer(ours, f.get_slice(key)) if slicer else f.get_tensor(key))


def load_weights(model: GPTNeoX, model_dir, strict: bool = True) -> None:
    """Copy a directory's tensors into `model` (which may be on any device and already parallelised)."""
    params = dict(model.state_dict())
    seen = set()
    for name, tensor in iter_tensors(model_dir, list(params)):
        if params[name].shape != tensor.shape:
            raise NeoxrayError(
                f"{model_dir}: tensor {to_hf_name(name)} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)
        seen.add(name)
    missing = sorted(set(params) - seen)
    if strict and missing:
        raise NeoxrayError(f"{model_dir}: missing tensors: {', '.join(to_hf_name(m) for m in missing[:5])}")


def load_pretrained(model_dir, device="cpu", dtype: torch.dtype | None = None) -> GPTNeoX:
    """Build the model a Hugging Face GPT-NeoX directory describes and load its weights (one call)."""
    config, stored = read_config(model_dir)
    model = build_model(config, device=device, dtype=dtype or stored, seed=None)
    load_weights(model, model_dir)
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_pretrained(
    model: GPTNeoX,
    out_dir,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chat_template: str | None = None,
) -> Path:
    """Write `model` as a Hugging Face GPT-NeoX directory (with `tokenizer`'s files, and `chat_template` in its
    tokenizer_config.json when given). Written into a temporary sibling directory and renamed into place, so an
    interrupted save never leaves a directory that looks complete."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out = Path(out_dir)
    dtype = dtype or next(model.parameters()).dtype
    state = {to_hf_name(k): v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        split = split_torch_state_dict_into_shards(
            state, filename_pattern="model{suffix}.safetensors", max_shard_size=_parse_size(max_shard_size)
        )
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": split.tensor_to_filename,
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}, indent=2)
        )
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=model.config.max_seq_len, chat_template=chat_template)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            _rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        _rmtree(tmp)
        raise
    return out


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def load_model_and_tokenizer(model_dir, device="cpu", dtype: torch.dtype | None = None):
    """A Hugging Face GPT-NeoX directory -> (model in eval mode, Tokenizer). The tokenizer is checked first,
    so a directory without one fails fast, before any weights are read."""
    from neoxray.model.tokenizer import Tokenizer

    read_config(model_dir)  # names a missing directory / non-GPT-NeoX config before anything else
    if not (Path(model_dir) / "tokenizer.json").exists():
        raise NeoxrayError(f"{model_dir}: no tokenizer.json (a model directory must carry its tokenizer)")
    tokenizer = Tokenizer.load(model_dir)
    return load_pretrained(model_dir, device=device, dtype=dtype), tokenizer
