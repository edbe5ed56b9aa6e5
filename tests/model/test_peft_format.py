"""peft's LoRA adapter directories against peft itself (0.21): adapters that peft writes give, in neoxray (one
adapter on the model, or merged into its weights), the logits of peft's `PeftModel`; what neoxray writes loads in
`PeftModel.from_pretrained` with no missing or unexpected keys and gives the same logits, and merges to the
weights of peft's `merge_and_unload`. Bad directories and adapters for another base are one-line NeoxrayErrors
naming the directory or the tensor."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.gptneox import GPTNeoX, build_model
from neoxray.model.hf import config_to_hf, from_hf_name
from neoxray.model.lora import LoRAAdapter, LoRASpec, adapter_from_model, apply_lora, load_lora, merge_into
from neoxray.model.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    from_peft_file_key,
    peft_file_key,
    peft_state_dict_key,
    read_adapter_config,
    read_peft_adapter,
    write_peft_adapter,
)

CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=256, max_seq_len=64, intermediate_size=128)
ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
TOL = dict(rtol=0, atol=1e-5)


def hf_base(cfg: ModelConfig = CFG, seed: int = 0) -> GPTNeoXForCausalLM:
    """transformers' GPT-NeoX with its own random weights (larger than the default, so differences show)."""
    torch.manual_seed(seed)
    hf_cfg = GPTNeoXConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "neoxray"})
    hf_cfg.initializer_range = 0.2
    return GPTNeoXForCausalLM(hf_cfg).eval()


def ours_from(hf: GPTNeoXForCausalLM, cfg: ModelConfig = CFG) -> GPTNeoX:
    """neoxray's model with the weights of a (not yet peft-wrapped) transformers model."""
    model = build_model(cfg, seed=None)
    model.load_state_dict({from_hf_name(k): v.clone() for k, v in hf.state_dict().items()})
    return model.eval()


def peft_adapter(tmp_path, seed=1, cfg: ModelConfig = CFG, **lora_kw):
    """A peft model on a fresh base with random (nonzero) lora_B, saved by peft: (our base, PeftModel, dir)."""
    base = hf_base(cfg)
    ours = ours_from(base, cfg)
    pm = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, **lora_kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    out = tmp_path / "adapter"
    pm.save_pretrained(out)
    return ours, pm, out


def ids(cfg: ModelConfig = CFG, b=2, s=13, seed=0):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


CASES = {
    "all-targets": dict(),
    "subset": dict(target_modules=["query_key_value", "dense_4h_to_h"]),
    "layers-to-transform": dict(target_modules=["dense", "dense_h_to_4h"], layers_to_transform=[1]),
    "rank-alpha-pattern": dict(
        rank_pattern={"dense_4h_to_h": 2, "layers.1.attention.query_key_value": 6},
        alpha_pattern={"layers.1.attention.dense": 3.0, "dense_h_to_4h": 5},
    ),
    "rslora": dict(use_rslora=True, r=8, lora_alpha=4, rank_pattern={"layers.0.attention.dense": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_written_adapter_gives_peft_logits(tmp_path, case):
    ours, pm, d = peft_adapter(tmp_path, **CASES[case])
    x = ids()
    with torch.no_grad():
        want = pm(x).logits
        base_logits = ours(x)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter changes the logits

    adapter = read_peft_adapter(d, CFG)
    n_modules = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A.default"))
    assert len(adapter.modules()) == n_modules
    for path in adapter.modules():  # ranks and scalings as peft has them
        layer = pm.get_submodule(f"base_model.model.gpt_neox.{path}")
        assert adapter.rank(path) == layer.r["default"]
        assert adapter.scaling(path) == pytest.approx(layer.scaling["default"], rel=1e-12)

    single = build_model(CFG, seed=None)
    single.load_state_dict(ours.state_dict())
    load_lora(single.eval(), adapter)
    with torch.no_grad():
        torch.testing.assert_close(single(x), want, **TOL)

    merge_into(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, **TOL)


def test_resume_path_equals_peft(tmp_path):
    """apply_lora on the meta device, materialise, then load base and adapter tensors under our names."""
    ours, pm, d = peft_adapter(tmp_path, r=4, lora_alpha=6, target_modules=["query_key_value", "dense_h_to_4h"])
    adapter = read_peft_adapter(d, CFG)
    with torch.device("meta"):
        model = GPTNeoX(CFG)
    apply_lora(model, adapter.spec, seed=0)  # meta: left uninitialised
    model.to_empty(device="cpu")
    model.load_state_dict({**ours.state_dict(), **adapter.tensors})  # strict: exactly these names
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), pm(x).logits, **TOL)


def test_shape_mismatch_names_the_tensor(tmp_path):
    _, _, d = peft_adapter(tmp_path)
    wider = ModelConfig(n_layers=2, d_model=96, n_heads=4, vocab_size=256, max_seq_len=64, intermediate_size=128)
    with pytest.raises(NeoxrayError) as e:
        read_peft_adapter(d, wider)
    msg = str(e.value)
    assert "\n" not in msg and "base_model.model.gpt_neox.layers.0." in msg and "shape" in msg
    fewer = ModelConfig(n_layers=1, d_model=64, n_heads=4, vocab_size=256, max_seq_len=64, intermediate_size=128)
    with pytest.raises(
        NeoxrayError, match=r"tensor base_model\.model\.gpt_neox\.layers\.1\..* layer 1; the base has 1"
    ):
        read_peft_adapter(d, fewer)
    # also against a model directly, without a config (load_lora and merge_into check the base's shapes)
    adapter = read_peft_adapter(d)
    narrow_ffn = build_model(
        ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=256, max_seq_len=64, intermediate_size=192),
        seed=0,
    )
    for fn in (load_lora, merge_into):
        with pytest.raises(NeoxrayError, match=r"tensor layers\.0\.mlp\.dense_h_to_4h\.lora_B has shape") as e:
            fn(narrow_ffn, adapter)
        assert "\n" not in str(e.value)
    assert not any("lora" in n for n, _ in narrow_ffn.named_parameters())  # nothing changed


