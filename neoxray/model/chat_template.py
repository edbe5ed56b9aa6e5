"""Hugging Face chat templates, rendered by neoxray: messages -> prompt text -> token ids.

A chat template is a Jinja2 template (`chat_template` in a model's tokenizer_config.json, or its
chat_template.jinja), rendered as transformers renders it so that the ids equal `apply_chat_template(messages,
tokenize=True, add_generation_prompt=...)`'s: a sandbox with `trim_blocks`, `lstrip_blocks`, loop controls,
`tojson` (no HTML escaping, `ensure_ascii=False`), `raise_exception`, `strftime_now`, a safe `dict` and
`namespace`; variables `messages` (plain data, None-valued keys dropped), `add_generation_prompt`, `tools` and
`documents` (None), `bos_token`, `eos_token`, `unk_token`, `pad_token`; `{% generation %}` renders its body. The
text is tokenized without adding special tokens, as transformers does. Content is a string or a list of text parts
({"type": "text", "text": ...}): templates that loop over `content` get the list, others its texts joined by "\n".

DEFAULT_TEMPLATE, for base GPT-NeoX models (they ship none), needs no new tokens: each turn is `Role: content`
ending with the end-of-document token, and the generation prompt is `Assistant:`, so the model writes
" reply<|endoftext|>" and stops at its usual end of document:

    System: Be brief.<|endoftext|>User: Hi<|endoftext|>Assistant: Hello!<|endoftext|>User: Bye<|endoftext|>Assistant:

`ChatTemplate.encode_with_assistant_mask` (fine-tuning) finds the assistant's tokens by diffing renderings of
prefixes of the conversation: it assumes a template renders a conversation's prefixes as prefixes of its text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from neoxray.errors import NeoxrayError
from neoxray.model.tokenizer import EOD_TOKEN, PAD_TOKEN, Tokenizer

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') %}"
    "{{ message['role'] | capitalize }}: {{ content | trim }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""The template for models without one (see the module docstring)."""

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _RaisedByTemplate(Exception):
    """What `raise_exception(message)` raises inside a template."""


