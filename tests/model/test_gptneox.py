"""Unit tests of the model: presets, parameter counts, initialisation, activation checkpointing, `model info`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig, get_preset, pad_vocab, preset_names
from neoxray.model.gptneox import GPTNeoX, build_model, cross_entropy
from tests.conftest import run_cli, run_here


def meta_count(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPTNeoX(config).parameters())


def test_neox_20b_has_exactly_the_papers_parameter_count():
    assert meta_count(get_preset("neox-20b")) == 20_554_567_680
    assert get_preset("neox-20b").num_parameters() == 20_554_567_680


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_counts_like_transformers(name):
    """Counted on the meta device by our model and by transformers' GPTNeoXForCausalLM (independent)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neoxray.model.hf import config_to_hf

    cfg = get_preset(name)
    hf = {k: v for k, v in config_to_hf(cfg).items() if k != "neoxray"}
    with torch.device("meta"):
        ref = sum(p.numel() for p in GPTNeoXForCausalLM(GPTNeoXConfig(**hf)).parameters())
    assert meta_count(cfg) == cfg.num_parameters() == ref


def test_known_pythia_sizes():
    assert get_preset("pythia-70m").num_parameters() == 70_426_624
    assert get_preset("pythia-160m").num_parameters() == 162_322_944
    assert get_preset("pythia-1.4b").num_parameters() == 1_414_647_808


def test_flops_per_token_formula():
    c = get_preset("neox-20b")
    n_matmul = c.n_layers * 12 * c.d_model**2 + c.d_model * c.vocab_size
    assert c.train_flops_per_token() == 6 * n_matmul + 12 * c.n_layers * c.d_model * 2048


def test_config_validation_names_the_key():
    with pytest.raises(NeoxrayError, match="n_heads"):
        ModelConfig(n_layers=2, d_model=64, n_heads=5, vocab_size=100)
    with pytest.raises(NeoxrayError, match="rotary_pct"):
        ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100, rotary_pct=1.5)
    with pytest.raises(NeoxrayError, match="unknown model preset"):
        get_preset("gpt-5")
    with pytest.raises(NeoxrayError, match="bogus"):
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), "bogus": 1})
    assert ModelConfig.from_dict(get_preset("tiny").to_dict()) == get_preset("tiny")
    assert pad_vocab(50277, 256) == 50432 and pad_vocab(50277, 128) == 50304


def test_init_is_small_init_and_wang_init():
    cfg = get_preset("tiny", d_model=256, n_heads=4, n_layers=4)
    m = build_model(cfg, seed=0)
    small, wang = math.sqrt(2 / (5 * 256)), 2 / (4 * math.sqrt(256))
    layer = m.layers[1]
    for w, std in [
        (layer.attention.query_key_value.weight, small),
        (layer.mlp.dense_h_to_4h.weight, small),
        (m.embed_in.weight, small),
        (m.embed_out.weight, small),
        (layer.attention.dense.weight, wang),
        (layer.mlp.dense_4h_to_h.weight, wang),
    ]:
        assert w.std().item() == pytest.approx(std, rel=0.05)
        assert abs(w.mean().item()) < std / 10
    assert all(torch.all(p == 0) for n, p in m.named_parameters() if n.endswith("bias"))
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(m.final_layer_norm.weight == 1)


