"""Weight-only quantization (`neoxray.platform.inference.quantization`) on tiny models: int8 stores the linears'
weights in a quarter of the bytes and keeps the logits, the held-out perplexity of a model trained here and
greedy generation close to fp32; multi-LoRA slots on a quantized base stay in fp32 and keep their effect;
schemes torchao cannot run, or does not know, are one-line errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neoxray.errors import NeoxrayError
from neoxray.model.config import get_preset
from neoxray.model.decoding import SamplingParams
from neoxray.model.generate import generate
from neoxray.model.gptneox import build_model, cross_entropy
from neoxray.model.lora import LoRAAdapter
from neoxray.model.lora_spec import TARGETS, LoRASpec
from neoxray.model.multi_lora import MultiLoRA
from neoxray.model.tensor_parallel import ColumnParallelLinear, RowParallelLinear, parallelize
from neoxray.pipelines.pile import iter_documents
from neoxray.platform.inference.quantization import (
    SCHEMES,
    check_scheme,
    is_quantized,
    quantize_weights,
    tensor_bytes,
    weight_bytes,
)
from tests.conftest import SAMPLE

SEQ = 64
INT8 = "int8_weight_only"


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear))
    }


def expected_int8_bytes(model: nn.Module) -> int:
    """fp32 bytes of everything but the linears' weights, plus per linear weight [out, in]: int8 data (out x in
    bytes), an fp32 scale and an int8 zero point per output row (torchao's per-row Int8Tensor)."""
    weights = {id(w): w for w in linear_weights(model).values()}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in weights)
    return other + sum(w.shape[0] * w.shape[1] + w.shape[0] * (4 + 1) for w in weights.values())


@pytest.fixture(scope="module", autouse=True)
def no_denormals():
    """The trained model's softmax over bytes the text never has is denormal (in training and scoring), which
    made this file 5x slower; flushing denormals to zero is a per-thread CPU flag, so the tiny models here run on
    this thread only (no loss of speed at their size). Both settings are restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT-NeoX over bytes (vocabulary 256) trained 150 steps on nine tenths of the first 200 documents of
    the bundled sample, and 48 held-out windows spread over the other tenth. Trained weights, unlike random ones, give
    peaked predictions whose perplexity quantization error can move (random init scores about the vocabulary
    size whatever its weights' rounding). Bytes need no tokenizer training."""
    docs = [text for text, _ in itertools.islice(iter_documents(SAMPLE), 200)]

    def rows(texts, n):
        s = torch.tensor(list("\n".join(texts).encode()), dtype=torch.long)
        starts = torch.linspace(0, (s.numel() - 1) // SEQ - 1, n).long() if n else range((s.numel() - 1) // SEQ)
        return torch.stack([s[i * SEQ : i * SEQ + SEQ + 1] for i in starts])

    train = rows([d for i, d in enumerate(docs) if i % 10], None)
    held = rows([d for i, d in enumerate(docs) if i % 10 == 0], 48)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=256, max_seq_len=SEQ), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = train[torch.randint(0, train.shape[0], (16,), generator=g)]
        loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), held


@torch.no_grad()
def perplexity(model: nn.Module, rows: torch.Tensor) -> float:
    logits = model(rows[:, :-1]).float()
    return math.exp(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item())


def test_int8_quarters_the_linear_weights_and_keeps_the_logits():
    model = build_model(get_preset("tiny"), seed=0).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    before = {n: tensor_bytes(w) for n, w in linear_weights(model).items()}
    want = expected_int8_bytes(model)
    quantize_weights(model, INT8)
    after = {n: tensor_bytes(w) for n, w in linear_weights(model).items()}
    assert all(is_quantized(w) for w in linear_weights(model).values())  # the head embed_out included
    assert not is_quantized(model.embed_in.weight)
    assert weight_bytes(model) == want
    ratio = sum(after.values()) / sum(before.values())
    assert 0.25 < ratio < 0.27, ratio  # 1 byte of 4, plus 5 bytes per row of 64 to 256 columns
    with torch.no_grad():
        got = model(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.03, rel  # 0.013 measured
    keep_head = build_model(get_preset("tiny"), seed=0)
    quantize_weights(keep_head, INT8, head=False)
    assert not is_quantized(keep_head.embed_out.weight) and is_quantized(keep_head.layers[1].mlp.dense_4h_to_h.weight)
    v, d = keep_head.embed_out.weight.shape
    assert weight_bytes(keep_head) == want + v * d * 4 - (v * d + v * 5)


def test_int8_perplexity_and_greedy_generation_of_a_trained_model(trained):
    """Held-out perplexity within 1% of fp32 (docs/benchmarks.md: +0.006% and +0.011% measured on trained models), and
    greedy tokens that match fp32's for the most part (a near-tie may flip)."""
    model, held = trained
    q = copy.deepcopy(model)
    quantize_weights(q, INT8)
    assert weight_bytes(q) < 0.3 * weight_bytes(model) + model.embed_in.weight.numel() * 4
    base, quant = perplexity(model, held), perplexity(q, held)
    assert base < 20, "the model did not learn: perplexity proves nothing"  # bytes: uniform would be 256
    assert quant != base
    assert quant / base - 1 < 0.01, (base, quant)
    prompts = [list(s.encode()) for s in ("The ", "def main(", "In 1990, the")]
    greedy = SamplingParams(greedy=True, stop_at_eod=False, max_new_tokens=24)
    want = [g.token_ids for g in generate(model, prompts, greedy, eod_id=0)]
    got = [g.token_ids for g in generate(q, prompts, greedy, eod_id=0)]
    assert all(len(t) == 24 for t in got)
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert same >= 0.75 * 3 * 24, (want, got)


def test_parallel_layers_of_a_size_one_group_are_quantized():
    model = build_model(get_preset("tiny-neox"), seed=0).eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(model)
    quantize_weights(plain, INT8)
    parallelize(model, None)
    qkv = model.layers[0].attention.query_key_value
    assert isinstance(qkv, ColumnParallelLinear) and isinstance(model.layers[0].mlp.dense_4h_to_h, RowParallelLinear)
    quantize_weights(model, INT8)
    assert all(is_quantized(w) for w in linear_weights(model).values())
    assert qkv.weight.tp_dim == 0 and qkv.weight.tp_size == 1  # the tensor-parallel tags survive
    assert weight_bytes(model) == weight_bytes(plain)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=1e-5)