def _raise_exception(message):
    raise _RaisedByTemplate(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # Jinja's escapes HTML
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_attribute(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing attribute names that start with an underscore."""

    def __init__(*args, **kwargs):  # like Jinja's own, so that `namespace(self=...)` works
        for name in (attrs := dict(*args[1:], **kwargs)):
            _check_attribute(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _check_attribute(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _plain(value):
    """`value` rebuilt from JSON types only (anything else becomes "<TypeName>"): templates are untrusted code."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template. `source` names it in messages (a file, a directory's config, a string);
    `special_tokens`: the token variables, GPT-NeoX's (as `Tokenizer.save` writes them) unless given others."""

    def __init__(self, text: str, source: str, special_tokens: Mapping[str, str] | None = None):
        self.text = text
        self.source = source
        self.special_tokens = dict.fromkeys(SPECIAL_TOKENS[:3], EOD_TOKEN) | {"pad_token": PAD_TOKEN}
        self.special_tokens.update(special_tokens or {})
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, dict=_Dict(), namespace=_Namespace)
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            ast = env.parse(text)
        except jinja2.TemplateSyntaxError as e:
            message = " ".join(str(e.message).split())
            raise NeoxrayError(f"chat template {source} does not parse: line {e.lineno}: {message}") from None
        self._template = env.from_string(ast)
        # whether it iterates over a message's content (then it gets lists of parts as lists)
        self.loops_over_content = any(_names_content(node.iter) for node in ast.find_all(jinja2.nodes.For))

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False, variables=None) -> str:
        """The prompt text of `messages` (list of {"role", "content"}), with the assistant's opening when
        `add_generation_prompt`. `variables`: extra template variables (like transformers' `**kwargs`)."""
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise NeoxrayError(f"chat messages must be a list of messages, got {type(messages).__name__}")
        chat = [self._message(i, m) for i, m in enumerate(messages)]
        context = {**self.special_tokens, **_plain(dict(variables or {}))}
        try:
            return self._template.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **context
            )
        except Exception as e:  # raise_exception(...), or the template's own bugs: undefined names, sandbox refusals
            failed = "" if isinstance(e, _RaisedByTemplate) else f" failed: {type(e).__name__}"
            raise NeoxrayError(f"chat template {self.source}{failed}: {' '.join(str(e).split())}") from None

    def encode(self, tokenizer: Tokenizer, messages, add_generation_prompt: bool = False, variables=None) -> list[int]:
        """Token ids of the rendered prompt, without added special tokens (= transformers' apply_chat_template)."""
        return tokenizer.encode(self.render(messages, add_generation_prompt, variables))

    def encode_with_assistant_mask(self, tokenizer: Tokenizer, messages, variables=None) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and a 0/1 mask per token: 1 on the tokens of assistant turns.

        For the assistant message i, its text is what `messages[: i + 1]` renders beyond `messages[:i]` rendered
        with the generation prompt (so the prompt's "Assistant:" header is not the assistant's), less trailing
        whitespace (a separator the template writes after the turn's end token, which the model never emits).
        A token is marked when it overlaps that text, so the reply and its end-of-turn token are marked.
        Needs each rendering to be a prefix of the next; a NeoxrayError names the template otherwise."""
        full = self.render(messages, False, variables)
        spans = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or message.get("role") != "assistant":
                continue
            try:
                before = self.render(messages[:i], True, variables)
            except NeoxrayError:  # templates may refuse an empty conversation; then the reply starts the text
                if i:
                    raise
                before = ""
            upto = self.render(messages[: i + 1], False, variables)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise NeoxrayError(
                    f"chat template {self.source} does not render conversations as prefixes of longer ones "
                    f"(at message {i}), so the assistant's tokens cannot be found"
                )
            end = len(before) + len(upto[len(before) :].rstrip())
            if end > len(before):
                spans.append((len(before), end))
        encoding = tokenizer.backend.encode(full, add_special_tokens=False)
        mask = [int(any(s < hi and lo < e for s, e in spans)) for lo, hi in encoding.offsets]
        return list(encoding.ids), mask

    def _message(self, index: int, message) -> dict:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise NeoxrayError(f"chat message {index}: expected an object with a string 'role', got {message!r:.80}")
        out = {k: v for k, v in _plain(message).items() if v is not None}
        content = out.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise NeoxrayError(f"chat message {index}: only text content parts are supported, got {part!r:.80}")
            if not self.loops_over_content:
                out["content"] = "\n".join(part["text"] for part in content)
        elif content is not None and not isinstance(content, str):
            raise NeoxrayError(f"chat message {index}: content must be a string or a list of text parts")
        reasoning = next((out[k] for k in _REASONING_KEYS if k in out), None)
        if reasoning is not None:
            out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
        return out


def _names_content(node) -> bool:
    """Whether a loop's iterable is some `x.content` or `x['content']`."""
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return isinstance(node, jinja2.nodes.Filter) and _names_content(node.node)


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NeoxrayError(f"{label} {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise NeoxrayError(f"cannot read {label} {path}: {e.strerror or e}") from None


def _read_json(path: Path, label: str) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(_read_text(path, label))
    except json.JSONDecodeError as e:
        raise NeoxrayError(f"{label} {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(value, dict):
        raise NeoxrayError(f"{label} {path} is not a JSON object")
    return value


def load_chat_template(model_dir: str | os.PathLike) -> ChatTemplate | None:
    """The chat template a model directory ships, as transformers finds it: `chat_template.jinja`, else
    tokenizer_config.json's `chat_template` (a string, or a list of {name, template}: the one named "default");
    None when there is none. The special tokens it names (tokenizer_config.json, special_tokens_map.json) become
    the template's variables."""
    directory = Path(model_dir)
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path, "tokenizer config")
    tokens = dict(config)
    if "added_tokens_decoder" not in config:  # then transformers lets special_tokens_map.json override the config
        tokens.update(_read_json(directory / "special_tokens_map.json", "special tokens map"))
    tokens = {name: (t.get("content") if isinstance(t, dict) else t) for name, t in tokens.items()}
    special = {name: t for name, t in tokens.items() if name in SPECIAL_TOKENS and isinstance(t, str)}
    jinja_path = directory / TEMPLATE_FILE
    if jinja_path.is_file():
        return ChatTemplate(_read_text(jinja_path, "chat template"), str(jinja_path), special)
    text = config.get("chat_template")
    if text is None:
        return None
    if isinstance(text, list):
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        if "default" not in named:
            raise NeoxrayError(
                f"tokenizer config {config_path}: its chat templates {sorted(map(str, named))} have no 'default'"
            )
        text = named["default"]
    if not isinstance(text, str):
        raise NeoxrayError(f"tokenizer config {config_path}: chat_template must be a string or a list of templates")
    return ChatTemplate(text, f"in {config_path}", special)


def default_chat_template() -> ChatTemplate:
    """DEFAULT_TEMPLATE, for fine-tuning base models (serving a model without a template is the caller's refusal)."""
    return ChatTemplate(DEFAULT_TEMPLATE, "(neoxray default)")


def resolve_chat_template(spec: str | os.PathLike | None, model_dir: str | os.PathLike | None = None):
    """The template to use (a ChatTemplate, or None): `spec` (what `--chat-template` passes: a template file, a
    model directory, the template itself as a string with `{{` or `{%`, or `default`: neoxray's own), else the
    one `model_dir` ships."""
    if spec is None:
        return load_chat_template(model_dir) if model_dir is not None else None
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text == "default" and not path.exists():  # neoxray's own, by name
        return default_chat_template()
    if "{{" not in text and "{%" not in text:
        if path.is_dir():
            found = load_chat_template(path)
            if found is None:
                raise NeoxrayError(
                    f"chat template {text}: the directory has no {TEMPLATE_FILE} and no chat_template in {CONFIG_FILE}"
                )
            return found
        if path.is_file():
            return ChatTemplate(_read_text(path, "chat template"), str(path))
        raise NeoxrayError(f"chat template {text}: no such file or directory (and no {{{{ or {{% for a template)")
    return ChatTemplate(text, f"{text[:40]!r}{'...' if len(text) > 40 else ''}")
