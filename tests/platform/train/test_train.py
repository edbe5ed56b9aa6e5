"""Training on a real local Ray cluster: each (dp, tp, pp) layout computes the same training as one process
(here all three axes at once; the others where conftest.LAYOUTS says), checkpoints resume
exactly (same run, another layout, after a worker is SIGKILLed), fine-tuning from a
Hugging Face directory starts at transformers' loss, and export merges the shards into a transformers model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.platform.train.conftest import BASE, LAYOUTS, STEPS, assert_same, cfg_for, losses

pytestmark = pytest.mark.e2e  # real Ray Train runs


def test_layouts_train_the_same_model_as_one_process(prepared, reference, ray_local, tmp_path, cli_here):
    from neoxray.platform.train.driver import run_train

    ref = losses(reference)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1], "the tiny model should learn something in 5 steps"
    for layout in LAYOUTS:
        run_dir = tmp_path / "run-{}{}{}".format(*layout)
        run_train(cfg_for(prepared, run_dir.name, layout, ["checkpoint.every=3"]), run_dir=str(run_dir))
        got = losses(run_dir)
        assert sorted(got) == list(range(1, STEPS + 1)), layout
        assert_same(got, ref, range(1, STEPS + 1))
        assert_same(losses(run_dir, "val_loss"), losses(reference, "val_loss"), [STEPS])  # held-out loss too
        ckpts = sorted(p.name for p in run_dir.glob("checkpoint-step-*"))
        assert ckpts == ["checkpoint-step-0000003", "checkpoint-step-0000005"], ckpts
    # metrics: jsonl fields, TensorBoard events
    rec = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu"):
        assert key in rec
    assert list((run_dir / "tensorboard").glob("events.out.tfevents*"))
    meta = json.loads((run_dir / "checkpoint-step-0000005" / "meta.json").read_text())
    assert meta["layout"] == {"dp": 2, "tp": 2, "pp": 2} and meta["consumed_samples"] == 8 * STEPS
    assert len(meta["shards"]) == 4 and (run_dir / "checkpoint-step-0000005" / "tokenizer.json").exists()

    # a (2,2,2) checkpoint continues in one process (`--no-ray`: its shards merged): the same loss curve (a
    # re-layout on Ray Train: tests/platform/train/test_object_storage.py and test_lora_training.py)
    relayout = tmp_path / "relayout"
    ckpt3 = tmp_path / "run-222" / "checkpoint-step-0000003"
    run_cli("train", "--no-ray", "--run-dir", relayout, *BASE, f"data.path={prepared}", f"checkpoint.load_from={ckpt3}")
    got = losses(relayout)
    assert sorted(got) == [4, 5]
    assert_same(got, ref, [4, 5])

    # export merges the (2,2,2) shards; transformers loads it; its logits equal the single-process model's
    from transformers import GPTNeoXForCausalLM

    cli_here("export", "--checkpoint", str(run_dir / "checkpoint-step-0000005"), "--out", str(tmp_path / "hf222"))
    cli_here("export", "--checkpoint", str(reference), "--out", str(tmp_path / "hf111"))
    a = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf222").eval()
    b = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf111").eval()
    ids = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() < 1e-4
    # every command resolves --model the same way: the run directory (its newest checkpoint) is the export
    gen = ("generate", "--prompt", "def", "--max-new-tokens", "4", "--greedy", "--json")
    out = json.loads(cli_here(*gen, "--model", str(tmp_path / "hf222")))  # (generate's own process: test_cli.py)
    assert len(out["token_ids"]) >= 1
    assert json.loads(cli_here(*gen, "--model", run_dir)) == out
    score = ("score", "--text", "def main(", "--json")
    assert json.loads(cli_here(*score, "--model", run_dir))["logprobs"] == pytest.approx(
        json.loads(cli_here(*score, "--model", tmp_path / "hf222"))["logprobs"], abs=1e-5
    )

    # serving takes the run directory as it is (its newest checkpoint): the same model as the export
    from neoxray.model.decoding import SamplingParams
    from neoxray.platform.inference.engine import InferenceEngine
    from neoxray.platform.inference.request import Request

    def greedy(engine):
        req = Request([5, 6, 7], max_tokens=8, sampling=SamplingParams(greedy=True, stop_at_eod=False))
        return engine.run_until_done([req])[0].token_ids

    from_run = InferenceEngine.from_path(run_dir, device="cpu")
    assert from_run.model_name == "run-222/checkpoint-step-0000005"
    assert greedy(from_run) == greedy(InferenceEngine.from_path(tmp_path / "hf222", device="cpu"))


HOLD_AT = 4


def _held_train_loop(payload: dict) -> None:
    """The workers' loop, held after step HOLD_AT until the test has killed one of them (a marker file beside
    the run directory), so the kill lands mid-run on any machine. Imported by the workers from this module."""
    from neoxray.platform.train.ray_worker import RayReporter
    from neoxray.platform.train.run_plan import RunPlan
    from neoxray.platform.train.worker import run_worker

    marker = Path(payload["run_dir"]).parent / "worker-killed"

    class Held(RayReporter):
        def report(self, metrics):
            super().report(metrics)
            while metrics["step"] == HOLD_AT and not marker.exists():
                time.sleep(0.05)

    plan = RunPlan.from_payload(payload)
    run_worker(plan, Held(plan.cfg.logging.every, plan.cfg.train.steps))


def _kill_one_worker_when_held(run_dir: Path, killed: list, timeout=600):
    """Once step HOLD_AT is logged and the checkpoint before it is on disk, SIGKILL one Ray Train worker of this
    test's cluster, then release the others (they are held until then)."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid  # this test's cluster
    deadline = time.monotonic() + timeout  # a guard: the workers wait for us
    while time.monotonic() < deadline:
        logged = losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
        if max(logged, default=0) >= HOLD_AT and (run_dir / "checkpoint-step-0000003" / "meta.json").exists():
            workers = [
                p for p in psutil.Process(raylet).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())
            ]
            if workers:
                victim = sorted(workers, key=lambda p: p.pid)[-1]
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                (run_dir.parent / "worker-killed").touch()
                return
        time.sleep(0.2)


