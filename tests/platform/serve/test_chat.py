"""POST /v1/chat/completions on one in-process server (uvicorn, no Ray), through the openai client: the rendered
prompt equals transformers' `apply_chat_template` for the model directory's own template, greedy chat content
equals a greedy completion of that prompt, streaming, n, seeds, logprobs, usage, and every refusal in OpenAI's
shape. The template's trip to an adapter on a Ray Serve replica is in test_lora_serving."""

from __future__ import annotations

import json
import re
import shutil

import openai
import pytest
import requests

from neoxray.platform.serve.args import ServeArgs
from tests.support.serving import Server

pytestmark = pytest.mark.e2e  # a real HTTP server and client

KEY = "chat-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}"
    "{% endfor %}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RAISING = (
    "{% if messages[0]['role'] != 'system' %}{{ raise_exception('the first message must be a system one') }}"
    "{% endif %}x"
)
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "the quick brown"},
    {"role": "assistant", "content": "fox"},
    {"role": "user", "content": [{"type": "text", "text": "jumps "}, {"type": "text", "text": "over"}]},
]


@pytest.fixture(scope="module")
def chat_model_dir(serve_model_dir, tmp_path_factory):
    """The tiny model with a chat template in its tokenizer_config.json, as Hugging Face ships chat models."""
    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(serve_model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def served(chat_model_dir):
    """The chat model behind the API with a key, as `neoxray serve --no-ray` builds it -> (server, openai client)."""
    from neoxray.platform.serve.client import LocalEngineClient

    args = ServeArgs(model=str(chat_model_dir), name="tiny", api_key=KEY)
    engine = args.build_engine().start()
    srv = Server(LocalEngineClient(engine, None, None, args.model_chat_template()), args)
    yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    srv.close()
    engine.stop(timeout=10)


def reference_prompt(model_dir, messages) -> tuple[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_chat_equals_a_greedy_completion_of_the_prompt_transformers_renders(served, chat_model_dir):
    _, client = served
    text, ids = reference_prompt(chat_model_dir, MESSAGES)
    for extra in ({"extra_body": {"ignore_eos": True}}, {}):  # a fixed length, and wherever the model stops
        chat = client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=0, max_completion_tokens=12, **extra
        )
        completion = client.completions.create(model="tiny", prompt=text, temperature=0, max_tokens=12, **extra)
        choice = chat.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == completion.choices[0].text
        assert choice.finish_reason == completion.choices[0].finish_reason
        assert chat.usage.prompt_tokens == len(ids) == completion.usage.prompt_tokens
        assert chat.usage.completion_tokens == completion.usage.completion_tokens
        assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == "tiny"
    # the sampling controls and stop strings are the completion route's: a bias forces a token, a stop ends there
    srv, _ = served
    (a,) = requests.post(srv.url + "/tokenize", json={"prompt": "A"}, headers=AUTH, timeout=60).json()["tokens"]
    forced = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, logit_bias={str(a): 100}, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].message.content == "A" * 4
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12)
    text = plain.choices[0].message.content
    stopped = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, stop=[text[3:6]]
    )
    assert stopped.choices[0].message.content == text[:3] and stopped.choices[0].finish_reason == "stop"
    # max_tokens (OpenAI's older name) bounds the answer too
    short = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_streamed_deltas_carry_the_role_then_the_same_content(served):
    _, client = served
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=10, n=2, seed=7, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and all(m.delta.role is None for m in mine[1:])
        assert "".join(m.delta.content or "" for m in mine) == whole.choices[i].message.content
        assert [m.finish_reason for m in mine if m.finish_reason] == ["length"]
    assert whole.choices[0].message.content != whole.choices[1].message.content  # seed + j for choice j
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20 == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    again = client.chat.completions.create(**kw)  # the same seed: the same answers
    assert [c.message.content for c in again.choices] == [c.message.content for c in whole.choices]


