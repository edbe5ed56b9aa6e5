"""peft's on-disk LoRA format, for adapters of a GPT-NeoX base: read any (ours, or one from the hub), write what
`peft.PeftModel.from_pretrained(GPTNeoXForCausalLM, DIR)` loads with no missing or unexpected keys.

A directory holds `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`, `lora_dropout`, `target_modules`,
`use_rslora`, `rank_pattern`, `alpha_pattern`, `base_model_name_or_path`, `task_type: CAUSAL_LM`, `bias: none`,
`fan_in_fan_out: false`, ...) and `adapter_model.safetensors`, whose tensor names for GPTNeoXForCausalLM are
(checked against what peft 0.21.2 writes):

    base_model.model.gpt_neox.layers.{i}.attention.query_key_value.lora_A.weight   [r, d]
    base_model.model.gpt_neox.layers.{i}.attention.query_key_value.lora_B.weight   [3d, r]
    base_model.model.gpt_neox.layers.{i}.attention.dense.lora_{A,B}.weight          [r, d], [d, r]
    base_model.model.gpt_neox.layers.{i}.mlp.dense_h_to_4h.lora_{A,B}.weight        [r, d], [f, r]
    base_model.model.gpt_neox.layers.{i}.mlp.dense_4h_to_h.lora_{A,B}.weight        [r, f], [d, r]

In memory (`PeftModel.state_dict()`) peft adds the adapter name (`lora_A.default.weight`) and renames a wrapped
linear's own parameters `...query_key_value.base_layer.weight`; `peft_state_dict_key` maps every parameter name of
a neoxray model with adapters (`neoxray.model.lora`) to that name. Weights are safetensors only: a pickled
`adapter_model.bin` is refused, as are other peft types, DoRA and the other LoRA variants, adapters whose
initialisation changed the base's weights (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA, unless peft converted them to plain
LoRA on saving), trained biases and modules outside `TARGETS`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.hf import read_json_object
from neoxray.model.lora import LoRAAdapter
from neoxray.model.lora_spec import LORA_PARAMS, MODULE_PATH, SUBMODULE, TARGETS, LoRASpec
from neoxray.paths import local_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_FILE_KEY = re.compile(
    r"(?:base_model\.model\.)?(?:gpt_neox\.)?(layers\.\d+\.(?:attention|mlp)\.\w+)\.(lora_A|lora_B)(?:\.default)?\.weight"
)
# config keys whose non-default values change what the adapter computes, with what neoxray supports
_REFUSED = {
    "use_dora": (False, "DoRA (use_dora: true) is not supported; only plain LoRA"),
    "lora_bias": (False, "lora_bias: true (trained LoRA biases) is not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out: true does not fit GPT-NeoX's nn.Linear layers"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules) is not supported; only LoRA weights"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters) is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
    "use_qalora": (False, "QA-LoRA (use_qalora: true) is not supported"),
    "use_bdlora": (None, "use_bdlora is not supported"),
    "velora_config": (None, "VeLoRA (velora_config) is not supported; only plain LoRA"),
    "monteclora_config": (None, "MonteCLoRA (monteclora_config) is not supported; only plain LoRA"),
    "arrow_config": (None, "Arrow routing (arrow_config) is not supported; only plain LoRA"),
    "kasa_config": (None, "KaSA (kasa_config) is not supported; only plain LoRA"),
}
# init_lora_weights values under which peft changes the base model's own weights (the adapter then belongs to a
# residual base, unless peft converted it to plain LoRA on saving, which writes init_lora_weights: true)
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


# ---------------------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------------------
def peft_file_key(name: str) -> str:
    """neoxray's adapter tensor name -> peft's name in adapter_model.safetensors:
    "layers.3.attention.dense.lora_A" -> "base_model.model.gpt_neox.layers.3.attention.dense.lora_A.weight"."""
    return f"{PEFT_PREFIX}gpt_neox.{name}.weight"


def from_peft_file_key(key: str) -> str | None:
    """peft's adapter tensor name (on disk, or in memory with the adapter name "default") -> neoxray's, or None
    when it names no LoRA weight of a GPT-NeoX target linear."""
    m = _FILE_KEY.fullmatch(key)
    if m is None or MODULE_PATH.fullmatch(m.group(1)) is None:
        return None
    return f"{m.group(1)}.{m.group(2)}"


def peft_state_dict_key(name: str, adapter_name: str = "default") -> str:
    """A parameter name of a neoxray model with adapters -> the name `PeftModel.state_dict()` gives it:
        layers.3.attention.query_key_value.lora_A -> base_model.model.gpt_neox.layers.3...lora_A.default.weight
        layers.3.attention.query_key_value.weight -> ...query_key_value.base_layer.weight (a wrapped linear)
        embed_in.weight -> base_model.model.gpt_neox.embed_in.weight
        embed_out.weight -> base_model.model.lm_head.weight (transformers >= 5)
    The second form assumes the linear carries an adapter; for one without, peft keeps the plain name."""
    head, _, leaf = name.rpartition(".")
    if leaf in LORA_PARAMS:
        return f"{PEFT_PREFIX}gpt_neox.{name}.{adapter_name}.weight"
    if MODULE_PATH.fullmatch(head):
        return f"{PEFT_PREFIX}gpt_neox.{head}.base_layer.{leaf}"
    if name.startswith("embed_out."):
        return f"{PEFT_PREFIX}lm_head.{leaf}"
    return f"{PEFT_PREFIX}gpt_neox.{name}"


def _hf_module(path: str) -> str:
    """Our module path -> its name inside GPTNeoXForCausalLM (what peft's rank/alpha patterns match)."""
    return f"gpt_neox.{path}"


def _pattern_value(patterns: dict, module: str):
    """peft's rule for rank_pattern / alpha_pattern: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for k, v in patterns.items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return None


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------
def read_adapter_config(path) -> dict:
    """adapter_config.json of a peft LoRA adapter directory, checked: a NeoxrayError (one line) for a missing
    directory or file, another peft type, DoRA and the other options neoxray does not compute."""
    d = local_path(path, "--lora")
    if not d.exists():
        raise NeoxrayError(f"LoRA adapter not found: {path}")
    if not d.is_dir():
        raise NeoxrayError(f"{path}: not a directory (a LoRA adapter is a peft directory with {ADAPTER_CONFIG})")
    f = d / ADAPTER_CONFIG
    if not f.exists():
        raise NeoxrayError(f"{path}: no {ADAPTER_CONFIG}; not a peft adapter directory")
    cfg = read_json_object(f)
    kind = cfg.get("peft_type")
    if str(kind).upper() != "LORA":
        raise NeoxrayError(f"{f}: peft_type is {kind!r}; neoxray reads LoRA adapters only (peft_type LORA)")
    if cfg.get("bias", "none") != "none":
        raise NeoxrayError(f"{f}: bias is {cfg['bias']!r}; only adapters with bias 'none' are supported")
    for key, (default, why) in _REFUSED.items():
        value = cfg.get(key, default)
        if value not in (default, None, False, [], {}):
            raise NeoxrayError(f"{f}: {why}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise NeoxrayError(
            f"{f}: init_lora_weights {init!r} changes the base model's weights, so the adapter does not fit the "
            "original base; convert it to plain LoRA (peft: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            leaf = str(t).rpartition(".")[2]
            if leaf not in TARGETS and t != "all-linear":
                raise NeoxrayError(
                    f"{f}: target module {t!r} is not a GPT-NeoX linear LoRA can adapt ({', '.join(TARGETS)})"
                )
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise NeoxrayError(f"{f}: {key} must be a positive number, got {v!r}")
    return cfg


def read_peft_adapter(path, config: ModelConfig | None = None, name: str | None = None) -> LoRAAdapter:
    """A peft LoRA adapter directory -> LoRAAdapter named `name` (default: the directory's name), tensors as
    stored, on the CPU: the one way every command reads an adapter (`--lora` of generate, serve and eval, the
    serving engine's adapters). Which modules carry an adapter, and their ranks, come from the tensors (so target
    subsets, layers_to_transform and rank_pattern all work); alpha_pattern gives per-module alphas. With `config`
    (the base's ModelConfig) every tensor is checked against the base's shapes before any base weight need be
    read. Anything wrong is a NeoxrayError (one line) naming the directory, the file or the tensor."""
    from safetensors import safe_open

    cfg = read_adapter_config(path)  # checks the path first: a URI, a missing directory
    d = Path(path).expanduser()
    weights = d / ADAPTER_WEIGHTS
    if not weights.exists():
        if (d / PICKLED_WEIGHTS).exists():
            raise NeoxrayError(
                f"{path}: only a pickled {PICKLED_WEIGHTS}; neoxray reads safetensors only (load it with peft and "
                "save_pretrained(safe_serialization=True))"
            )
        raise NeoxrayError(f"{path}: no {ADAPTER_WEIGHTS}")
    tensors, keys = {}, {}
    try:
        with safe_open(weights, framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (a safetensors file handle, not a dict)
                ours = from_peft_file_key(key)
                if ours is None:
                    raise NeoxrayError(
                        f"{weights}: tensor {key} is not a LoRA weight of a GPT-NeoX linear ({', '.join(TARGETS)})"
                    )
                if ours in tensors:
                    raise NeoxrayError(f"{weights}: tensors {keys[ours]} and {key} are the same weight")
                tensors[ours], keys[ours] = sf.get_tensor(key), key
    except NeoxrayError:
        raise
    except Exception as e:  # a truncated or foreign file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NeoxrayError(f"{weights}: not a readable safetensors file ({why})") from None
    if not tensors:
        raise NeoxrayError(f"{weights}: holds no LoRA weights")
    present = {n.rpartition(".")[0].rpartition(".")[2] for n in tensors}
    listed = cfg.get("target_modules")
    if isinstance(listed, list) and "all-linear" not in listed:
        allowed = {str(t).rpartition(".")[2] for t in listed}
        stray = sorted(n for n in tensors if n.rpartition(".")[0].rpartition(".")[2] not in allowed)
        if stray:
            raise NeoxrayError(f"{weights}: tensor {keys[stray[0]]} is for a module outside target_modules {listed}")
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    spec = LoRASpec(
        r=int(cfg["r"]),
        alpha=cfg["lora_alpha"],
        dropout=float(cfg.get("lora_dropout") or 0.0),
        targets=tuple(t for t in TARGETS if t in present),
        use_rslora=bool(cfg.get("use_rslora", False)),
        layers=tuple(layers) if layers else None,
    )
    alphas = {}
    for p in {n.rpartition(".")[0] for n in tensors}:
        a = _pattern_value(cfg.get("alpha_pattern") or {}, _hf_module(p))
        if a is not None and a != spec.alpha:
            alphas[p] = a
    adapter = LoRAAdapter(spec, tensors, alphas, name or d.name)
    if config is not None:
        adapter.check_shapes(config, where=str(path), key=lambda n: keys[n])
    return adapter


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------
def adapter_config(adapter: LoRAAdapter, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json peft reads for `adapter` (ranks and alphas that differ from r and lora_alpha
    go to rank_pattern / alpha_pattern under each module's full name)."""
    spec = adapter.spec
    modules = adapter.modules()
    targets = [t for t in TARGETS if any(p.endswith("." + t) for p in modules)]
    layers = sorted({int(MODULE_PATH.fullmatch(p).group(1)) for p in modules})
    product = {f"layers.{i}.{SUBMODULE[t]}.{t}" for i in layers for t in targets}
    # an irregular subset (some targets in some layers only) is listed module by module, which peft matches exactly
    target_modules = targets if product == set(modules) else [_hf_module(p) for p in modules]
    rank_pattern = {_hf_module(p): adapter.rank(p) for p in modules if adapter.rank(p) != spec.r}
    alpha_pattern = {_hf_module(p): adapter.alpha(p) for p in modules if adapter.alpha(p) != spec.alpha}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_modules,
        "use_rslora": spec.use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None if spec.layers is None else layers,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def write_peft_adapter(
    adapter: LoRAAdapter, out_dir, base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write `adapter` as a peft LoRA directory (adapter_config.json + adapter_model.safetensors), atomically:
    into a temporary sibling directory renamed into place (an existing `out_dir` is replaced only then).
    `dtype`: the stored dtype (default: as the tensors are)."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    state = {
        peft_file_key(n): (t.detach().to(dtype) if dtype else t.detach()).contiguous().cpu()
        for n, t in adapter.tensors.items()
    }
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NeoxrayError(f"{adapter.name}: tensor {key} holds non-finite values (NaN or infinity)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = adapter_config(adapter, base_model_name_or_path)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
