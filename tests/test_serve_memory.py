"""Serving memory arithmetic (`neoxray.platform.inference.memory`) and `neoxray plan --serve`: the weights against
a real model's parameters (and its tensor-parallel shards), the KV cache against what the engine's cache
allocates, GPT-NeoX-20B's layouts from the issue, and the CLI's table and one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import torch

from neoxray.errors import NeoxrayError
from neoxray.model import tensor_parallel
from neoxray.model.config import get_preset
from neoxray.model.gptneox import GPTNeoX
from neoxray.platform.inference.memory import (
    GIB,
    ServeLayout,
    _linear_bytes,
    check_fits,
    kv_bytes_per_token,
    serve_memory,
    weight_bytes,
    what_would_fit,
)

NEOX_20B = get_preset("neox-20b")


def _meta_model(config, tp: int, monkeypatch) -> GPTNeoX:
    """`config`'s model on the meta device, rewritten by `parallelize` as rank 0 of a `tp`-rank group (the group's
    size and rank are all `parallelize` asks of it; no process group is needed for meta shards)."""
    group = object()
    monkeypatch.setattr(tensor_parallel, "group_size", lambda g: tp if g is group else 1)
    monkeypatch.setattr(tensor_parallel, "group_rank", lambda g: 0)
    with torch.device("meta"):
        model = GPTNeoX(config)
    return tensor_parallel.parallelize(model, group)


def test_weights_unsharded_are_every_parameter_in_the_dtype():
    for name in ("neox-20b", "pythia-1.4b", "tiny"):
        cfg = get_preset(name)
        assert weight_bytes(cfg, 1, None, 2) == 2 * cfg.num_parameters()
        assert weight_bytes(cfg, 1, None, 4) == 4 * cfg.num_parameters()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_weights_per_device_match_the_sharded_model(tp, monkeypatch):
    cfg = get_preset("tiny")
    model = _meta_model(cfg, tp, monkeypatch)
    if tp > 1:
        assert model.layers[0].attention.query_key_value.tp_size == tp  # really sharded
    per_device = sum(p.numel() for p in model.parameters())
    assert weight_bytes(cfg, tp, None, 2) == 2 * per_device
    if tp > 1:
        assert weight_bytes(cfg, tp, None, 2) < weight_bytes(cfg, 1, None, 2)


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_bytes_per_token_match_the_engine_cache(tp, monkeypatch):
    from neoxray.platform.inference.kv_cache import PagedKVCache

    cfg = get_preset("tiny")
    model = _meta_model(cfg, tp, monkeypatch) if tp > 1 else GPTNeoX(cfg).to(torch.bfloat16)
    cache = PagedKVCache.for_model(model, 64, 16)
    slots = cache.num_blocks * cache.block_size
    assert cache.bytes == slots * kv_bytes_per_token(cfg, tp, model.embed_in.weight.element_size())


def test_quantized_weights():
    cfg = NEOX_20B
    bf16 = weight_bytes(cfg)
    int8, int4 = weight_bytes(cfg, quantization="int8_weight_only"), weight_bytes(cfg, quantization="int4_weight_only")
    linear = cfg.n_layers * 12 * cfg.d_model**2  # the four linears of every layer
    table = cfg.vocab_size * cfg.d_model  # embed_in and embed_out each
    assert bf16 > int8 > int4
    assert linear + table < int8 - 2 * table < (linear + table) * 1.01  # 1 byte a weight and the head; embed_in bf16
    assert linear / 2 < int4 - 4 * table < linear / 2 * 1.07  # half a byte, group scales; both tables in bf16
    assert weight_bytes(cfg, quantization="int4_weight_only", quantize_head=True) < int4
    # torchao's tile-packed int4 pads input columns to 1024: at tp 8 the attention output's 768 inputs hold 1024
    assert _linear_bytes(6144, 768, "int4_weight_only", 2) == _linear_bytes(6144, 1024, "int4_weight_only", 2)
    assert _linear_bytes(6144, 768, "int8_weight_only", 2) == 6144 * (768 + 5)


def test_int8_weights_match_what_quantization_makes_of_a_model():
    from neoxray.model.gptneox import build_model
    from neoxray.platform.inference import quantization

    cfg = dataclasses.replace(get_preset("tiny"), d_model=128)
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(cfg, dtype=dtype)
        quantization.quantize_weights(model, "int8_weight_only")
        x = torch.empty((), dtype=dtype).element_size()
        assert quantization.weight_bytes(model) == weight_bytes(cfg, 1, "int8_weight_only", x)


def _neox(gib, tp=1, quantization=None, seqs=8, context=2048):
    return ServeLayout(NEOX_20B, int(gib * GIB), tp, quantization, max_num_seqs=seqs, context=context)


def test_neox_20b_layouts_of_the_issue():
    """One 80 GB GPU in bf16; two 40 GB in bf16; one 40 GB in int8; one 24 GB in int4 with a short context.
    One 40 GB GPU in bf16 holds the weights alone (38.3 GiB) but not a sequence beside them."""
    one_80 = check_fits(_neox(80))
    assert one_80.weight_bytes == 2 * NEOX_20B.num_parameters()
    assert 14 <= one_80.max_num_seqs_fit <= 16
    two_40 = check_fits(_neox(40, tp=2))
    assert two_40.weight_bytes < one_80.weight_bytes / 2 + 0.01 * GIB  # the LayerNorms and row biases replicate
    check_fits(_neox(40, quantization="int8_weight_only", seqs=4))
    short = check_fits(_neox(24, quantization="int4_weight_only", seqs=4, context=1024))
    assert short.max_num_seqs_fit >= 4
    bf16_40 = serve_memory(_neox(40, seqs=1))
    assert not bf16_40.fits and bf16_40.max_num_seqs_fit == 0
    hint = what_would_fit(bf16_40.layout)
    assert "--tensor-parallel-size 2" in hint and "int8_weight_only" in hint and "\n" not in hint
    with pytest.raises(NeoxrayError, match="does not fit: .* --tensor-parallel-size 2"):
        check_fits(bf16_40.layout)


def test_the_batch_and_cache_budget_decide_the_kv_cache():
    full = serve_memory(_neox(80, seqs=32))  # the engine's default: 32 x the context, 66 GiB of KV cache
    assert not full.fits and full.kv_cache_bytes == 32 * full.kv_bytes_per_sequence
    assert f"--max-num-seqs {full.max_num_seqs_fit} " in what_would_fit(full.layout)
    budget = dataclasses.replace(full.layout, kv_cache_tokens=full.max_kv_cache_tokens)
    assert serve_memory(budget).fits
    over = dataclasses.replace(full.layout, kv_cache_tokens=full.max_kv_cache_tokens + 16)
    assert not serve_memory(over).fits


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(tensor_parallel_size=3), "--tensor-parallel-size 3 does not divide the model's 64 heads"),
        (dict(tensor_parallel_size=0), "--tensor-parallel-size must be >= 1"),
        (dict(quantization="int3"), "--quantization 'int3' is not one of none, int8_weight_only, int4_weight_only"),
        (dict(context=4096), "--context must be between 1 and the model's context 2048"),
    ],
)
def test_bad_layouts_are_one_line(change, message):
    with pytest.raises(NeoxrayError, match=message) as err:
        serve_memory(dataclasses.replace(_neox(80), **change))
    assert "\n" not in str(err.value)


def _cli(*args) -> tuple[int, str, str]:
    from neoxray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_plan_serve_prints_the_table(cli_here):
    out = cli_here("plan", "neox-20b", "--serve", "--gpu-memory", 40, "--tensor-parallel-size", 2, "--max-num-seqs", 8)
    assert "tensor-parallel size 2" in out and "fits: yes" in out
    for row in ("weights", "KV cache per sequence (2048 tokens)", "activations", "overhead", "total"):
        assert row in out
    out = cli_here("plan", "neox-20b", "--serve", "--gpu-memory", 40, "--max-num-seqs", 1)
    assert "fits: no" in out and "max concurrent sequences of 2048 tokens: 0" in out
    assert "would fit: --tensor-parallel-size 2" in out
    out = cli_here(
        "plan", "neox-20b", "--serve", "--gpu-memory", 24, "--quantization", "int4_weight_only", "--context", 1024
    )
    assert "quantization int4_weight_only" in out and "sequences of 1024 tokens" in out
    data = json.loads(cli_here("plan", "tiny", "--serve", "--gpu-memory", 2, "--precision", "fp32", "--json"))
    assert data["fits"] and data["layout"]["dtype_bytes"] == 4
    assert data["weight_bytes"] == 4 * get_preset("tiny").num_parameters()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serve", "--tensor-parallel-size", "3"], "--tensor-parallel-size 3 does not divide"),
        (["--serve", "--quantization", "fp8"], "--quantization 'fp8' is not one of"),
        (["--serve", "--gpus", "2"], "--gpus plans training; with --serve give --tensor-parallel-size"),
        ([], "plan needs --gpus"),
    ],
)
def test_plan_serve_errors_are_one_line(args, message):
    code, out, err = _cli("plan", "neox-20b", "--gpu-memory", 40, *args)
    assert code == 1 and not out
    assert err.startswith("neoxray: error: ") and message in err and err.count("\n") == 1


def test_serve_refuses_a_replica_that_cannot_fit_before_loading(tmp_path, monkeypatch):
    """GPT-NeoX-20B's config alone (no weights in the directory) on a 40 GiB GPU in bf16: `neoxray serve`'s engine
    build stops at the memory check, naming what would fit, and never starts loading; int8 on the same GPU is
    let through to loading."""
    import types

    from neoxray.model.hf import config_to_hf
    from neoxray.platform import model_loading
    from neoxray.platform.serve.args import ServeArgs

    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(NEOX_20B, torch.bfloat16)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=40 * GIB))
    loads = []
    monkeypatch.setattr(model_loading, "load_for_inference", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    args = ServeArgs(model=str(tmp_path), device="cuda", max_num_seqs=4, kv_cache_tokens=8192)
    with pytest.raises(NeoxrayError, match=r"would fit: .*--tensor-parallel-size 2") as e:
        args.build_engine()
    assert "\n" not in str(e.value) and not loads
    lines = []
    ServeArgs(model=str(tmp_path), device="cuda", max_num_seqs=4, quantization="int8_weight_only").check_fits(
        lines.append
    )
    assert lines and "GiB" in lines[0]