def test_logprobs_are_the_completion_logprobs_in_the_chat_shape(served, chat_model_dir):
    _, client = served
    text, _ = reference_prompt(chat_model_dir, MESSAGES)
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    completion = client.completions.create(model="tiny", prompt=text, temperature=0, max_tokens=6, logprobs=3)
    entries, want = chat.choices[0].logprobs.content, completion.choices[0].logprobs
    assert [e.token for e in entries] == want.tokens
    assert [e.logprob for e in entries] == pytest.approx(want.token_logprobs, abs=1e-5)
    assert "".join(e.token for e in entries) == chat.choices[0].message.content
    for e, top in zip(entries, want.top_logprobs):
        assert len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token
        assert {t.token: t.logprob for t in e.top_logprobs} == pytest.approx({k: top[k] for k in list(top)[:3]})
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def refused(call, status: int, param=None) -> dict:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == status, e.value
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_every_refusal_is_one_openai_error(served):
    srv, client = served
    create = client.chat.completions.create
    tool = {"role": "tool", "content": "42", "tool_call_id": "x"}
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    assert "'assistant'" in refused(lambda: create(model="tiny", messages=[tool]), 400, "messages")["message"]
    refused(lambda: create(model="tiny", messages=[image]), 400, "messages")
    refused(lambda: create(model="tiny", messages=[]), 400, "messages")
    refused(
        lambda: create(model="tiny", messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]), 400
    )
    refused(lambda: create(model="tiny", messages=MESSAGES, top_logprobs=2), 400)
    assert refused(lambda: create(model="nope", messages=MESSAGES), 404, "model")["code"] == "model_not_found"
    refused(lambda: create(model="tiny", messages=MESSAGES, max_tokens=10_000), 400, "max_tokens")
    long = [{"role": "user", "content": "hello " * 600}]  # beyond the 256-token context
    refused(lambda: create(model="tiny", messages=long), 400, "messages")
    nokey = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        nokey.chat.completions.create(model="tiny", messages=MESSAGES)
    r = requests.post(srv.url + "/v1/chat/completions", json={"messages": MESSAGES, "stream": 1}, timeout=60)
    assert r.status_code == 401  # the key is checked before the body is read
    assert requests.head(srv.url + "/", timeout=60).status_code == 200  # the page (and /health) need no key
    assert requests.head(srv.url + "/v1/models", timeout=60).status_code == 401
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices  # still serving


