"""GPT-NeoX initialisation that does not depend on the parallel layout.

Every parameter is drawn from its own generator, seeded from (seed, the parameter's name in the plain
single-process model, e.g. "layers.3.mlp.dense_h_to_4h.weight") through a stable hash (BLAKE2b). The FULL
tensor is drawn on the CPU in fp32 and, for a tensor-parallel shard (a parameter with `tp_dim`), this rank's
slice of it is kept. So a single process, every tensor-parallel rank and every pipeline stage hold exactly
the numbers of the same model, whatever the layout, device or dtype.

The rule (Black et al., 2022, after Nguyen & Salazar 2019 and Wang 2021):
    weight matrices and the input embedding     N(0, sqrt(2 / (5 d)))         small_init
    attention.dense.weight, dense_4h_to_h.weight  N(0, 2 / (L sqrt(d)))       wang_init
    biases 0;  LayerNorm weight 1, bias 0

Names. The parameter's name inside the module handed over is turned into the plain model's name by
`prefix + name_map(name)` (both optional):
    init_parameters(model, seed)                             a whole GPTNeoX (names already plain)
    init_parameters(layer, seed, config=c, prefix="layers.5.")  one Layer that is layer 5
    init_parameters(stage, seed, config=c, name_map=layer_offset(4))
        a stage holding layers 4..7 as an nn.ModuleList (names "0.attention...") or as a module with a
        `layers` list numbered from 0 ("layers.0.attention...") -> "layers.4.attention..."
    name_map may also be any callable or a dict {local name: plain name}.
Every mapped name must be a GPT-NeoX parameter name, else NeoxrayError: a wrong map fails loudly instead of
silently drawing other numbers.

Drawing the full tensor on every tensor-parallel rank costs CPU time proportional to the stage's unsharded
size (about a second per 10^8 parameters on one core), never more memory than the largest one tensor.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.sharding import full_shape, shard

_PLAIN_NAME = re.compile(
    r"embed_in\.weight|embed_out\.weight|final_layer_norm\.(weight|bias)"
    r"|layers\.\d+\.(input_layernorm|post_attention_layernorm|attention\.query_key_value|attention\.dense"
    r"|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)\.(weight|bias)"
)
_WANG = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def layer_offset(offset: int, prefix: str = "layers.") -> Callable[[str], str]:
    """A name map for a pipeline stage whose layers are numbered from 0: "3.mlp.dense_h_to_4h.weight" or
    "layers.3.mlp.dense_h_to_4h.weight" -> f"{prefix}{3 + offset}.mlp.dense_h_to_4h.weight". Other names
    (embed_in, final_layer_norm, embed_out) pass through unchanged."""

    def name_map(name: str) -> str:
        m = re.match(r"(?:layers\.)?(\d+)\.(.*)", name)
        return f"{prefix}{int(m.group(1)) + offset}.{m.group(2)}" if m else name

    return name_map


def param_seed(seed: int, name: str) -> int:
    """The generator seed of the parameter called `name` (plain-model name) for a run seeded with `seed`."""
    return int.from_bytes(hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest(), "little")


def init_std(name: str, d_model: int, n_layers: int) -> float:
    """Standard deviation of the normal a weight called `name` is drawn from."""
    if name.endswith(_WANG):
        return 2.0 / (n_layers * math.sqrt(d_model))
    return math.sqrt(2.0 / (5.0 * d_model))


def _find_config(module: nn.Module) -> ModelConfig | None:
    for m in module.modules():
        c = getattr(m, "config", None)
        if isinstance(c, ModelConfig):
            return c
    return None


@torch.no_grad()
def init_parameters(
    module: nn.Module,
    seed: int = 0,
    *,
    prefix: str = "",
    name_map: Callable[[str], str] | Mapping[str, str] | None = None,
    config: ModelConfig | None = None,
) -> None:
    """Initialise every parameter of `module` (materialised: any device or dtype, sharded or not) in place,
    as the plain single-process model seeded with `seed` would have it (see the module docstring).

    `prefix`, `name_map`: how the module's own parameter names become plain-model names (prefix + map(name)).
    `config`: gives L and d; found on the module (or a submodule) as `.config` when not passed. Needed only
    for the wang_init output projections; d is otherwise read from each weight's full shape."""
    config = config or _find_config(module)
    mapper = name_map.__getitem__ if isinstance(name_map, Mapping) else (name_map or (lambda n: n))
    seen: dict[str, str] = {}
    for local, p in module.named_parameters():
        try:
            name = prefix + mapper(local)
        except (KeyError, AttributeError) as e:
            raise NeoxrayError(f"init_parameters: name_map has no entry for parameter {local!r}") from e
        if not _PLAIN_NAME.fullmatch(name):
            raise NeoxrayError(
                f"init_parameters: parameter {local!r} maps to {name!r}, which is not a GPT-NeoX parameter name "
                "(pass prefix= or name_map= so names match the plain model, e.g. 'layers.3.mlp.dense_h_to_4h.weight')"
            )
        if name in seen:
            raise NeoxrayError(f"init_parameters: parameters {seen[name]!r} and {local!r} both map to {name!r}")
        seen[name] = local
        if p.is_meta:
            raise NeoxrayError(
                f"init_parameters: {local!r} is on the meta device; materialise first (module.to_empty(device=...))"
            )
        if name.endswith("bias"):
            p.zero_()
        elif "layernorm" in name or "layer_norm" in name:
            p.fill_(1.0)
        else:
            shape = full_shape(p)
            d_model = shape[0] if name.endswith("dense_4h_to_h.weight") else shape[1]
            if config is not None:
                d_model = config.d_model
            if name.endswith(_WANG) and config is None:
                raise NeoxrayError(f"init_parameters: {name} needs model.n_layers for wang_init; pass config=")
            std = init_std(name, d_model, config.n_layers if config is not None else 1)
            gen = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
            full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            dim = getattr(p, "tp_dim", None)
            p.copy_(full if dim is None else shard(full, dim, p.tp_rank, p.tp_size))
