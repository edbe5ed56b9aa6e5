"""Chat templates rendered by neoxray against transformers' `apply_chat_template` on the same tokenizer, template
and messages; raising and broken templates; the assistant mask; finding a model directory's template."""

from __future__ import annotations

import json

import pytest

from neoxray.errors import NeoxrayError
from neoxray.model.chat_template import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    default_chat_template,
    load_chat_template,
    resolve_chat_template,
)
from neoxray.model.tokenizer import Tokenizer

PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# tojson (no HTML escaping, non-ASCII kept), namespace, loop controls, a BOS written by the template, whitespace control
EXTRAS = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m['role'] == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m | tojson }}
{% endfor %}
{% if add_generation_prompt %}[{{ ns.n + 1 }}]{% endif %}"""
TEMPLATES = {"plain": PLAIN, "chatml": CHATML, "extras": EXTRAS, "default": DEFAULT_TEMPLATE}
TAKES_PARTS = {"chatml", "default"}  # templates that read a list of content parts themselves

CONVERSATIONS = {
    "one": [{"role": "user", "content": "Hello there"}],
    "multi": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is <b>2+2</b>, señor?"},
        {"role": "assistant", "content": "It is 4.\n\nAnything else?"},
        {"role": "user", "content": "No, thanks."},
    ],
    "parts": [
        {"role": "user", "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Got both."}]},
        {"role": "user", "content": "Good"},
    ],
}


@pytest.fixture(scope="module")
def chat_tokenizer_dir(sample_tokenizer_dir, tmp_path_factory):
    """The sample tokenizer with ChatML's two special tokens added, saved as `Tokenizer.save` writes it."""
    tok = Tokenizer.load(sample_tokenizer_dir)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok.save(tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def tokenizers_pair(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return Tokenizer.load(chat_tokenizer_dir), AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))


def _flattened(messages):
    """Messages with lists of text parts joined as neoxray hands them to templates that do not loop over them."""
    return [
        {**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
        for m in messages
    ]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_token_ids_equal_transformers(tokenizers_pair, name, conversation, add_generation_prompt):
    tok, hf = tokenizers_pair
    messages = CONVERSATIONS[conversation]
    hf.chat_template = TEMPLATES[name]
    hf_messages = messages if name in TAKES_PARTS else _flattened(messages)
    expected_text = hf.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        hf_messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    template = ChatTemplate(TEMPLATES[name], name)
    assert template.render(messages, add_generation_prompt) == expected_text
    assert template.encode(tok, messages, add_generation_prompt) == expected
    if name == "chatml":  # the added tokens are single ids, as the template means them
        assert expected.count(tok.backend.token_to_id("<|im_end|>")) == len(messages)


def test_default_template_renders_documented_text():
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS["one"]]
    text = default_chat_template().render(messages, add_generation_prompt=True)
    assert text == "System: Be brief.<|endoftext|>User: Hello there<|endoftext|>Assistant:"


def test_template_helpers():
    from datetime import datetime

    helpers = "{{ strftime_now('%Y') }} {{ dict(b=[1], a='é') | tojson(sort_keys=True) }} {{ dict.fromkeys('x') }}"
    assert ChatTemplate(helpers, "helpers").render([]) == f'{datetime.now():%Y} {{"a": "é", "b": [1]}} {{\'x\': None}}'


def _masked_runs(tok, ids, mask):
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs, current = [*runs, current], []
    return [tok.decode(r) for r in [*runs, *([current] if current else [])]]


@pytest.mark.parametrize(
    ("name", "turn"), [("chatml", "{}<|im_end|>"), ("default", " {}<|endoftext|>"), ("plain", " {}")]
)
def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizers_pair, name, turn):
    tok, _ = tokenizers_pair
    replies = ["It is 4.\n\nAnything else?", "You're welcome."]
    messages = [
        *CONVERSATIONS["multi"][:3],
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": replies[1]},
    ]
    template = ChatTemplate(TEMPLATES[name], name)
    ids, mask = template.encode_with_assistant_mask(tok, messages)
    assert ids == template.encode(tok, messages)
    assert len(mask) == len(ids)
    assert _masked_runs(tok, ids, mask) == [turn.format(r) for r in replies]


def test_assistant_mask_equals_transformers_on_a_template_with_generation_blocks(tokenizers_pair):
    """transformers marks `{% generation %}` blocks; neoxray, which finds the turns by diffing, marks the same."""
    tok, hf = tokenizers_pair
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [*CONVERSATIONS["multi"][:3], {"role": "user", "content": "Hm"}, {"role": "assistant", "content": "Ok"}]
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = ChatTemplate(hf.chat_template, "gen").encode_with_assistant_mask(tok, messages)
    assert (ids, mask) == (expected["input_ids"], expected["assistant_masks"])
    assert sum(mask) > 0


