"""`neoxray eval --apply-chat-template` against lm-eval's own `hf` backend with `apply_chat_template=True` on the
tiny model exported with neoxray's default chat template: with a system instruction and a few-shot example as
turns, every request's prompt (lm-eval's rendering of the conversation through each backend's
`apply_chat_template`), log-likelihood and generation, and every metric, are the same. A continued last message
(no generation prompt) renders as transformers' `continue_final_message`, a template that refuses a system message
gets the conversation without it (as the `hf` backend does); a model without a template is refused in one line and
`--chat-template` supplies one. In this process (`neoxray eval` has run as a user runs it in test_cli.py)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil

import pytest

from neoxray.model.chat_template import DEFAULT_TEMPLATE
from tests.platform.eval.conftest import TASKS_DIR, at_root

pytestmark = pytest.mark.e2e  # runs the CLI

CHAT_TASKS = ["neoxray_test_lastword", "neoxray_test_choice", "neoxray_test_gen"]
SYSTEM = "Answer in one word."
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}"
    "{% endif %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with neoxray's default template in its tokenizer_config.json, as `neoxray export` writes it."""
    from neoxray.model.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("chat-model") / "tiny-chat"
    shutil.copytree(tiny_model_dir, out)
    Tokenizer.load(out).save(out, model_max_length=64, chat_template=DEFAULT_TEMPLATE)
    return out


def eval_here(*args) -> tuple[int, str, str]:
    """`neoxray eval ARGS` in this process, from the repository root, offline -> (status, stdout, stderr)."""
    from neoxray.cli import main

    saved, out, err = dict(os.environ), io.StringIO(), io.StringIO()
    try:
        with at_root(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["eval", *map(str, args)])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("neoxray: error: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_chat_prompts_and_results_equal_the_hf_backend(chat_model_dir, local_tm, tmp_path):
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    with at_root():
        theirs = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={chat_model_dir},device=cpu,dtype=float32",
            tasks=CHAT_TASKS,
            task_manager=local_tm,
            num_fewshot=1,
            limit=4,
            log_samples=True,
            bootstrap_iters=0,
            batch_size=8,
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            system_instruction=SYSTEM,
        )
    out = tmp_path / "results.json"
    code, _, err = eval_here(
        "--model", chat_model_dir, "--tasks", ",".join(CHAT_TASKS), "--include-path", TASKS_DIR,
        "--apply-chat-template", "--system-instruction", SYSTEM, "--num-fewshot", 1, "--limit", 4,
        "--output", out, "--log-samples", "--bootstrap-iters", 0, "--batch-size", 8,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    ours = json.loads(out.read_text())
    assert ours["config"]["chat_template"] == f"in {chat_model_dir / 'tokenizer_config.json'}"
    compared = 0
    for task in CHAT_TASKS:
        mine = [json.loads(line) for line in (tmp_path / f"results_samples_{task}.jsonl").read_text().splitlines()]
        ref = json.loads(json.dumps(theirs["samples"][task], default=handle_non_serializable))
        assert len(mine) == len(ref) == 4
        for a, b in zip(mine, ref, strict=True):
            assert a["arguments"] == b["arguments"], task  # the same rendered conversations
            prompt = a["arguments"][0][0]
            assert prompt.startswith(f"System: {SYSTEM}<|endoftext|>User: ") and "<|endoftext|>Assistant:" in prompt
            assert prompt.count("User: ") == 2  # the few-shot example as a turn of its own
            for (x,), (y,) in zip(a["resps"], b["resps"], strict=True):
                if isinstance(y, list):  # (log-likelihood, is_greedy)
                    assert math.isclose(x[0], y[0], rel_tol=1e-3) and x[1] == y[1], (task, x, y)
                else:
                    assert x == y, task
                compared += 1
        for key, value in theirs["results"][task].items():
            if isinstance(value, (int, float)) and "stderr" not in key:
                assert math.isclose(ours["results"][task][key], value, rel_tol=1e-3), (task, key)
    assert compared >= 20


def test_continued_messages_and_refused_system_roles_render_as_the_hf_backend(chat_model_dir):
    from transformers import AutoTokenizer

    from neoxray.model.chat_template import ChatTemplate
    from neoxray.platform.eval.lm import NeoxrayLM, render_chat

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is "}]
    for text in (DEFAULT_TEMPLATE, CHATML):
        tok.chat_template = text
        want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False, continue_final_message=True)
        got = render_chat(ChatTemplate(text, "test"), chat, add_generation_prompt=False)
        assert got == want and got.rstrip().endswith("The colour is")

    lm = NeoxrayLM(pretrained=str(chat_model_dir), device="cpu", chat_template=NO_SYSTEM)
    with_system = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    tok.chat_template = NO_SYSTEM
    assert lm.apply_chat_template(with_system) == tok.apply_chat_template(
        with_system[1:], tokenize=False, add_generation_prompt=True
    )
    assert lm.apply_chat_template(with_system) == "[user] Hi\n[assistant]"


def test_a_model_without_a_template_is_refused_and_chat_template_supplies_one(tiny_model_dir, tmp_path):
    base = ["--model", tiny_model_dir, "--tasks", "neoxray_test_gen", "--include-path", TASKS_DIR]
    line = one_error_line(*eval_here(*base, "--apply-chat-template")[::2])
    assert line == f"neoxray: error: {tiny_model_dir} has no chat template; pass --chat-template"
    line = one_error_line(*eval_here(*base, "--chat-template", CHATML)[::2])
    assert "--chat-template" in line and "--apply-chat-template" in line
    line = one_error_line(*eval_here(*base, "--fewshot-as-multiturn")[::2])
    assert "--apply-chat-template" in line

    out = tmp_path / "r.json"
    args = ["--limit", 2, "--output", out, "--log-samples", "--bootstrap-iters", 0]
    code, _, err = eval_here(*base, "--apply-chat-template", "--chat-template", CHATML, *args)
    assert code == 0, err[-3000:]
    for line in (tmp_path / "r_samples_neoxray_test_gen.jsonl").read_text().splitlines():
        prompt = json.loads(line)["arguments"][0][0]
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
