"""Conversation data: `neoxray prepare --format chat` (messages -> the chat template's rendering, with a loss mask on
the assistant turns only). The per-row stages run in-process here (the reader, the tokenizer actor's class, the
packer, the manifest), with expectations written from the messages themselves and decoded with raw `tokenizers`;
one run of the CLI on the session's Ray cluster prepares the bundled sample through the real pipeline."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tokenizers

from neoxray.errors import NeoxrayError
from neoxray.model.chat_template import DEFAULT_TEMPLATE
from neoxray.pipelines.chat import CHAT_BAD_ROW_REASONS, iter_chats
from neoxray.pipelines.dataset_format import MANIFEST
from neoxray.pipelines.packing import pack_file
from neoxray.pipelines.prepare import PrepareJob
from neoxray.pipelines.tokenizing import Tokenize, read_chunks
from tests.conftest import ROOT
from tests.pipelines.conftest import is_validation, read_masked_rows

CONVERSATIONS = ROOT / "neoxray" / "pipelines" / "sample" / "conversations.jsonl"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOD_TEXT = "<|endoftext|>"


def chat_line(*turns, name="Test", **extra) -> str:
    """A row of (role, content) turns."""
    messages = [{"role": r, "content": c} for r, c in turns]
    return json.dumps({"messages": messages, "meta": {"pile_set_name": name}, **extra}) + "\n"


CONVERSATION = (
    ("system", "Be brief."),
    ("user", "What is 2 + 2?"),
    ("assistant", "2 + 2 = 4."),
    ("user", "And 3 + 3?"),
    ("assistant", "That is 6."),
)
BAD_CHAT_LINES = {
    "invalid_json": '{"messages": [\n',
    "not_an_object": json.dumps([{"role": "user", "content": "hi"}]) + "\n",
    "missing_messages": json.dumps({"prompt": "Q:", "completion": " A"}) + "\n",
    "messages_not_a_list": json.dumps({"messages": "user: hi"}) + "\n",
    "empty_conversation": json.dumps({"messages": []}) + "\n",
    "invalid_message": json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}) + "\n",
    "unknown_role": chat_line(("user", "hi"), ("wizard", "abracadabra"), ("assistant", "ok")),
    "invalid_content": json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]})
    + "\n",
    "no_assistant_turn": chat_line(("system", "Be brief."), ("user", "Is anyone there?")),
    "invalid_utf8": '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}\n',
}
# the template raises on conversations of more than three messages; one that writes nothing for the assistant
RAISING = "{% if messages | length > 3 %}{{ raise_exception('too long for this template') }}{% endif %}" + CHATML
SILENT = (
    "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def raw(tok_file) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(tok_file)


def split_of(messages, val_fraction: float) -> str:
    """The split by the hash of the messages' canonical JSON, computed here without neoxray's code."""
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "validation" if is_validation(canonical, val_fraction) else "train"


def text_of(content) -> str:
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def default_rendering(messages) -> tuple[str, list[str]]:
    """(the conversation's text, its assistant turns' texts) under neoxray's documented default template."""
    text = "".join(f"{m['role'].capitalize()}: {text_of(m['content']).strip()}{EOD_TEXT}" for m in messages)
    return text, [f" {text_of(m['content']).strip()}{EOD_TEXT}" for m in messages if m["role"] == "assistant"]


def chatml_rendering(messages) -> tuple[str, list[str]]:
    text = "".join(f"<|im_start|>{m['role']}\n{text_of(m['content'])}<|im_end|>\n" for m in messages) + EOD_TEXT
    return text, [f"{text_of(m['content'])}<|im_end|>" for m in messages if m["role"] == "assistant"]


def prepare_here(tmp_path: Path, inputs, tok_file, seq_len=16, val_fraction=0.0, **options):
    """`neoxray prepare --format chat` without Ray: the job's checks and template resolution, then its stages
    (the reader, the tokenizer actor's class, the packer) and its manifest, each called in this process."""
    out = str(tmp_path / "out")
    job = PrepareJob([str(p) for p in inputs], tok_file, seq_len, out, val_fraction, content="chat", **options)
    tmp = tmp_path / "tmp"
    for sub in ("chunks", "train", "validation"):
        (tmp / sub).mkdir(parents=True)
    saved = dict(os.environ)  # the actor's class sets the tokenizer's thread count for its process
    tokenize = Tokenize(job.tok, val_fraction, False, "chat", str(tmp / "chunks"), job.chat)
    os.environ.clear()
    os.environ.update(saved)
    chunks, packed = [], []
    for i, path in enumerate(job.files):
        batch = pa.Table.from_pylist([{"file_idx": i, "path": path}])
        rows = [tokenize(t).to_pylist()[0] for t in read_chunks(batch, "text", 400, "chat")]
        chunks += rows
        paths = [r["path"] for r in rows if r["path"]]
        packed += pack_file(i, paths, str(tmp), seq_len, job.rows_per_file, job.row_group_rows)
    return tmp, job._manifest(chunks, packed)


