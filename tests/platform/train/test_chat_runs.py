"""A run on conversation data describes its chat template: a LoRA run on the bundled conversations (prepared with
neoxray's default template) records the template in its checkpoints (meta.json and tokenizer_config.json), and
`neoxray export` writes it into the peft adapter's and the merged model's tokenizer_config.json, where
transformers' `apply_chat_template` renders the ids neoxray's `load_chat_template` does and the training rows
hold; `--chat-template` replaces it. A full run on plain text records and exports none, and a blend of datasets
prepared with different templates is refused before anything starts. Trained in this process (`--no-ray`; the
command has been run in a fresh process by the other training tests), its data prepared in this process too."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from neoxray.model.chat_template import DEFAULT_TEMPLATE, load_chat_template
from neoxray.model.tokenizer import Tokenizer
from tests.conftest import ROOT
from tests.support.prepare_here import prepare_here

pytestmark = pytest.mark.e2e  # trains through the CLI

CONVERSATIONS = ROOT / "neoxray" / "pipelines" / "sample" / "conversations.jsonl"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
RUN = [
    "train.seq_len=32",
    "train.global_batch=4",
    "train.micro_batch=2",
    "train.steps=1",
    "schedule.warmup_steps=1",
    "schedule.decay_steps=1",
    "eval.every=0",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, sample_tokenizer_dir):
    """The bundled conversations rendered with neoxray's default template, in rows of 33 tokens."""
    out = tmp_path_factory.mktemp("chat") / "conversations-32"
    prepare_here([CONVERSATIONS], sample_tokenizer_dir, 32, out, content="chat", val_fraction=0.0)
    return out


@pytest.fixture(scope="module")
def chat_run(chat_data, tiny_model_dir, tmp_path_factory):
    """One LoRA step on the conversations, on the tiny model, in this process."""
    from neoxray.cli import main

    run = tmp_path_factory.mktemp("chat-run") / "run"
    args = ["--run-dir", run, f"data.path={chat_data}", f"model.init_from={tiny_model_dir}", "lora.rank=4", *RUN]
    assert cli(main, "train", "--no-ray", *args)[0] == 0
    return run


def cli(main, *args) -> tuple[int, str]:
    """`neoxray ARGS` in this process -> (exit status, stderr); the environment restored after it."""
    saved, err = dict(os.environ), io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            return main([str(a) for a in args]), err.getvalue()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def transformers_ids(model_dir, messages, add_generation_prompt=True) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def neoxray_ids(model_dir, messages, add_generation_prompt=True) -> list[int]:
    template = load_chat_template(model_dir)
    assert template is not None, model_dir
    return template.encode(Tokenizer.load(model_dir), messages, add_generation_prompt)


def test_a_chat_run_records_its_template_and_export_writes_it(chat_run, chat_data, cli_here, tmp_path):
    ckpt = sorted(chat_run.glob("checkpoint-step-*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    manifest = json.loads((chat_data / "manifest.json").read_text())
    assert meta["chat_template"] == manifest["chat_template"] and meta["chat_template"]["text"] == DEFAULT_TEMPLATE
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_TEMPLATE

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert "chat template (neoxray default)" in cli_here("export", "--checkpoint", chat_run, "--out", adapter)
    cli_here("export", "--checkpoint", chat_run, "--out", merged, "--merge")
    assert (adapter / "adapter_config.json").is_file() and (merged / "config.json").is_file()
    first = next(m for m in (json.loads(line)["messages"] for line in CONVERSATIONS.read_text().splitlines()))
    row = pq.read_table(sorted((chat_data / "train").glob("*.parquet"))[0]).column("input_ids")[0].as_py()
    for out in (adapter, merged):
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_TEMPLATE
        ids = transformers_ids(out, MESSAGES)
        assert ids == neoxray_ids(out, MESSAGES) and len(ids) > 20
        assert Tokenizer.load(out).decode(ids).endswith("<|endoftext|>User: And 3 + 3?<|endoftext|>Assistant:")
        # what transformers renders from the exported template is what the run trained on
        whole = transformers_ids(out, first, add_generation_prompt=False)
        assert row == whole[: len(row)] or whole == row[: len(whole)]

    # an explicit template replaces the recorded one
    cli_here("export", "--checkpoint", chat_run, "--out", adapter, "--chat-template", CHATML)
    assert json.loads((adapter / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert transformers_ids(adapter, MESSAGES) == neoxray_ids(adapter, MESSAGES)
    assert Tokenizer.load(adapter).decode(neoxray_ids(adapter, MESSAGES)).endswith("<|im_start|>assistant\n")


def test_a_run_on_plain_text_records_and_exports_no_template(sample_tokenizer_dir, cli_here, tmp_path):
    from neoxray.cli import main

    data, run, text = tmp_path / "text-32", tmp_path / "run", tmp_path / "text.jsonl"
    conversations = [json.loads(line)["messages"] for line in CONVERSATIONS.read_text().splitlines()]
    text.write_text("".join(json.dumps({"text": "\n".join(map(json.dumps, c))}) + "\n" for c in conversations))
    prepare_here([text], sample_tokenizer_dir, 32, data, val_fraction=0.0)
    model = ["model.preset=tiny", "model.overrides.vocab_size=1024", "model.overrides.max_seq_len=32"]
    assert cli(main, "train", "--no-ray", "--run-dir", run, f"data.path={data}", *model, *RUN)[0] == 0
    ckpt = sorted(run.glob("checkpoint-step-*"))[-1]
    assert "chat_template" not in json.loads((ckpt / "meta.json").read_text())
    assert "chat_template" not in json.loads((ckpt / "tokenizer_config.json").read_text())
    out = tmp_path / "hf"
    assert "chat template" not in cli_here("export", "--checkpoint", ckpt, "--out", out)
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert load_chat_template(out) is None


def test_a_blend_of_datasets_with_different_templates_is_refused(chat_data, tiny_model_dir, tmp_path):
    from neoxray.cli import main

    other = tmp_path / "chatml-32"
    shutil.copytree(chat_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["chat_template"].update(source="chatml.jinja", text=CHATML, sha256="0" * 64)
    (other / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    args = ["--run-dir", run, f"data.path=[{chat_data}, {other}]", f"model.init_from={tiny_model_dir}", *RUN]
    code, err = cli(main, "train", "--no-ray", *args)
    lines = [line for line in err.splitlines() if line.startswith("neoxray: error:")]
    assert code == 1 and len(lines) == 1, err[-2000:]
    assert "different chat templates" in lines[0] and str(chat_data) in lines[0] and str(other) in lines[0]
    assert not run.exists()
