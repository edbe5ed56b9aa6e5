"""LoRA fine-tuning in the 3D trainer on prompt-completion data, on a real local Ray cluster: dp x tp x pp =
2 x 2 x 2 trains the same adapters as one worker (training and validation losses within 1e-4), and so does a
re-layout resume to 1 x 2 x 1 (each parallelism alone is shown on full training in test_train.py, and the
sharded adapters equal the single-process ones in tests/model/test_lora.py); the masked loss equals
transformers' with the prompt labels at -100 and, after training, peft's on the same base, adapter and batch;
checkpoints hold only the adapters (and the base's identity); resume and re-layout resume are exact; the export
is a peft adapter that peft loads with no missing or unexpected keys (and --merge equals merge_and_unload)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import run_cli
from tests.platform.train.conftest import BASE, STEPS, assert_same, cfg_for, cpu_hog, losses

pytestmark = pytest.mark.e2e  # real Ray Train runs

# adapters take a larger learning rate than full training
LORA = ["lora.rank=4", "lora.alpha=8", "optimizer.lr=3e-2", "optimizer.min_lr=3e-3", "checkpoint.every=3"]
LAYOUTS = [(1, 1, 1), (2, 2, 2)]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, sample_tokenizer_dir):
    """A random tiny GPT-NeoX written by transformers, with the data's tokenizer: the frozen base."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neoxray.model.config import get_preset
    from neoxray.model.hf import config_to_hf

    cfg = get_preset("tiny", vocab_size=1024, max_seq_len=64)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "neoxray"}))
    out = tmp_path_factory.mktemp("base") / "hf"
    hf.save_pretrained(out)
    from neoxray.model.tokenizer import Tokenizer

    Tokenizer.load(sample_tokenizer_dir).save(out)
    return out


def lora_cfg(prepared, base, name, layout=(1, 1, 1), extra=()):
    return cfg_for(prepared, name, layout, [f"model.init_from={base}", *LORA, *extra])


def global_batch(prepared, step: int) -> dict:
    """The global batch of optimizer step `step` (1-based), as every layout reads it."""
    from neoxray.pipelines.reader import iter_batches, open_blend

    return next(iter_batches(open_blend([str(prepared)], seed=11), 8, seed=11, consumed_samples=8 * (step - 1)))


def mean_loss(model, batch) -> float:
    """transformers' loss over every label of the global batch (no mask)."""
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()


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