def runs(ids: np.ndarray, mask: np.ndarray, raw) -> list[str]:
    """The decoded runs of consecutive trained tokens, in order."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [raw.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(edges[::2], edges[1::2])]


def check_split(out, manifest, split, conversations, render, raw):
    """The split's rows, concatenated, are the conversations' renderings in order (less the remainder packing
    drops), and the trained tokens decode to exactly their assistant turns, end-of-turn tokens included."""
    got = read_masked_rows(out, manifest, split)
    assert list(got) == [(0, None)]
    ids, mask = (a.reshape(-1) for a in got[(0, None)])
    texts, turns = zip(*(render(m) for m in conversations))
    decoded = raw.decode(ids.tolist(), skip_special_tokens=False)
    full = "".join(texts)
    assert len(decoded) > 100 and full.startswith(decoded)
    expected = [t for ts in turns for t in ts]
    got_runs = runs(ids, mask, raw)
    assert got_runs[:-1] == expected[: len(got_runs) - 1] and expected[len(got_runs) - 1].startswith(got_runs[-1])
    assert len(got_runs) >= len(expected) - 6  # only the last conversation(s) fall in the dropped remainder
    assert manifest["splits"][split]["trained_labels"] == int(got[(0, None)][1][:, 1:].sum())


# ------------------------------------------------------------------------------------------ reading the rows
def test_chat_rows_are_read_and_bad_rows_counted_by_reason(tmp_path):
    assert set(BAD_CHAT_LINES) | {"template_error", "no_assistant_tokens"} == set(CHAT_BAD_ROW_REASONS)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    body = (
        chat_line(*CONVERSATION)
        + "".join(BAD_CHAT_LINES.values())
        + "\n"  # blank: no row, not counted
        + json.dumps({"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi."}]})
        + "\n"
    )
    (tmp_path / "a.jsonl").write_text(body)
    bad, labelled = Counter(), Counter()
    rows = list(iter_chats(tmp_path / "a.jsonl", bad, labelled))
    assert [json.loads(t) for t, _ in rows] == [
        [{"role": r, "content": c} for r, c in CONVERSATION],
        [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi."}],
    ]
    assert [name for _, name in rows] == ["Test", None]
    assert bad == Counter(dict.fromkeys(BAD_CHAT_LINES, 1)) and labelled == Counter(missing_meta=1)


def test_bad_rows_of_every_reason_are_counted_in_the_manifest(tmp_path, tok_file, raw):
    good = [chat_line(*CONVERSATION), chat_line(("user", "Hi"), ("assistant", "Hello."))]
    (tmp_path / "a.jsonl").write_text(good[0] + "".join(BAD_CHAT_LINES.values()) + good[1] * 3)
    _, m = prepare_here(tmp_path / "default", [tmp_path / "a.jsonl"], tok_file, seq_len=8)
    assert m["content"] == "chat" and m["documents"] == 4
    assert m["bad_rows"] == dict.fromkeys(sorted(BAD_CHAT_LINES), 1)
    # a template that raises on long conversations: those rows are template errors, the others are kept
    _, m = prepare_here(tmp_path / "raising", [tmp_path / "a.jsonl"], tok_file, seq_len=8, chat_template=RAISING)
    assert m["documents"] == 3 and m["bad_rows"] == {**dict.fromkeys(sorted(BAD_CHAT_LINES), 1), "template_error": 1}
    assert m["chat_template"]["text"] == RAISING
    # a template that renders no assistant tokens trains nothing: its rows are dropped and counted
    with pytest.raises(NeoxrayError, match="no usable documents.*no_assistant_tokens: 4"):
        prepare_here(tmp_path / "silent", [tmp_path / "a.jsonl"], tok_file, seq_len=8, chat_template=SILENT)


# -------------------------------------------------------------------------------------- masks through packing
def test_trained_tokens_are_exactly_the_assistant_turns_of_the_bundled_sample(tmp_path, tok_file, raw):
    conversations = [json.loads(line)["messages"] for line in CONVERSATIONS.read_text().splitlines()]
    out, m = prepare_here(tmp_path, [CONVERSATIONS], tok_file, seq_len=16, val_fraction=0.1)
    assert m["bad_rows"] == {} and m["documents"] == len(conversations) == 160
    assert m["chat_template"]["source"] == "(neoxray default)" and m["chat_template"]["text"] == DEFAULT_TEMPLATE
    assert m["chat_template"]["sha256"] == hashlib.sha256(DEFAULT_TEMPLATE.encode()).hexdigest()
    assert m["options"]["chat_template_sha256"] == m["chat_template"]["sha256"]
    assert "canonical JSON" in m["options"]["split_hash"]
    assert {c: v["documents"] for c, v in m["components"].items()} == dict.fromkeys(
        ("Arithmetic", "Sums", "Units", "Words"), 40
    )
    assert 0 < m["loss_tokens"] < m["tokens"] / 2 and m["trained_labels"] < m["rows"] * 16
    for split in ("train", "validation"):
        in_split = [c for c in conversations if split_of(c, 0.1) == split]
        assert in_split and m["splits"][split]["documents"] == len(in_split)
        check_split(out, m, split, in_split, default_rendering, raw)


def test_a_chatml_template_string_is_honoured_and_ends_each_conversation_with_eod(tmp_path, tok_file, raw):
    rows = [CONVERSATION, (("user", "Name a colour."), ("assistant", "Blue.")), CONVERSATION[1:3] * 2]
    (tmp_path / "a.jsonl").write_text("".join(chat_line(*r) for r in rows) * 4)
    out, m = prepare_here(tmp_path, [tmp_path / "a.jsonl"], tok_file, seq_len=12, chat_template=CHATML)
    assert (
        m["chat_template"]["text"] == CHATML
        and m["options"]["chat_template_sha256"] != hashlib.sha256(DEFAULT_TEMPLATE.encode()).hexdigest()
    )
    messages = [[{"role": r, "content": c} for r, c in row] for row in rows] * 4
    check_split(out, m, "train", messages, chatml_rendering, raw)


def test_chat_options_are_checked(tmp_path, tok_file):
    (tmp_path / "a.jsonl").write_text(chat_line(*CONVERSATION))
    with pytest.raises(NeoxrayError, match="--chat-template applies to --format chat only"):
        PrepareJob([str(tmp_path)], tok_file, 8, str(tmp_path / "o"), content="prompt-completion", chat_template=CHATML)
    with pytest.raises(NeoxrayError, match=r"chat template .*does not parse"):
        PrepareJob([str(tmp_path)], tok_file, 8, str(tmp_path / "o"), content="chat", chat_template="{% for %}")
    with pytest.raises(NeoxrayError, match=r"chat template nowhere\.jinja: no such file"):
        PrepareJob([str(tmp_path)], tok_file, 8, str(tmp_path / "o"), content="chat", chat_template="nowhere.jinja")
    # the tokenizer's folder's template is the default one's replacement
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(Path(tok_file).read_bytes())
    (folder / "chat_template.jinja").write_text(CHATML)
    job = PrepareJob([str(tmp_path / "a.jsonl")], str(folder), 8, str(tmp_path / "o"), content="chat")
    assert job.chat["text"] == CHATML and job.chat["source"] == str(folder / "chat_template.jinja")


# ---------------------------------------------------------------------------------------- the bundled sample
def test_bundled_sample_is_what_its_generator_writes():
    spec = importlib.util.spec_from_file_location(
        "make_conversation_sample", ROOT / "tools" / "make_conversation_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.build()
    assert CONVERSATIONS.read_text(encoding="utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    docs = (ROOT / "docs" / "data.md").read_text()
    assert "conversations.jsonl" in docs and "tools/make_conversation_sample.py" in docs


def test_cli_prepare_format_chat_with_a_template_file(ray_local, cli_here, tok_file, tmp_path, raw):
    (tmp_path / "chatml.jinja").write_text(CHATML)
    out = tmp_path / "ds"
    args = ("prepare", "--input", CONVERSATIONS, "--tokenizer", tok_file, "--seq-len", 32, "--workers", 1)
    summary = json.loads(
        cli_here(
            *args,
            "--format",
            "chat",
            "--chat-template",
            tmp_path / "chatml.jinja",
            "--output",
            out,
            "--json",
            "--quiet",
        ).splitlines()[-1]
    )
    assert summary["format"] == "chat" and summary["documents"] == 160 and summary["bad_rows"] == {}
    m = json.loads((out / MANIFEST).read_text())
    assert m["chat_template"]["source"] == str(tmp_path / "chatml.jinja") and m["chat_template"]["text"] == CHATML
    conversations = [json.loads(line)["messages"] for line in CONVERSATIONS.read_text().splitlines()]
    check_split(out, m, "train", [c for c in conversations if split_of(c, 0.01) == "train"], chatml_rendering, raw)
