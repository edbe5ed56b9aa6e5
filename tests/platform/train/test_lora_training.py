"""LoRA fine-tuning in the 3D trainer, on a real local Ray cluster: every dp x tp x pp layout trains the same
adapters (losses within 1e-4), their loss equals peft's on the same base, adapter and batch, checkpoints hold
only the adapters (and the base's identity), resume and re-layout resume are exact, and the export is a peft
adapter that peft loads with no missing or unexpected keys (and --merge equals peft's merge_and_unload)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import run_cli
from tests.platform.train.conftest import LAYOUTS, STEPS, assert_same, cfg_for, losses

pytestmark = pytest.mark.e2e  # real Ray Train runs

# adapters take a larger learning rate than full training
LORA = ["lora.rank=4", "lora.alpha=8", "optimizer.lr=3e-2", "optimizer.min_lr=3e-3", "checkpoint.every=3"]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A random tiny GPT-NeoX written by transformers: the frozen base."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neoxray.model.config import get_preset
    from neoxray.model.hf import config_to_hf

    cfg = get_preset("tiny", vocab_size=1024, max_seq_len=64)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "neoxray"}))
    out = tmp_path_factory.mktemp("base") / "hf"
    hf.save_pretrained(out)
    return out


def lora_cfg(prepared, base, name, layout=(1, 1, 1), extra=()):
    return cfg_for(prepared, name, layout, [f"model.init_from={base}", *LORA, *extra])


def global_batch(prepared, step: int) -> dict:
    """The global batch of optimizer step `step` (1-based), as every layout reads it."""
    from neoxray.pipelines.reader import iter_batches, open_blend

    return next(iter_batches(open_blend([str(prepared)], seed=11), 8, seed=11, consumed_samples=8 * (step - 1)))


def mean_loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()


def test_lora_trains_the_same_adapters_under_every_layout_and_equals_peft(prepared, hf_base, ray_local, tmp_path):
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    from neoxray.platform.train.driver import run_train

    runs = {}
    for layout in LAYOUTS:
        run_dir = tmp_path / "lora-{}{}{}".format(*layout)
        run_train(lora_cfg(prepared, hf_base, run_dir.name, layout), run_dir=str(run_dir))
        runs[layout] = run_dir
    ref = losses(runs[(1, 1, 1)])
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1] - 0.02, "the adapters should learn something in 5 steps"
    for run_dir in runs.values():
        assert_same(losses(run_dir), ref, range(1, STEPS + 1))
        assert_same(losses(run_dir, "val_loss"), losses(runs[(1, 1, 1)], "val_loss"), [STEPS])

    base = GPTNeoXForCausalLM.from_pretrained(hf_base).eval()
    # B starts at zero: step 1 is the base model's loss on the first global batch
    assert abs(ref[1] - mean_loss(base, global_batch(prepared, 1))) < 1e-4 * ref[1]

    # checkpoints: adapters and their Adam moments only, megabytes not the base's size, the base's identity
    ckpt = runs[(2, 2, 2)] / "checkpoint-step-0000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["alpha"] == 8
    assert meta["base"]["path"] == str(hf_base.resolve()) and len(meta["base"]["sha256"]) == 64
    names = set()
    for shard in meta["shards"]:
        with safe_open(ckpt / shard["file"], framework="pt") as f:
            names |= {k.split("/", 1)[1] for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
    assert names and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B") for n in names), sorted(names)[:4]
    assert len(names) == 2 * 4 * 2  # A and B of 4 targets in each of the tiny model's 2 layers
    stored = sum(s["bytes"] for s in meta["shards"])
    assert stored < 0.2 * (hf_base / "model.safetensors").stat().st_size

    # export: a peft adapter peft loads with no missing or unexpected keys; its loss on step 4's batch is the
    # loss the trainer reported at step 4 (the adapter after 3 steps, the same base and batch)
    peft_dir = tmp_path / "adapter"
    run_cli("export", "--checkpoint", str(ckpt), "--out", str(peft_dir))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    peft_model = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(hf_base), peft_dir).eval()
    from peft.utils import get_peft_model_state_dict

    assert len(get_peft_model_state_dict(peft_model)) == 2 * 4 * 2
    step4 = global_batch(prepared, 4)
    assert abs(mean_loss(peft_model, step4) - ref[4]) < 1e-4 * ref[4]
    assert abs(mean_loss(base, step4) - ref[4]) > 1e-3  # the adapter changed the model

    # --merge: a full Hugging Face model equal to peft's merge_and_unload
    merged_dir = tmp_path / "merged"
    run_cli("export", "--checkpoint", str(ckpt), "--out", str(merged_dir), "--merge")
    merged = GPTNeoXForCausalLM.from_pretrained(merged_dir).eval()
    folded = peft_model.merge_and_unload().eval()
    ids = step4["input_ids"]
    with torch.no_grad():
        assert (merged(ids).logits - folded(ids).logits).abs().max().item() < 1e-4

    # re-layout resume: the (2,2,2) checkpoint at step 3 continues under (1,2,1) with the same losses
    relayout = tmp_path / "relayout"
    run_train(
        lora_cfg(prepared, hf_base, "relayout", (1, 2, 1), [f"checkpoint.load_from={ckpt}"]), run_dir=str(relayout)
    )
    assert sorted(losses(relayout)) == [4, 5]
    assert_same(losses(relayout), ref, [4, 5])
    check_resume(prepared, hf_base, tmp_path, runs[(1, 1, 1)])


def check_resume(prepared, hf_base, tmp_path, full):
    """A LoRA run stopped at step 3 and started again continues bit-identically; another adapter shape, no
    LoRA, or a base whose files changed is refused before anything runs."""
    from neoxray.errors import NeoxrayError
    from neoxray.platform.train.driver import run_train

    part = tmp_path / "part"
    run_train(lora_cfg(prepared, hf_base, "part", (1, 1, 1), ["train.steps=3"]), run_dir=str(part))
    # train.steps=3 with the 5-step schedule (schedule.decay_steps=5): continue to 5 in the same run directory
    run_train(lora_cfg(prepared, hf_base, "part", (1, 1, 1)), run_dir=str(part))
    got = losses(part)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == losses(full)[s] for s in got), (got, losses(full))  # bit-identical resume

    # another adapter shape, no LoRA at all, or a base whose files changed: refused before anything runs
    with pytest.raises(NeoxrayError, match=r"lora.rank 4 vs 8"):
        run_train(lora_cfg(prepared, hf_base, "part", extra=["lora.rank=8", "train.steps=6"]), run_dir=str(part))
    with pytest.raises(NeoxrayError, match="is a LoRA checkpoint"):
        run_train(cfg_for(prepared, "part", extra=["train.steps=6"]), run_dir=str(part))
    changed = tmp_path / "changed-base"
    changed.mkdir()
    for f in hf_base.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / "model.safetensors")
    weights["gpt_neox.final_layer_norm.weight"] += 1
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    ckpt = part / "checkpoint-step-0000003"
    with pytest.raises(NeoxrayError, match="base whose files have changed"):
        run_train(
            lora_cfg(prepared, changed, "other", extra=[f"checkpoint.load_from={ckpt}"]), run_dir=str(tmp_path / "o")
        )


@pytest.fixture(scope="module")
def instructions(tmp_path_factory, sample_tokenizer_dir, ray_local):
    """The bundled prompt-completion sample, prepared with its loss masks into rows of 33 tokens."""
    from neoxray.pipelines.prepare import prepare
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("sft") / "instructions-32"
    sample = ROOT / "neoxray" / "pipelines" / "sample" / "instructions.jsonl"
    prepare(
        [str(sample)],
        str(sample_tokenizer_dir),
        32,
        str(out),
        workers=2,
        progress=False,
        content="prompt-completion",
        val_fraction=0.1,
    )
    return out


def masked_mean_loss(model, batch) -> float:
    """transformers' loss with the prompt labels set to -100, over the whole global batch."""
    labels = batch["labels"].masked_fill(~batch["loss_mask"], -100)
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()


