"""`neoxray eval --lora DIR` (and `load_for_inference(..., lora=DIR)`, behind generate and score): a peft adapter
written by peft itself on the tiny model gives the results of evaluating the model peft merges
(`merge_and_unload`, written to disk as a plain model directory), request by request, and not the base model's.
In process, no Ray."""

from __future__ import annotations

import pytest
import torch

from neoxray.errors import NeoxrayError
from tests.platform.eval.conftest import TASKS, TASKS_DIR, at_root, evaluate
from tests.platform.eval.test_backend import assert_same_requests, assert_same_results

LIMIT = 5
"""Documents per task: enough requests of every kind, kept fast."""


@pytest.fixture(scope="module")
def lora_dirs(tiny_model_dir, tmp_path_factory):
    """(peft adapter directory for the tiny model, directory of the model peft merges it into)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from neoxray.model.hf import from_hf_name, load_pretrained, save_pretrained
    from neoxray.model.tokenizer import Tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"], rank_pattern={"dense_4h_to_h": 2}
    )
    pm = get_peft_model(base, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tmp = tmp_path_factory.mktemp("lora")
    pm.save_pretrained(tmp / "adapter")
    merged = pm.merge_and_unload()
    model = load_pretrained(tiny_model_dir, dtype=torch.float32)
    model.load_state_dict({from_hf_name(k): v for k, v in merged.state_dict().items()})
    save_pretrained(model, tmp / "merged", tokenizer=Tokenizer.load(tiny_model_dir))
    return tmp / "adapter", tmp / "merged"


@pytest.fixture(scope="module")
def merged_results(lora_dirs, local_tm):
    return evaluate("neoxray", f"pretrained={lora_dirs[1]},device=cpu", local_tm, limit=LIMIT)


def _scores(results: dict) -> list[float]:
    """Every log-likelihood of every request (multiple choice, last word, rolling), in order."""
    out = []
    for task in TASKS:
        for sample in results["samples"][task]:
            for (r,) in sample["resps"]:
                if not isinstance(r, str):
                    out.append(r[0] if isinstance(r, (tuple, list)) else r)
    return out


def test_the_adapter_changes_the_results(tiny_model_dir, merged_results, local_tm):
    """Against the base model's results: the adapter changes most log-likelihoods (so the comparison above
    would fail if --lora were ignored)."""
    base = evaluate("neoxray", f"pretrained={tiny_model_dir},device=cpu", local_tm, limit=LIMIT)
    pairs = list(zip(_scores(base), _scores(merged_results), strict=True))
    assert len(pairs) >= 20
    assert sum(abs(a - b) > 1e-2 * max(1.0, abs(b)) for a, b in pairs) >= len(pairs) // 2


def test_eval_with_lora_equals_the_peft_merged_model(tiny_model_dir, lora_dirs, merged_results, tmp_path, monkeypatch):
    """`neoxray eval --lora` through its driver: the merged model's metrics and, request by request, its
    log-likelihoods, greedy flags and generated texts; --lora recorded in the results' model_args."""
    from neoxray.platform.eval import results as results_module
    from neoxray.platform.eval.run import EvalArgs, run_eval

    written = {}
    monkeypatch.setattr(results_module, "write_samples", lambda output, samples: written.update(samples))
    adapter, _ = lora_dirs
    args = EvalArgs(
        model=str(tiny_model_dir),
        lora=str(adapter),
        tasks=list(TASKS),
        include_path=[str(TASKS_DIR)],
        limit=LIMIT,
        batch_size=8,
        device="cpu",
        bootstrap_iters=0,
        output=str(tmp_path / "results.json"),
        log_samples=True,
        json=True,
    )
    with at_root():
        results = run_eval(args)
    assert_same_results(results, merged_results, rtol=1e-4)
    compared = assert_same_requests({"samples": written}, merged_results, rtol=1e-4)
    assert min(compared.values()) >= 3, compared
    assert f"lora={adapter}" in results["config"]["model_args"]
    assert results["config"]["model_name"] == "tiny+adapter"
    assert (tmp_path / "results.json").exists()


def _wide_adapter(tmp_path):
    """A peft adapter for a model 96 wide (the tiny model is 64 wide)."""
    from neoxray.model.lora import LoRAAdapter, LoRASpec
    from neoxray.model.peft_format import write_peft_adapter

    wide = {
        "layers.0.attention.dense.lora_A": torch.zeros(2, 96),
        "layers.0.attention.dense.lora_B": torch.zeros(96, 2),
    }
    return write_peft_adapter(LoRAAdapter(LoRASpec(r=2, targets=("dense",)), wide), tmp_path / "wide")


WIDE_ERROR = "tensor base_model.model.gpt_neox.layers.0.attention.dense.lora_A.weight has shape (2, 96)"


def test_bad_lora_is_one_line_error_before_anything_loads(tiny_model_dir, tmp_path):
    from neoxray.platform.eval.run import EvalArgs, run_eval

    args = EvalArgs(model=str(tiny_model_dir), lora=str(tmp_path / "nope"), tasks=["no_such_task_either"])
    with pytest.raises(NeoxrayError, match=r"^LoRA adapter not found: .*nope$"):  # before the task names
        run_eval(args)
    args.lora = str(_wide_adapter(tmp_path))
    with pytest.raises(NeoxrayError) as e:
        run_eval(args)
    assert WIDE_ERROR in str(e.value) and "\n" not in str(e.value)


def test_load_for_inference_with_lora(tiny_model_dir, lora_dirs, tmp_path, monkeypatch):
    from neoxray.model.hf import load_pretrained
    from neoxray.platform.model_loading import load_for_inference

    adapter, merged = lora_dirs
    model, tok, name = load_for_inference(tiny_model_dir, device="cpu", lora=adapter)
    assert name == "tiny+adapter" and tok.eod_id is not None
    ref = load_pretrained(merged, dtype=torch.float32)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    # an adapter for a wider model: one line naming the tensor, before the base's weights are read
    import neoxray.model.hf

    monkeypatch.setattr(neoxray.model.hf, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(NeoxrayError) as e:
        load_for_inference(tiny_model_dir, device="cpu", lora=_wide_adapter(tmp_path))
    assert WIDE_ERROR in str(e.value) and "\n" not in str(e.value)
