"""The CLI as a user runs it: `generate`, `score`, `model init`, `tokenizer train`, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from neoxray.model.generate import score
from neoxray.model.hf import load_model_and_tokenizer
from tests.conftest import ROOT, SHARED_TOKENIZER, run_cli, run_here

pytestmark = pytest.mark.e2e  # every test runs the CLI in a real process


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def in_process(*args):
    """`neoxray ARGS` run by the CLI's own `main` in this process -> (returncode, stderr) as a process has them:
    the same code path that turns a NeoxrayError into one line, without an interpreter start per refusal."""
    import contextlib
    import io
    import types

    from neoxray.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def test_generate_json_greedy_matches_transformers(tiny_model_dir):
    prompt = "The Python language"
    out = json.loads(
        run_cli(
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "16",
            "--greedy",
            "--json",
        ).stdout
    )
    assert set(out) >= {"text", "token_ids"}
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    ids = tok.encode(prompt)
    ref = GPTNeoXForCausalLM.from_pretrained(tiny_model_dir).eval()
    expect = ref.generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=tok.eod_id, pad_token_id=tok.eod_id
    )[0, len(ids) :].tolist()
    assert out["token_ids"] == expect
    assert out["text"] == tok.decode([t for t in expect if t != tok.eod_id])
    plain = run_here(  # the same command, in this process
        "generate", "--model", str(tiny_model_dir), "--prompt", prompt, "--max-new-tokens", "16", "--greedy"
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith(prompt)


def test_generate_sampling_with_seed_is_reproducible(tiny_model_dir):
    args = (
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.2",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--json",
    )
    again = run_here(*args)  # a second run, in this process: the seed alone decides
    assert again.returncode == 0 and json.loads(run_cli(*args).stdout) == json.loads(again.stdout)


def test_score_json(tiny_model_dir):
    text = "A short sentence to score."
    out = json.loads(run_cli("score", "--model", str(tiny_model_dir), "--text", text, "--json").stdout)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    assert out["tokens"] == tok.encode(text)
    assert out["logprobs"][0] is None
    ref = score(model, out["tokens"])
    assert all(abs(a - b) < 1e-5 for a, b in zip(out["logprobs"][1:], ref[1:]))


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    assert_clean_error(
        run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x", check=False), "not found", "missing"
    )
    # the first refusal above in a fresh process, as a user meets it; the others through the same `main` here
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_clean_error(in_process("generate", "--model", other, "--prompt", "x"), "not a GPT-NeoX")
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert_clean_error(in_process("score", "--model", notok, "--text", "x"), "tokenizer")
    long_prompt = "word " * 200  # the tiny model's context is 64 tokens
    assert_clean_error(in_process("generate", "--model", tiny_model_dir, "--prompt", long_prompt), "context")
    assert_clean_error(in_process("score", "--model", tiny_model_dir, "--text", long_prompt), "context")


def test_tokenizer_train_then_model_init_then_generate(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [
        {
            "text": f"Document {i}: the rotary embedding rotates queries and keys by position {i}.",
            "meta": {"pile_set_name": "Test"},
        }
        for i in range(300)
    ]
    corpus.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    run_cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--output", str(tmp_path / "tok"))
    run_cli("model", "init", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "m"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForCausalLM"] and cfg["eos_token_id"] == 0
    out = json.loads(
        run_here(  # generate as a user runs it: the tests above; here on the new model, in this process
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--prompt",
            "Document",
            "--max-new-tokens",
            "5",
            "--seed",
            "0",
            "--json",
        ).stdout
    )
    assert 1 <= len(out["token_ids"]) <= 5
    assert_clean_error(
        in_process(
            "tokenizer", "train", "--input", tmp_path / "nope.jsonl", "--vocab-size", "300", "--output", tmp_path / "t2"
        ),
        "nope.jsonl",
    )


@pytest.mark.skipif(not SHARED_TOKENIZER.exists(), reason=f"{SHARED_TOKENIZER} not present")
def test_model_init_with_the_gpt_neox_20b_tokenizer(tmp_path):
    run_cli(
        "model", "init", "--preset", "tiny-neox", "--tokenizer", str(SHARED_TOKENIZER), "--out", str(tmp_path / "m")
    )
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["vocab_size"] == 50304
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "m")("Hello, my dog is cute")["input_ids"] == [
        12092,
        13,
        619,
        4370,
        310,
        20295,
    ]


def test_lora_flags_errors_are_one_line(tmp_path, tiny_model_dir):
    """--lora on generate/score and serve, and export --merge of a full checkpoint: one line naming the input."""
    missing = str(tmp_path / "no-adapter")
    assert_clean_error(
        run_cli("generate", "--model", str(tiny_model_dir), "--lora", missing, "--prompt", "x", check=False),
        "no-adapter",
    )
    # the first refusal above in a fresh process; serve's through the same `main` here
    assert_clean_error(run_here("serve", "--model", tiny_model_dir, "--lora", "just-a-dir", "--no-ray"), "NAME=DIR")
    assert_clean_error(run_here("serve", "--model", tiny_model_dir, "--lora", f"a={missing}", "--no-ray"), "no-adapter")


def test_train_overrides_after_an_option_reach_the_config(tmp_path):
    """`... --run-dir D KEY=VALUE`: the override after the option is read as one (here an unknown key, refused
    by the config loader in one line naming it), not refused by argparse as an unrecognized argument."""
    proc = run_here(  # the CLI's own argv parsing and refusal, in this process
        "train",
        "--config",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        "data.path=" + str(tmp_path / "data"),
        "--run-dir",
        str(tmp_path / "run"),
        "train.stepz=6",
    )
    assert_clean_error(proc, "train.stepz", "train.steps")
    assert not (tmp_path / "run").exists()


def test_report_names_the_run_directory_as_given(tmp_path):
    """`neoxray report runs/r` from a project folder: the page says `runs/r`, not this machine's absolute path (the
    docs' report.png is such a page)."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    steps = [{"step": s, "loss": 9.0 - s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    exe = Path(sys.executable).with_name("neoxray")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "neoxray.cli"]
    proc = subprocess.run([*cmd, "report", "runs/r"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = (run / "report.html").read_text()
    assert "<td><b>run directory</b></td><td>runs/r</td>" in page
    assert str(tmp_path) not in page