def test_lora_in_3d_trains_the_adapters_of_one_worker_and_equals_peft(
    instructions, hf_base, ray_local, s3, tmp_path, cli_here
):
    from peft import PeftModel
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import GPTNeoXForCausalLM

    from neoxray.platform.train.driver import run_train

    runs = {}
    base_uri = s3.upload_dir(hf_base, s3.bucket("lora") + "/base")  # the same base, on object storage
    for layout in LAYOUTS:
        run_dir = tmp_path / "lora-{}{}{}".format(*layout)
        if layout == (1, 1, 1):  # one worker: `neoxray train --no-ray`, one process as a user runs it, its base
            # read from the bucket through the model cache: the same losses as the other layout's local base
            opts = [f"data.path={instructions}", f"name={run_dir.name}", f"model.init_from={base_uri}", *LORA]
            opts += ["parallel.data=1", "parallel.tensor=1", "parallel.pipeline=1"]
            run_cli("train", "--no-ray", "--run-dir", str(run_dir), *BASE, *opts)
        else:
            run_train(lora_cfg(instructions, hf_base, run_dir.name, layout), run_dir=str(run_dir))
        runs[layout] = run_dir
    ref = losses(runs[(1, 1, 1)])
    assert sorted(ref) == list(range(1, STEPS + 1))
    for run_dir in runs.values():  # the mean is over the global batch's trained labels, not per micro-batch
        assert_same(losses(run_dir), ref, range(1, STEPS + 1))
        assert_same(losses(run_dir, "val_loss"), losses(runs[(1, 1, 1)], "val_loss"), [STEPS])

    base = GPTNeoXForCausalLM.from_pretrained(hf_base).eval()
    # B starts at zero: step 1 is the base model's loss on the first global batch, with the prompt labels at -100
    first = global_batch(instructions, 1)
    assert 0 < int(first["loss_mask"].sum()) < first["loss_mask"].numel()  # prompts masked, completions not
    assert abs(ref[1] - masked_mean_loss(base, first)) < 1e-4 * ref[1]
    assert abs(ref[1] - mean_loss(base, first)) > 1e-3  # the unmasked loss is another figure

    # checkpoints: adapters and their Adam moments only, megabytes not the base's size, the base's identity
    ckpt = runs[(2, 2, 2)] / "checkpoint-step-0000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["alpha"] == 8
    assert meta["base"]["path"] == str(hf_base.resolve()) and len(meta["base"]["sha256"]) == 64
    uri_meta = json.loads((runs[(1, 1, 1)] / "checkpoint-step-0000003" / "meta.json").read_text())
    assert uri_meta["base"] == {**meta["base"], "path": base_uri}  # the URI it was named by; the same files
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
    cli_here("export", "--checkpoint", ckpt, "--out", peft_dir)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    peft_model = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(hf_base), peft_dir).eval()
    from peft.utils import get_peft_model_state_dict

    assert len(get_peft_model_state_dict(peft_model)) == 2 * 4 * 2
    step4 = global_batch(instructions, 4)
    assert abs(masked_mean_loss(peft_model, step4) - ref[4]) < 1e-4 * ref[4]
    assert abs(masked_mean_loss(base, step4) - ref[4]) > 1e-3  # the adapter changed the model
    # `neoxray score --lora` of the exported adapter, and of the LoRA run's checkpoint itself, equal peft's
    text = "def main(args):\n    return args"
    ids = RawTokenizer.from_file(str(hf_base / "tokenizer.json")).encode(text).ids
    with torch.no_grad():
        lp = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), -1)
    want = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    adapter_uri = s3.upload_dir(peft_dir, "s3://lora/adapter")  # base and adapter read from the bucket
    for model_args in (["--model", base_uri, "--lora", adapter_uri], ["--model", str(ckpt)]):
        got = json.loads(cli_here("score", *model_args, "--text", text, "--json"))
        assert got["tokens"] == ids and got["logprobs"][1:] == pytest.approx(want, abs=1e-4), model_args

    # --merge: a full Hugging Face model equal to peft's merge_and_unload
    merged_dir = tmp_path / "merged"
    cli_here("export", "--checkpoint", ckpt, "--out", merged_dir, "--merge")
    merged = GPTNeoXForCausalLM.from_pretrained(merged_dir).eval()
    folded = peft_model.merge_and_unload().eval()
    ids = step4["input_ids"]
    with torch.no_grad():
        assert (merged(ids).logits - folded(ids).logits).abs().max().item() < 1e-4

    # re-layout resume: the (2,2,2) checkpoint at step 3, copied into a bucket and named by its run's URI (the
    # newest complete checkpoint there), continues under (1,2,1) with the same losses. Its workers start and
    # train beside a CPU hog (a busy process that takes one of this machine's two cores from Ray's niced
    # workers), as on a user's busy node: Ray Train's health checks must let its starved workers be
    # (`driver.RAY_TRAIN_TOLERANCE`)
    relayout, ckpt_run = tmp_path / "relayout", s3.upload_dir(ckpt, f"s3://lora/run/{ckpt.name}").rsplit("/", 1)[0]
    with cpu_hog():
        run_train(
            lora_cfg(instructions, hf_base, "relayout", (1, 2, 1), [f"checkpoint.load_from={ckpt_run}"]),
            run_dir=str(relayout),
        )
    assert sorted(losses(relayout)) == [4, 5]
    assert_same(losses(relayout), ref, [4, 5])
    check_resume(instructions, hf_base, tmp_path, runs[(1, 1, 1)])


def check_resume(instructions, hf_base, tmp_path, part):
    """A LoRA run whose last checkpoint is gone (removed by hand) resumes from step 3 bit-identically; another
    adapter shape, no LoRA, or a base whose files changed is refused before anything runs."""
    import shutil

    from neoxray.errors import NeoxrayError
    from neoxray.platform.train.driver import run_train

    full = losses(part)
    shutil.rmtree(part / "checkpoint-step-0000005")
    opts = [f"data.path={instructions}", f"name={part.name}", f"model.init_from={hf_base}", *LORA]
    run_cli("train", "--no-ray", "--run-dir", str(part), *BASE, *opts)  # one process, as the run was trained
    got = losses(part)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == full[s] for s in got), (got, full)  # bit-identical resume

    # another adapter shape, no LoRA at all, or a base whose files changed: refused before anything runs
    with pytest.raises(NeoxrayError, match=r"lora.rank 4 vs 8"):
        run_train(lora_cfg(instructions, hf_base, part.name, extra=["lora.rank=8", "train.steps=6"]), run_dir=str(part))
    with pytest.raises(NeoxrayError, match="is a LoRA checkpoint"):
        run_train(cfg_for(instructions, part.name, extra=["train.steps=6"]), run_dir=str(part))
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
            lora_cfg(instructions, changed, "other", extra=[f"checkpoint.load_from={ckpt}"]),
            run_dir=str(tmp_path / "o"),
        )