def test_the_template_comes_from_the_server_or_the_model_and_a_missing_one_names_the_option(serve_model_dir):
    """A model without a template answers chat with a 400 naming --chat-template (completions still work);
    `chat_template` (the server's) serves it, `default` is neoxray's own, and a template that raises is a 400
    carrying its message."""
    from neoxray.model.chat_template import default_chat_template
    from neoxray.platform.inference.engine import InferenceEngine

    args = ServeArgs(model=str(serve_model_dir), name="tiny")
    engine = args.build_engine().start()
    servers = []
    try:
        for template in (None, "default", RAISING):
            srv = Server(engine, args.model_copy(update={"chat_template": template}))
            servers.append(srv)
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            create = client.chat.completions.create
            if template is None:
                err = refused(lambda c=create: c(model="tiny", messages=MESSAGES), 400, "messages")
                assert "--chat-template" in err["message"] and err["code"] == "no_chat_template"
                assert client.completions.create(model="tiny", prompt="hello", max_tokens=2).choices
            elif template == "default":
                chat = create(model="tiny", messages=MESSAGES[:2], temperature=0, max_tokens=5)
                prompt = default_chat_template().render(MESSAGES[:2], add_generation_prompt=True)
                assert prompt.endswith("Assistant:")
                want = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=5)
                assert chat.choices[0].message.content == want.choices[0].text
            else:
                err = refused(lambda c=create: c(model="tiny", messages=MESSAGES[1:]), 400, "messages")
                assert "the first message must be a system one" in err["message"]
                assert create(model="tiny", messages=MESSAGES, max_tokens=2).choices
    finally:
        for srv in servers:
            srv.close()
        engine.stop(timeout=10)
    assert isinstance(engine, InferenceEngine)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def test_structured_output_holds_for_a_random_model_on_both_routes(served):
    """A randomly initialised model still answers JSON that validates against the schema, for every seed and
    choice, streamed or not; choice and regex hold on completions; what the grammar library cannot compile is a
    400 naming the field that sent it."""
    import jsonschema

    _, client = served
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    answers = []
    for seed in range(6):
        chat = client.chat.completions.create(
            model="tiny", messages=MESSAGES, n=4, seed=seed, max_tokens=120, response_format=fmt
        )
        answers += [(c.message.content, c.finish_reason) for c in chat.choices]
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, seed=99, max_tokens=120, response_format=fmt, stream=True
    )
    answers.append(("".join(c.choices[0].delta.content or "" for c in stream if c.choices), "stop"))
    for text, finish in answers:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in answers}) > 1  # sampled, not one fixed answer
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, seed=0, max_tokens=20)
    with pytest.raises(ValueError):  # without the schema the same model writes no JSON
        json.loads(plain.choices[0].message.content)

    choices = ["yes", "no", "maybe later"]
    done = client.completions.create(
        model="tiny", prompt="Is it?", n=6, seed=1, max_tokens=8, extra_body={"structured_outputs": {"choice": choices}}
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in done.choices), done
    done = client.completions.create(
        model="tiny",
        prompt="Date:",
        n=4,
        seed=2,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}"}},
    )
    assert all(re.fullmatch("[0-9]{4}-[0-9]{2}", c.text) for c in done.choices), done

    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
    }
    err = refused(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=bad), 400)
    assert err["param"] == "response_format", err
    err = refused(
        lambda: client.completions.create(model="tiny", prompt="x", extra_body={"structured_outputs": {"regex": "("}}),
        400,
    )
    assert err["param"] == "structured_outputs", err
    both = {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}
    refused(lambda: client.completions.create(model="tiny", prompt="x", extra_body=both), 400)


def test_stop_token_ids_and_a_templates_own_end_of_turn_end_the_answer(served, serve_model_dir, tmp_path):
    """vLLM's `stop_token_ids` end a completion at the token (its text left out); a chat template whose
    `eos_token` is a token of its own (ChatML's `<|im_end|>`, here the vocabulary's `<|padding|>`) ends the
    assistant's turn there, as the end-of-document token ends neoxray's default one."""
    from neoxray.platform.serve.client import LocalEngineClient

    srv, client = served
    (a,) = requests.post(srv.url + "/tokenize", json={"prompt": "A"}, headers=AUTH, timeout=60).json()["tokens"]
    kw = dict(model="tiny", prompt="the quick brown", max_tokens=6, logit_bias={str(a): 100})
    assert client.completions.create(**kw).choices[0].text == "A" * 6  # the bias forces "A"
    cut = client.completions.create(**kw, extra_body={"stop_token_ids": [a], "ignore_eos": True})
    assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == 1
    refused(lambda: client.completions.create(model="tiny", prompt="x", extra_body={"stop_token_ids": [10**6]}), 400)

    out = tmp_path / "im-end"
    shutil.copytree(serve_model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": TEMPLATE, "eos_token": "<|padding|>"})
    )
    special = json.loads((out / "special_tokens_map.json").read_text())  # where transformers reads it first
    (out / "special_tokens_map.json").write_text(json.dumps({**special, "eos_token": "<|padding|>"}))
    args = ServeArgs(model=str(out), name="tiny")
    engine = args.build_engine().start()
    other = Server(LocalEngineClient(engine, None, None, args.model_chat_template()), args)
    try:
        chat = openai.OpenAI(base_url=other.url + "/v1", api_key="none", max_retries=0).chat.completions.create
        (pad,) = requests.post(other.url + "/tokenize", json={"prompt": "<|padding|>"}, timeout=60).json()["tokens"]
        ended = chat(model="tiny", messages=MESSAGES, max_tokens=8, logit_bias={str(pad): 100})
        assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1, ended
        assert ended.choices[0].message.content == ""
    finally:
        other.close()
        engine.stop(timeout=10)