def test_assistant_mask_refuses_a_template_that_rewrites_earlier_turns(tokenizers_pair):
    tok, _ = tokenizers_pair
    last_marked = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    template = ChatTemplate(last_marked, "last-marked.jinja")
    with pytest.raises(NeoxrayError, match="last-marked.jinja does not render conversations as prefixes") as e:
        template.encode_with_assistant_mask(tok, CONVERSATIONS["multi"])
    assert "\n" not in str(e.value)


def test_raise_exception_is_a_one_line_error_with_the_templates_message(tokenizers_pair):
    import jinja2

    _, hf = tokenizers_pair
    strict = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!\\nNo ' + m['role'] + '.') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    messages = CONVERSATIONS["multi"]
    with pytest.raises(NeoxrayError) as e:
        ChatTemplate(strict, "strict.jinja").render(messages)
    assert str(e.value) == "chat template strict.jinja: Only user and assistant roles are supported! No system."
    hf.chat_template = strict
    with pytest.raises(jinja2.TemplateError, match="Only user and assistant roles are supported"):
        hf.apply_chat_template(messages, tokenize=False)
    assert ChatTemplate(strict, "strict.jinja").render(messages[1:]) == hf.apply_chat_template(
        messages[1:], tokenize=False
    )


def test_broken_templates_and_bad_messages_are_one_line_errors():
    with pytest.raises(NeoxrayError, match=r"chat template broken.jinja does not parse: line 2: .*endfor") as e:
        ChatTemplate("{% for m in messages %}\n{{ m['content'] }}", "broken.jinja")
    assert "\n" not in str(e.value)
    for sneaky in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}", "{{ dict.__class__(1) }}"):
        with pytest.raises(NeoxrayError, match="chat template sneaky failed: SecurityError"):
            ChatTemplate(sneaky, "sneaky").render([])
    default = default_chat_template()
    with pytest.raises(NeoxrayError, match="chat message 1: only text content parts are supported"):
        default.render([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(NeoxrayError, match="chat message 0: expected an object with a string 'role'"):
        default.render([{"content": "no role"}])
    with pytest.raises(NeoxrayError, match="chat messages must be a list"):
        default.render("hello")


def test_loading_a_directorys_template_as_transformers_does(chat_tokenizer_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    def model_dir(name, config_extra, jinja=None, special_map=None):
        d = tmp_path / name
        shutil.copytree(chat_tokenizer_dir, d)
        config = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**config, **config_extra}))
        if jinja is not None:
            (d / "chat_template.jinja").write_text(jinja)
        if special_map is not None:  # transformers reads it over tokenizer_config.json's tokens
            (d / "special_tokens_map.json").write_text(json.dumps(special_map))
        return d

    eos_chatml = CHATML.replace("<|im_end|>", "{{ eos_token }}")
    dirs = {
        "config": model_dir("config", {"chat_template": eos_chatml, "eos_token": "<|im_end|>"}),
        "map": model_dir("map", {"chat_template": eos_chatml}, special_map={"eos_token": {"content": "<|im_end|>"}}),
        "jinja": model_dir("jinja", {"chat_template": PLAIN}, jinja=eos_chatml + "\n"),
        "named": model_dir("named", {"chat_template": [{"name": "tool_use", "template": PLAIN},
                                                       {"name": "default", "template": eos_chatml}]}),
    }  # fmt: skip
    messages = CONVERSATIONS["multi"]
    for name, d in dirs.items():
        template = load_chat_template(d)
        hf = AutoTokenizer.from_pretrained(str(d))
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert template.encode(Tokenizer.load(d), messages, add_generation_prompt=True) == expected, name
    assert "<|im_end|>" not in load_chat_template(dirs["config"]).render(messages)  # special_tokens_map.json won
    assert "<|im_end|>" in load_chat_template(dirs["map"]).render(messages)
    assert load_chat_template(chat_tokenizer_dir) is None
    assert resolve_chat_template(None, chat_tokenizer_dir) is None and resolve_chat_template(None) is None
    assert resolve_chat_template(None, dirs["jinja"]).source.endswith("chat_template.jinja")
    assert resolve_chat_template(str(dirs["named"])).text == eos_chatml
    template_file = dirs["jinja"] / "chat_template.jinja"
    assert resolve_chat_template(str(template_file)).text == eos_chatml + "\n"
    assert resolve_chat_template(PLAIN).text == PLAIN
    with pytest.raises(NeoxrayError, match="chat template nowhere.jinja: no such file or directory"):
        resolve_chat_template("nowhere.jinja")
    with pytest.raises(NeoxrayError, match="has no chat_template"):
        resolve_chat_template(str(chat_tokenizer_dir))
    bad = model_dir("bad", {"chat_template": [{"name": "tool_use", "template": PLAIN}]})
    with pytest.raises(NeoxrayError, match=r"chat templates \['tool_use'\] have no 'default'"):
        load_chat_template(bad)