def test_masked_loss_equals_transformers_and_every_layout(instructions, hf_base, ray_local, tmp_path):
    """Prompt-completion data trains only completion tokens: step 1's loss (LoRA's B is zero: the base) equals
    transformers' loss with the prompt labels at -100 on the same global batch; (1,1,1) and (2,2,2) give the same
    training and validation losses (the mean is over the global batch's trained labels, not per micro-batch)."""
    from transformers import GPTNeoXForCausalLM

    from neoxray.pipelines.reader import iter_batches, open_blend
    from neoxray.platform.train.driver import run_train

    extra = ["train.steps=3", "schedule.decay_steps=3", "eval.every=3", "checkpoint.every=0"]
    runs = {}
    for layout in [(1, 1, 1), (2, 2, 2)]:
        run_dir = tmp_path / "sft-{}{}{}".format(*layout)
        run_train(lora_cfg(instructions, hf_base, run_dir.name, layout, extra), run_dir=str(run_dir))
        runs[layout] = run_dir
    ref = losses(runs[(1, 1, 1)])
    assert_same(losses(runs[(2, 2, 2)]), ref, [1, 2, 3])
    assert_same(losses(runs[(2, 2, 2)], "val_loss"), losses(runs[(1, 1, 1)], "val_loss"), [3])

    batch = next(iter_batches(open_blend([str(instructions)], seed=11), 8, seed=11))
    assert 0 < int(batch["loss_mask"].sum()) < batch["loss_mask"].numel()  # prompts are masked, completions not
    base = GPTNeoXForCausalLM.from_pretrained(hf_base).eval()
    expect = masked_mean_loss(base, batch)
    assert abs(ref[1] - expect) < 1e-4 * expect
    assert abs(ref[1] - mean_loss(base, batch)) > 1e-3  # the unmasked loss is another figure