def test_init_is_deterministic_and_seeded():
    a, b, c = (build_model(get_preset("tiny"), seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.embed_in.weight, c.embed_in.weight)


def test_forward_shapes_and_loss_near_uniform_at_init():
    cfg = get_preset("tiny")
    m = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    logits = m(ids[:, :-1])
    assert logits.shape == (2, 32, cfg.vocab_size)
    loss = cross_entropy(logits, ids[:, 1:])
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_a_loss_over_no_trained_labels_is_zero_and_still_reaches_the_logits():
    """A micro-batch whose labels are all ignored (a prompt-only stretch of prompt-completion data) gives a loss of
    0, not NaN, with zero gradients on every logit, on the plain and the vocab-parallel path alike, and a partly
    ignored one gives the mean over the labels that remain (as F.cross_entropy's mean)."""
    from neoxray.model.tensor_parallel import vocab_parallel_cross_entropy

    logits = torch.randn(2, 5, 11)
    for loss_fn in (cross_entropy, lambda x, y: vocab_parallel_cross_entropy(x, y, None, -100)):
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, torch.full((2, 5), -100))
        loss.backward()
        assert loss.item() == 0.0 and x.grad is not None and not x.grad.any()
        labels = torch.randint(0, 11, (2, 5))
        labels[0, :3] = -100
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        assert loss_fn(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_causality():
    m = build_model(get_preset("tiny"), seed=0)
    ids = torch.randint(0, 4096, (1, 16))
    ids2 = ids.clone()
    ids2[0, 10:] = 7
    with torch.no_grad():
        assert torch.allclose(m(ids)[0, :10], m(ids2)[0, :10], atol=1e-6)


def count_mlp_calls(model) -> list[int]:
    """Wrap every layer's MLP forward with a counter (forward hooks do not fire in checkpoint recomputation)."""
    calls = [0]
    for layer in model.layers:
        forward = layer.mlp.forward

        def counted(x, forward=forward):
            calls[0] += 1
            return forward(x)

        layer.mlp.forward = counted
    return calls


def saved_bytes_of_loss(model, ids) -> tuple[torch.Tensor, int]:
    """The training loss, and the bytes autograd kept for its backward pass."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:])
    return loss, saved[0]


def test_activation_checkpointing_recomputes_each_layer_and_keeps_less():
    """With checkpointing, backward runs every layer's forward again and autograd keeps a fraction of the
    activations; the gradients are the same."""
    ids = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))
    runs = {}
    for ckpt in (False, True):
        m = build_model(get_preset("tiny", vocab_size=256, activation_checkpointing=ckpt), seed=0).train()
        calls = count_mlp_calls(m)
        loss, saved = saved_bytes_of_loss(m, ids)
        after_forward = calls[0]
        loss.backward()
        runs[ckpt] = (after_forward, calls[0], saved, {n: p.grad.clone() for n, p in m.named_parameters()})
    n_layers = get_preset("tiny").n_layers
    assert runs[False][:2] == (n_layers, n_layers)  # no recomputation without checkpointing
    assert runs[True][:2] == (n_layers, 2 * n_layers)  # each layer recomputed once in backward
    assert runs[True][2] < runs[False][2] / 2, (runs[True][2], runs[False][2])
    for n, g in runs[False][3].items():
        torch.testing.assert_close(g, runs[True][3][n], rtol=1e-5, atol=1e-7)
    m = build_model(get_preset("tiny", vocab_size=256, activation_checkpointing=True), seed=0).eval()
    calls = count_mlp_calls(m)
    cross_entropy(m(ids[:, :-1]), ids[:, 1:]).backward()  # eval mode: plain forward, nothing recomputed
    assert calls[0] == n_layers


def test_bf16_forward_is_finite_and_close_to_fp32():
    cfg = get_preset("tiny")
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = build_model(cfg, seed=0).eval()(ids)
        low = build_model(cfg, seed=0, dtype=torch.bfloat16).eval()(ids)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    low = low.float()
    assert (low - ref).abs().max() <= 0.02 * ref.abs().max(), ((low - ref).abs().max(), ref.abs().max())
    assert torch.nn.functional.cosine_similarity(low.flatten(), ref.flatten(), dim=0) > 0.999
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.e2e
def test_cli_model_info_json(cli_here):
    out = json.loads(run_cli("model", "info", "neox-20b", "--json").stdout)
    assert out["parameters"] == 20_554_567_680
    assert out["memory_bytes"]["weights_bf16"] == 2 * out["parameters"]
    assert out["memory_bytes"]["adam_states_fp32"] == 8 * out["parameters"]
    text = cli_here("model", "info", "pythia-70m")
    assert "70,426,624" in text and "GiB" in text
    bad = run_here("model", "info", "nope")  # the same command, in this process
    assert bad.returncode != 0 and "unknown model preset" in bad.stderr and "Traceback" not in bad.stderr
