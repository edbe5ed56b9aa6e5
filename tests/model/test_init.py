"""Layout-independent initialisation (`neoxray.model.init`): every parameter drawn by its plain-model name, so
any module holding it, in any dtype, gets the same numbers, by GPT-NeoX's rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.gptneox import GPTNeoX, Layer
from neoxray.model.init import init_parameters, layer_offset, param_seed
from tests.support.tp_models import plain_model, tiny


def test_init_is_deterministic_layout_independent_and_named():
    cfg = tiny(d_model=128, n_layers=4)
    a, b, c = plain_model(cfg, 1), plain_model(cfg, 1), plain_model(cfg, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.embed_in.weight, c.embed_in.weight)
    # same name -> same numbers, whatever else the module holds
    layer = Layer(cfg, 3)
    init_parameters(layer, 1, config=cfg, prefix="layers.3.")
    stage = nn.ModuleList([Layer(cfg, 2), Layer(cfg, 3)])
    init_parameters(stage, 1, config=cfg, name_map=layer_offset(2))
    for name, p in layer.named_parameters():
        assert torch.equal(p, a.get_parameter(f"layers.3.{name}")) and torch.equal(p, stage[1].get_parameter(name))
    assert layer_offset(4)("layers.0.mlp.dense_h_to_4h.weight") == "layers.4.mlp.dense_h_to_4h.weight"
    assert layer_offset(4)("embed_out.weight") == "embed_out.weight"
    assert param_seed(1, "embed_in.weight") == param_seed(1, "embed_in.weight") != param_seed(2, "embed_in.weight")
    # GPT-NeoX's rule
    small, wang = math.sqrt(2 / (5 * 128)), 2 / (4 * math.sqrt(128))
    for w, std in (
        (a.layers[1].attention.query_key_value.weight, small),
        (a.embed_in.weight, small),
        (a.embed_out.weight, small),
        (a.layers[1].mlp.dense_h_to_4h.weight, small),
        (a.layers[1].attention.dense.weight, wang),
        (a.layers[1].mlp.dense_4h_to_h.weight, wang),
    ):
        assert w.std().item() == pytest.approx(std, rel=0.05)
    assert all(torch.all(p == 0) for n, p in a.named_parameters() if n.endswith("bias"))
    assert torch.all(a.layers[0].input_layernorm.weight == 1) and torch.all(a.final_layer_norm.weight == 1)
    # any dtype: the same draw, cast
    half = copy.deepcopy(a).to(torch.bfloat16)
    init_parameters(half, 1)
    assert torch.equal(half.embed_in.weight, a.embed_in.weight.to(torch.bfloat16))


def test_init_refuses_what_it_cannot_name():
    cfg = tiny()
    with pytest.raises(NeoxrayError, match="not a GPT-NeoX parameter name"):
        init_parameters(Layer(cfg, 0), 0, config=cfg)  # names lack "layers.0."
    with pytest.raises(NeoxrayError, match="both map to"):
        init_parameters(
            nn.ModuleList([Layer(cfg, 0), Layer(cfg, 1)]), 0, config=cfg, name_map=lambda n: "layers.0." + n[2:]
        )
    with pytest.raises(NeoxrayError, match="n_layers"):
        init_parameters(Layer(cfg, 0), 0, prefix="layers.0.")  # wang_init needs L
    with pytest.raises(NeoxrayError, match="no entry"):
        init_parameters(nn.Linear(4, 4), 0, name_map={})
    with torch.device("meta"):
        m = GPTNeoX(cfg)
    with pytest.raises(NeoxrayError, match="meta device"):
        init_parameters(m, 0)
