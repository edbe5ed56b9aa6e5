"""The training engine's pipeline pieces on one process (no process group): a `LayerPipe` equals the plain
model's `Layer`, and its activation checkpointing really recomputes the layer in the backward pass."""

from __future__ import annotations

import torch

from neoxray.model.config import get_preset
from neoxray.model.gptneox import build_model, rotary_cos_sin
from neoxray.platform.train.pipe import LayerPipe, no_decay


def make_pipe(ckpt: bool) -> LayerPipe:
    cfg = get_preset("tiny", activation_checkpointing=ckpt)
    return LayerPipe(cfg, 1, None, 0, torch.device("cpu")).train()


def test_layer_pipe_equals_the_plain_layer():
    cfg = get_preset("tiny")
    plain = build_model(cfg, seed=0).layers[1]
    pipe = make_pipe(False)
    x = torch.randn(2, 16, cfg.d_model, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_cos_sin(torch.arange(16)[None], cfg.rotary_dim, cfg.rotary_base, x.dtype)
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), plain(x, cos, sin), rtol=0, atol=0)


def test_layer_pipe_checkpointing_recomputes_in_backward():
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    seen = {}
    for ckpt in (False, True):
        pipe = make_pipe(ckpt)
        calls = [0]
        forward = pipe.mlp.forward

        def counted(h, forward=forward, calls=calls):
            calls[0] += 1
            return forward(h)

        pipe.mlp.forward = counted
        out = pipe(x)
        after_forward = calls[0]
        out.square().sum().backward()
        seen[ckpt] = (after_forward, calls[0], {n: p.grad.clone() for n, p in pipe.named_parameters()})
    assert seen[False][:2] == (1, 1)
    assert seen[True][:2] == (1, 2)
    for n, g in seen[False][2].items():
        torch.testing.assert_close(g, seen[True][2][n], rtol=1e-5, atol=1e-7)


def test_weight_decay_groups_leave_out_biases_and_layernorms():
    names = [n for n, _ in make_pipe(False).canonical_parameters()]
    decayed = sorted(n for n in names if not no_decay(n))
    assert decayed == [
        "layers.1.attention.dense.weight",
        "layers.1.attention.query_key_value.weight",
        "layers.1.mlp.dense_4h_to_h.weight",
        "layers.1.mlp.dense_h_to_4h.weight",
    ]
