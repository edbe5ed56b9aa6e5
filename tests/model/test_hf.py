"""Hugging Face interop: parity with transformers' GPTNeoXForCausalLM, exact round trips, loading both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.gptneox import build_model
from neoxray.model.hf import (
    config_to_hf,
    from_hf_name,
    load_model_and_tokenizer,
    load_pretrained,
    read_config,
    save_pretrained,
)

SHAPES = [
    # (layers, d_model, heads, vocab, rotary_pct, parallel_residual)
    (2, 64, 4, 512, 0.25, True),
    (2, 64, 4, 512, 1.0, True),
    (3, 96, 6, 640, 0.25, False),
    (1, 128, 2, 384, 1.0, False),
    (4, 48, 3, 256, 0.5, True),
]


def hf_reference(cfg: ModelConfig, seed: int) -> GPTNeoXForCausalLM:
    """transformers' own model with its own random init (independent of ours)."""
    torch.manual_seed(seed)
    hf_cfg = GPTNeoXConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "neoxray"})
    hf_cfg.initializer_range = 0.2  # larger weights than the default: differences would show
    return GPTNeoXForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "L{}-d{}-h{}-V{}-rot{}-{}".format(*s[:5], "par" if s[5] else "seq")
)
def test_logits_match_transformers(shape):
    n_layers, d, h, v, rot, par = shape
    cfg = ModelConfig(
        n_layers=n_layers, d_model=d, n_heads=h, vocab_size=v, max_seq_len=64, rotary_pct=rot, parallel_residual=par
    )
    ref = hf_reference(cfg, seed=n_layers * 100 + d)
    ours = build_model(cfg, seed=None)
    ours.load_state_dict({from_hf_name(k): t for k, t in ref.state_dict().items()})
    ids = torch.randint(0, v, (3, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert (a - b).abs().max().item() < 1e-4


def test_round_trip_is_exact_and_transformers_loads_it(tmp_path, sample_tokenizer_dir):
    from neoxray.model.tokenizer import Tokenizer

    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=1024, max_seq_len=64, rotary_pct=0.25)
    model = build_model(cfg, seed=7)
    tok = Tokenizer.load(sample_tokenizer_dir)
    out = save_pretrained(model, tmp_path / "m", tokenizer=tok, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded checkpoint"
    back = load_pretrained(out)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)
    # save again from what we loaded: the same bytes of every tensor
    out2 = save_pretrained(back, tmp_path / "m2", max_shard_size="100KB")
    for f in sorted(index["weight_map"].values()):
        a, b = load_file(out / f), load_file(out2 / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    ids = torch.randint(0, 1024, (2, 30))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Hello, world. Rotary embeddings!"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>"


def test_reads_what_transformers_writes(tmp_path):
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=512, max_seq_len=64)
    ref = hf_reference(cfg, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4


def test_bf16_round_trip(tmp_path):
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=128), seed=1, dtype=torch.bfloat16)
    out = save_pretrained(model, tmp_path / "m")
    assert read_config(out)[1] == torch.bfloat16
    back = load_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_bad_directories_give_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(NeoxrayError, match="not found"):
        read_config(tmp_path / "nope")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NeoxrayError, match="not a GPT-NeoX model"):
        read_config(tmp_path / "llama")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(NeoxrayError, match="invalid JSON"):
        read_config(tmp_path / "broken")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(NeoxrayError, match="safetensors only"):
        load_pretrained(pickled)
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((tiny_model_dir / f).read_bytes())
    with pytest.raises(NeoxrayError, match="tokenizer"):
        load_model_and_tokenizer(notok)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["hidden_size"] = 128
    (wrong / "config.json").write_text(json.dumps(cfg))
    (wrong / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    with pytest.raises(NeoxrayError, match="shape"):
        load_pretrained(wrong)


def test_interrupted_save_leaves_no_complete_looking_directory(tmp_path, monkeypatch):
    import neoxray.model.hf as hfmod

    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=128), seed=1)
    save_pretrained(model, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hfmod, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(build_model(model.config, seed=2), tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