def _edit_config(d, **changes):
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    cfg.update(changes)
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg))


BAD = {
    "missing-dir": (lambda d: d.rename(d.with_name("gone")), "LoRA adapter not found"),
    "no-config": (lambda d: (d / ADAPTER_CONFIG).unlink(), "no adapter_config.json"),
    "no-weights": (lambda d: (d / ADAPTER_WEIGHTS).unlink(), "no adapter_model.safetensors"),
    "pickled-only": (
        lambda d: (d / ADAPTER_WEIGHTS).rename(d / "adapter_model.bin"),
        "only a pickled adapter_model.bin",
    ),
    "dora": (lambda d: _edit_config(d, use_dora=True), "DoRA"),
    "prefix-tuning": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), "peft_type is 'PREFIX_TUNING'"),
    "pissa": (lambda d: _edit_config(d, init_lora_weights="pissa_niter_4"), "changes the base model's weights"),
    "bias": (lambda d: _edit_config(d, bias="all"), "bias is 'all'"),
    "lm-head": (lambda d: _edit_config(d, target_modules=["query_key_value", "embed_out"]), "'embed_out'"),
    "bad-json": (lambda d: (d / ADAPTER_CONFIG).write_text("{not json"), "invalid JSON"),
    "truncated-weights": (
        lambda d: (d / ADAPTER_WEIGHTS).write_bytes((d / ADAPTER_WEIGHTS).read_bytes()[:100]),
        "not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_directories_are_one_line_errors_naming_them(tmp_path, case):
    _, _, d = peft_adapter(tmp_path)
    break_it, text = BAD[case]
    break_it(d)
    with pytest.raises(NeoxrayError) as e:
        read_peft_adapter(d, CFG)
    msg = str(e.value)
    assert text in msg and str(d) in msg and "\n" not in msg, msg
    assert e.value.__cause__ is None or case == "missing-dir"


def test_stray_tensors_are_refused(tmp_path):
    _, _, d = peft_adapter(tmp_path, target_modules=["query_key_value"])
    tensors = load_file(d / ADAPTER_WEIGHTS)
    extra = {**tensors, "base_model.model.gpt_neox.layers.0.mlp.dense_h_to_4h.lora_A.weight": torch.zeros(4, 64)}
    save_file(extra, d / ADAPTER_WEIGHTS)
    with pytest.raises(NeoxrayError, match=r"dense_h_to_4h\.lora_A\.weight is for a module outside target_modules"):
        read_peft_adapter(d, CFG)
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, d / ADAPTER_WEIGHTS)
    with pytest.raises(NeoxrayError, match=r"lm_head\.lora_A\.weight is not a LoRA weight"):
        read_peft_adapter(d, CFG)


def _random_adapter(spec: LoRASpec, ranks=None, alphas=None, seed=3) -> LoRAAdapter:
    """Adapter weights for CFG drawn at random (ranks: per module path, else spec.r)."""
    g = torch.Generator().manual_seed(seed)
    d, f = CFG.d_model, CFG.ffn_dim
    sizes = {"query_key_value": (d, 3 * d), "dense": (d, d), "dense_h_to_4h": (d, f), "dense_4h_to_h": (f, d)}
    sub = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
    tensors = {}
    for i in spec.layers if spec.layers is not None else range(CFG.n_layers):
        for t in spec.targets:
            path = f"layers.{i}.{sub[t]}.{t}"
            r = (ranks or {}).get(path, spec.r)
            n_in, n_out = sizes[t]
            tensors[f"{path}.lora_A"] = torch.randn(r, n_in, generator=g) * 0.2
            tensors[f"{path}.lora_B"] = torch.randn(n_out, r, generator=g) * 0.2
    return LoRAAdapter(spec, tensors, alphas or {})


