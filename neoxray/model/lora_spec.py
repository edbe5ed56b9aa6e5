"""What a LoRA setup is, without torch: the GPT-NeoX linears an adapter may target, their shapes and how tensor
parallelism splits them, the names of adapter tensors, the scaling rule, and `LoRASpec` with its checks.

Written once here for every place that describes or checks a LoRA setup: the run config's `lora` section and its
validation (`neoxray.platform.train.config`, importable without torch), the planner (`neoxray plan --lora-*`),
the adapter layers (`neoxray.model.lora`), multi-LoRA serving (`neoxray.model.multi_lora`) and peft's file format
(`neoxray.model.peft_format`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from neoxray.errors import NeoxrayError

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
"""The GPT-NeoX linears LoRA may target, in layer order (peft's `target_modules` names for GPTNeoXForCausalLM)."""
SUBMODULE = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
"""The submodule of a layer that holds each target."""
COLUMN_PARALLEL = frozenset({"query_key_value", "dense_h_to_4h"})
"""Targets whose base is column-parallel under tensor parallelism (split by output rows: an adapter's B is split
like it, A replicated); the others are row-parallel (split by input columns: A split, B replicated)."""
LORA_PARAMS = ("lora_A", "lora_B")
"""An adapted linear's two adapter tensors: A [r, in], B [out, r]."""
MODULE_PATH = re.compile(r"layers\.(\d+)\.(attention\.(?:query_key_value|dense)|mlp\.(?:dense_h_to_4h|dense_4h_to_h))")
"""A target's plain-model module path, e.g. "layers.3.attention.query_key_value"."""


def target_shape(config, target: str) -> tuple[int, int]:
    """(in, out) features of `target` in a GPT-NeoX of `config` (a ModelConfig), full size."""
    d, f = config.d_model, config.ffn_dim
    return {"query_key_value": (d, 3 * d), "dense": (d, d), "dense_h_to_4h": (d, f), "dense_4h_to_h": (f, d)}[target]


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (peft's rule)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------------------
# the checks: LoRASpec raises them, the run config's validation collects them, the planner uses the targets'
# ---------------------------------------------------------------------------------------------------------
def targets_problem(targets) -> str | None:
    """Why `targets` is not a non-empty list of distinct GPT-NeoX target names (a phrase), or None."""
    targets = list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        return f"unknown GPT-NeoX module {unknown[0]!r} (known: {', '.join(TARGETS)})"
    if not targets:
        return f"give at least one of {', '.join(TARGETS)}"
    if len(set(targets)) != len(targets):
        return f"listed twice in {targets}"
    return None


def lora_problems(alpha, dropout, targets, use_rslora=False, layers=None) -> list[str]:
    """Every problem of a LoRA setup besides its rank, each a message `lora.<field>: ...` naming its key."""
    problems = []
    if not (_is_number(alpha) and math.isfinite(alpha) and alpha > 0):
        problems.append(f"lora.alpha: must be a finite number > 0, got {alpha!r}")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        problems.append(f"lora.dropout: must be a probability in [0, 1), got {dropout!r}")
    why = targets_problem(targets)
    if why:
        problems.append(f"lora.targets: {why}")
    if not isinstance(use_rslora, bool):
        problems.append(f"lora.use_rslora: must be true or false, got {use_rslora!r}")
    if layers is not None and (not layers or not all(_is_int(i) and i >= 0 for i in layers)):
        problems.append(f"lora.layers: must be null or a non-empty list of layer indices, got {layers!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# what an adapter is
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRASpec:
    """The shape of a LoRA adapter (peft's LoraConfig, the parts GPT-NeoX uses). Invalid values are a
    NeoxrayError naming the field as `lora.<field>`."""

    r: int = 8
    """Rank of each adapter: A is [r, in], B is [out, r]."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, training mode only."""
    targets: tuple[str, ...] = TARGETS
    """Which of each layer's linears get an adapter: query_key_value, dense, dense_h_to_4h, dense_4h_to_h."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    layers: tuple[int, ...] | None = None
    """Only these layer indices (peft's layers_to_transform); None: every layer."""

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        problems = [] if _is_int(self.r) and self.r >= 1 else [f"lora.r: must be a positive integer, got {self.r!r}"]
        problems += lora_problems(self.alpha, self.dropout, self.targets, self.use_rslora, self.layers)
        if problems:
            raise NeoxrayError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, strict: bool = True) -> LoRASpec:
        """From `to_dict`'s output; unknown keys are a NeoxrayError naming them (`strict=False`: ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if strict and unknown:
            raise NeoxrayError(f"lora.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in d.items() if k in known})
