"""What a checkpoint vouches for, and what a run does with the checkpoints it finds, in real `neoxray` processes:
a checkpoint is kept only once its weights have given a finite loss (rotation never deletes the newest such
one; export and serving refuse weights whose forward is not finite), every file a command reads is checked
against meta.json, and a run directory whose checkpoints cannot be resumed is refused, touching nothing, unless
`--start-over` says otherwise. Each test failed on the code before its fix (docs/reliability.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.platform.train.conftest import (
    cfg_for,
    copy_of,
    flip_a_byte,
    losses,
    one_error_line,
    plan_here,
    records,
    train,
    tree,
)

pytestmark = pytest.mark.e2e  # training runs in real processes (the prepared data needs the session's cluster)


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("checkpoint-step-*"))


def test_a_diverged_update_is_never_kept_and_the_last_good_checkpoint_survives_rotation(
    prepared, base_run, tmp_path, cli_here
):
    """Continue a good run with lr 1e6 (constant) and keep=1: step 5's loss is finite (the good weights), its
    update makes the weights huge. Before: the step-5 checkpoint was written, rotation deleted step 4, the run
    exited 0 and export accepted weights whose every logit is NaN."""
    from neoxray.errors import NeoxrayError
    from neoxray.platform.inference.engine import InferenceEngine

    run = copy_of(base_run, tmp_path)
    extra = ["optimizer.lr=1e6", "optimizer.min_lr=0", "schedule.style=constant", "schedule.warmup_steps=0"]
    proc = train(prepared, run, "train.steps=5", "checkpoint.keep=1", *extra, check=False)
    one_error_line(proc, "step 5", "non-finite", "diverged-checkpoint-step-0000005", "checkpoint-step-0000004")
    assert checkpoints(run)[-1] == "checkpoint-step-0000004"  # the last good one: nothing newer was kept
    diverged = run / "diverged-checkpoint-step-0000005"
    assert (diverged / "meta.json").exists()  # set aside, not deleted

    # export, and the loading of generate, score, eval and serving, refuse the diverged weights, naming the probe
    proc = run_cli("export", "--checkpoint", str(diverged), "--out", str(tmp_path / "hf"), check=False)
    one_error_line(proc, "probe batch", "non-finite")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(NeoxrayError, match="probe batch"):
        InferenceEngine.from_path(diverged, device="cpu")  # `load_for_inference`, which every command uses

    # the run directory is its last good checkpoint: it exports, and the run resumes from it
    cli_here("export", "--checkpoint", str(run), "--out", str(tmp_path / "good"))
    train(prepared, run, "train.steps=6")
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"][-1] == 4
    assert checkpoints(run)[-2:] == ["checkpoint-step-0000004", "checkpoint-step-0000006"]


def swap_two_token_ids(tokenizer_json: Path) -> tuple[str, str]:
    """Swap the ids of two vocabulary entries whose ids have as many digits (the file keeps its size; only its
    checksum tells): the tokenizer then reads one word as the other."""
    text = tokenizer_json.read_text(encoding="utf-8")
    vocab_at = text.index('"vocab":')
    pairs = list(re.finditer(r'"(\u0120[a-z]{3})":(\d{3}),', text[vocab_at:]))
    a, b = pairs[0], pairs[1]
    start = vocab_at
    swapped = (
        text[: start + a.start(2)]
        + b.group(2)
        + text[start + a.end(2) : start + b.start(2)]
        + a.group(2)
        + text[start + b.end(2) :]
    )
    assert len(swapped) == len(text) and swapped != text
    tokenizer_json.write_text(swapped, encoding="utf-8")
    return a.group(1), b.group(1)


def test_every_read_path_checks_the_files_it_uses_against_meta_json(prepared, base_run, tmp_path):
    """Before: only a resume checked the checksums; export, score, generate and serving read a tampered
    tokenizer.json silently, and a LoRA run found a damaged base only inside its workers."""
    from neoxray.errors import NeoxrayError
    from neoxray.platform.inference.engine import InferenceEngine
    from neoxray.platform.train.preflight import plan_run

    ckpt = copy_of(base_run, tmp_path) / "checkpoint-step-0000004"
    swap_two_token_ids(ckpt / "tokenizer.json")
    # a fresh process shows the refusal as a user sees it; generate, score, eval and serving load through the
    # same `load_for_inference` as the engine below
    args = ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]
    one_error_line(run_cli(*args, check=False), "tokenizer.json", "checksum")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(NeoxrayError, match="tokenizer.json"):
        InferenceEngine.from_path(ckpt, device="cpu")

    # a LoRA run's base checkpoint, and a checkpoint to continue from, are checked before the run starts
    lora = ["train.steps=1", "lora.rank=4", f"model.init_from={ckpt}"]
    one_error_line(train(prepared, tmp_path / "lora", *lora, check=False), "model.init_from", "tokenizer.json")
    base = copy_of(base_run, tmp_path / "b") / "checkpoint-step-0000004"
    shard = next(base.glob("shard-*.safetensors"))
    flip_a_byte(shard)
    for key, extra in (
        ("model.init_from", ["train.steps=1", "lora.rank=4", f"model.init_from={base}"]),
        ("checkpoint.load_from", ["train.steps=5", f"checkpoint.load_from={base}"]),
    ):  # the driver's plan (the same on Ray and without), in this process
        run = tmp_path / key.split(".")[0]
        with pytest.raises(NeoxrayError, match=rf"{key}.*{shard.name}|{shard.name}.*{key}") as e:
            plan_run(cfg_for(prepared, run.name, extra=extra), str(run), lambda line: None)
        assert "\n" not in str(e.value) and not run.exists()
    assert not (tmp_path / "lora").exists()


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_touching_nothing_unless_told_to_start_over(
    prepared, base_run, tmp_path
):
    """Before: each was set aside with 'resuming from an older one' (there was none), the run trained from
    step 0, exited 0 and rewrote metrics.jsonl."""
    run = copy_of(base_run, tmp_path)
    for ckpt in run.glob("checkpoint-step-*"):
        flip_a_byte(next(ckpt.glob("shard-*.safetensors")))
    before = tree(run)
    proc = train(prepared, run, "train.steps=6", check=False)
    one_error_line(proc, "checkpoint-step-0000002", "checkpoint-step-0000004", "damaged", "--start-over")
    assert tree(run) == before

    train(prepared, run, "train.steps=3", "--start-over")  # as told: the damaged ones and old metrics set aside
    assert sorted(p.name for p in run.glob("damaged-checkpoint-step-*")) == [
        "damaged-checkpoint-step-0000002",
        "damaged-checkpoint-step-0000004",
    ]
    assert sorted(losses(run)) == [1, 2, 3] and checkpoints(run) == [
        "checkpoint-step-0000002",
        "checkpoint-step-0000003",
    ]
    assert not any(r.get("event") == "resumed" for r in records(run))
    assert [p.name for p in run.glob("*metrics*.jsonl") if p.name != "metrics.jsonl"], "the old metrics were lost"


def test_a_run_whose_meta_files_are_gone_is_refused_touching_nothing(prepared, base_run, tmp_path):
    """Before: with every meta.json deleted the run started from step 0 silently and overwrote the old
    checkpoint folders (whose shards were intact)."""
    run = copy_of(base_run, tmp_path)
    for meta in run.glob("checkpoint-step-*/meta.json"):
        meta.unlink()
    before = tree(run)
    # the driver's plan, in this process (the all-damaged refusal above shows the same path in a fresh process)
    line = plan_here(prepared, run, "train.steps=6")
    for needle in ("checkpoint-step-0000002", "checkpoint-step-0000004", "no meta.json", "--start-over"):
        assert needle in line, line
    assert tree(run) == before


def test_an_incomplete_checkpoint_is_named_and_kept_when_the_run_resumes_from_an_older_one(
    prepared, base_run, tmp_path
):
    """Before: a checkpoint folder without meta.json was skipped in silence (and overwritten later)."""
    run = copy_of(base_run, tmp_path)
    (run / "checkpoint-step-0000004" / "meta.json").unlink()
    shards = tree(run / "checkpoint-step-0000004")
    proc = train(prepared, run, "train.steps=5")
    assert "checkpoint-step-0000004 has no meta.json" in proc.stderr, proc.stderr[-2000:]
    assert "incomplete-checkpoint-step-0000004" in proc.stderr
    assert tree(run / "incomplete-checkpoint-step-0000004") == shards  # kept as it was
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [2]
    assert json.loads((run / "checkpoint-step-0000004" / "meta.json").read_text())["step"] == 4  # redone