WRITE_CASES = {
    "all": (LoRASpec(r=4, alpha=8), None, None),
    "subset-rslora": (LoRASpec(r=4, alpha=3, targets=("dense", "dense_4h_to_h"), use_rslora=True), None, None),
    "layers": (LoRASpec(r=2, alpha=2, targets=("query_key_value",), layers=(1,)), None, None),
    "patterns": (
        LoRASpec(r=4, alpha=8),
        {"layers.1.attention.query_key_value": 6, "layers.0.mlp.dense_4h_to_h": 2},
        {"layers.1.attention.query_key_value": 2.5, "layers.1.mlp.dense_h_to_4h": 12.0},
    ),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_written_adapter_loads_in_peft_with_equal_logits_and_merge(tmp_path, case):
    spec, ranks, alphas = WRITE_CASES[case]
    adapter = _random_adapter(spec, ranks, alphas)
    d = write_peft_adapter(adapter, tmp_path / "out", base_model_name_or_path="tiny")
    assert sorted(p.name for p in d.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert not list(tmp_path.glob(".out*"))  # no temporary directory left behind

    base = hf_base()
    ours = ours_from(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, d).eval()
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    result = pm.load_adapter(d, adapter_name="again")  # peft's own report of the keys it loaded
    assert not result.missing_keys and not result.unexpected_keys
    pm.set_adapter("default")
    n_wrapped = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A.default"))
    assert n_wrapped == len(adapter.modules())

    x = ids()
    with torch.no_grad():
        want = pm(x).logits
        assert (want - ours(x)).abs().max() > 1e-2
        load_lora(ours, adapter)
        torch.testing.assert_close(ours(x), want, **TOL)

    # our state_dict names map 1:1 onto peft's in-memory names, with equal tensors
    peft_sd = pm.state_dict()
    for name, t in ours.state_dict().items():
        key = peft_state_dict_key(name)
        if key not in peft_sd:  # a linear without an adapter keeps its plain name in peft
            key = key.replace(".base_layer.", ".")
        torch.testing.assert_close(peft_sd[key], t, rtol=0, atol=0)

    # merging: peft's merge_and_unload weights
    merged = pm.merge_and_unload()
    plain = ours_from(hf_base())
    merge_into(plain, adapter)
    want_sd = {from_hf_name(k): v for k, v in merged.state_dict().items()}
    for name, t in plain.state_dict().items():
        torch.testing.assert_close(t, want_sd[name], rtol=0, atol=1e-6)

    # and back: read what we wrote, identically
    again = read_peft_adapter(d, CFG)
    assert again.modules() == adapter.modules()
    for path in adapter.modules():
        assert again.rank(path) == adapter.rank(path) and again.scaling(path) == pytest.approx(adapter.scaling(path))
    for k, t in adapter.tensors.items():
        assert torch.equal(again.tensors[k], t)


def test_adapter_from_model_round_trip(tmp_path):
    adapter = _random_adapter(
        LoRASpec(r=4, alpha=8), {"layers.0.attention.dense": 2}, {"layers.1.mlp.dense_4h_to_h": 1.0}
    )
    model = build_model(CFG, seed=0)
    load_lora(model, adapter)
    back = adapter_from_model(model, adapter.spec)
    assert back.alphas == pytest.approx(adapter.alphas)
    assert back.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    d = write_peft_adapter(back, tmp_path / "a")
    write_peft_adapter(back, d)  # over an existing directory
    assert read_adapter_config(d)["alpha_pattern"] == {"gpt_neox.layers.1.mlp.dense_4h_to_h": 1.0}


def test_names():
    name = "layers.3.attention.query_key_value.lora_A"
    key = peft_file_key(name)
    assert key == "base_model.model.gpt_neox.layers.3.attention.query_key_value.lora_A.weight"
    assert from_peft_file_key(key) == name
    assert from_peft_file_key(key.replace(".weight", ".default.weight")) == name
    assert from_peft_file_key("base_model.model.lm_head.lora_A.weight") is None
    assert peft_state_dict_key("embed_out.weight") == "base_model.model.lm_head.weight"
    assert peft_state_dict_key("layers.0.mlp.dense_4h_to_h.bias") == (
        "base_model.model.gpt_neox.layers.0.mlp.dense_4h_to_h.base_layer.bias"
    )