def random_adapter(model: nn.Module, rank: int = 4) -> LoRAAdapter:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in TARGETS:
            out, inp = m.weight.shape
            tensors[f"{name}.lora_A"] = torch.randn(rank, inp, generator=g) * 0.2
            tensors[f"{name}.lora_B"] = torch.randn(out, rank, generator=g) * 0.2
    return LoRAAdapter(spec=LoRASpec(r=rank, alpha=2.0 * rank), tensors=tensors, name="a")


@pytest.mark.parametrize("slots_first", [False, True], ids=["quantize-then-slots", "slots-then-quantize"])
def test_multi_lora_on_a_quantized_base(trained, slots_first):
    """Adapter slots stay fp32 over int8 base weights; a row with the adapter gets what merging the adapter into
    the fp32 weights gives, within the base's quantization error, and a row without it the quantized base."""
    model, held = trained
    adapter = random_adapter(model)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for path in adapter.modules():
            w = merged.get_submodule(path).weight
            w += adapter.scaling(path) * adapter.tensors[f"{path}.lora_B"] @ adapter.tensors[f"{path}.lora_A"]
    q = copy.deepcopy(model)
    if not slots_first:
        quantize_weights(q, INT8)
    multi = MultiLoRA(q, max_adapters=2, max_rank=8)
    if slots_first:
        quantize_weights(q, INT8)
    multi.load(0, adapter)
    qkv = q.layers[0].attention.query_key_value
    assert is_quantized(qkv.weight)
    for t in (qkv.lora_A_stack, qkv.lora_B_stack, qkv.lora_scale):
        assert t.dtype == torch.float32 and not is_quantized(t)
    ids = held[:2, :-1]
    with torch.no_grad():
        multi.bind([0, None])
        both = q(ids)
        multi.unbind()
        quant_base = q(ids)
        want_lora, want_base = merged(ids[:1]), model(ids[1:])
    base_err = (quant_base[1:] - want_base).abs().max().item()
    effect = (want_lora - model(ids[:1])).abs().max().item()
    assert 0 < base_err < 0.02 * effect  # the adapter's effect dwarfs the quantization error
    torch.testing.assert_close(both[1:], quant_base[1:], rtol=0, atol=1e-5)  # the base row: no adapter
    assert (both[:1] - want_lora).abs().max().item() < 4 * base_err + 1e-4


def test_int4_runs_where_torchao_has_a_kernel_or_is_refused_in_one_line():
    if not torch.cuda.is_available():
        with pytest.raises(NeoxrayError, match=r"int4_weight_only needs a CUDA GPU") as e:
            check_scheme("int4_weight_only", "cpu")
        assert "\n" not in str(e.value)
        with pytest.raises(NeoxrayError, match=r"int4_weight_only needs a CUDA GPU"):
            quantize_weights(build_model(get_preset("tiny", d_model=128)), "int4_weight_only")
        return
    with pytest.raises(NeoxrayError, match="bfloat16"):
        check_scheme("int4_weight_only", "cuda", torch.float32)
    if torch.cuda.get_device_capability() < (8, 0):  # no int4 kernel: refused in one line
        with pytest.raises(NeoxrayError, match="compute capability >= 8.0"):
            check_scheme("int4_weight_only", "cuda", torch.bfloat16)
        return
    check_scheme("int4_weight_only", "cuda", torch.bfloat16)
    cfg = get_preset("tiny", d_model=128, n_heads=4)
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8), device="cuda")
    with torch.no_grad():
        ref = model(ids).float()
    before = weight_bytes(model)
    quantize_weights(model, "int4_weight_only")
    assert is_quantized(model.layers[0].mlp.dense_h_to_4h.weight) and not is_quantized(model.embed_out.weight)
    assert weight_bytes(model) < before
    with torch.no_grad():
        err = (model(ids).float() - ref).abs().max().item()
    assert 0 < err < 0.2 * ref.std().item()


@pytest.mark.parametrize("scheme", ["int3", "", "INT8_WEIGHT_ONLY"])
def test_unknown_scheme_is_a_one_line_error(scheme):
    with pytest.raises(NeoxrayError) as e:
        check_scheme(scheme, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "--quantization" in msg and repr(scheme) in msg
    assert all(s in msg for s in SCHEMES)
    model = build_model(get_preset("tiny"), seed=0)
    with pytest.raises(NeoxrayError, match="--quantization"):
        quantize_weights(model, scheme)
    assert not any(is_quantized(p) for p in model.parameters())