def test_worker_sigkill_is_survived_and_the_group_resumes_exactly(
    prepared, reference, ray_local, tmp_path, monkeypatch
):
    from neoxray.platform.train import ray_worker
    from neoxray.platform.train.driver import run_train

    # killed after step 4, resumed from step 3; the same config as `reference` (restarting a finished run on Ray:
    # test_cluster.py)
    extra = ["checkpoint.every=3"]
    ref = losses(reference)

    run_dir = tmp_path / "faulty"
    killed: list = []
    watcher = threading.Thread(target=_kill_one_worker_when_held, args=(run_dir, killed), daemon=True)
    watcher.start()
    with monkeypatch.context() as m:
        m.setattr(ray_worker, "ray_train_loop", _held_train_loop)
        run_train(cfg_for(prepared, "faulty", (2, 1, 1), extra), run_dir=str(run_dir), max_failures=2)
    watcher.join()
    assert killed, "no worker was killed"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" for r in records), "the group did not restart from a checkpoint"
    got = losses(run_dir)
    assert max(got) == STEPS
    assert_same(got, ref, range(1, STEPS + 1))


def test_finetune_from_hf_starts_at_transformers_loss(prepared, tmp_path):
    """model.init_from a Hugging Face directory (`neoxray train --no-ray`, one process): step-1 loss (before any
    update) equals transformers' loss on the same global batch. Tensor-parallel ranks reading only their slices
    of such a base, on Ray Train beside a CPU hog: tests/platform/train/test_lora_training.py."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neoxray.model.config import get_preset
    from neoxray.model.hf import config_to_hf
    from neoxray.pipelines.reader import iter_batches, open_blend

    cfg = get_preset("tiny", vocab_size=1024, max_seq_len=64)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "neoxray"}))
    hf.save_pretrained(tmp_path / "hf")
    run_dir = tmp_path / "ft"
    init = f"model.init_from={tmp_path / 'hf'}"
    run_cli("train", "--no-ray", "--run-dir", run_dir, *BASE, f"data.path={prepared}", "name=ft", init, "train.steps=1")
    batch = next(iter_batches(open_blend([str(prepared)], seed=11), 8, seed=11))
    with torch.no_grad():
        logits = hf.eval()(batch["input_ids"]).logits
        expect = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()
    assert abs(losses(run_dir)[1] - expect) < 1e-4 * expect
