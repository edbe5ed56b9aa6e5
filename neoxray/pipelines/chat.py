"""Conversation data for `neoxray prepare --format chat`: rows of messages -> token ids with a loss mask on the
assistant's turns only.

A row is OpenAI's and TRL's conversational format, one JSON object per line:
``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...], "meta": {...}}``, where a
content is a string or a list of text parts (``[{"type": "text", "text": "..."}]``).

    reader (stage 1, `parse_chat_line`)     checks a row's shape and hands on its messages as canonical JSON (the
      |                                     text the validation split is hashed from), or counts why it is bad
      v
    ChatEncoder (stage 2, in the tokenizer  renders the conversation with the chat template and tokenizes it
    actors)                                 (`ChatTemplate.encode_with_assistant_mask`): mask 1 on the tokens of
                                            assistant turns (their end-of-turn token included), 0 on system and
                                            user turns and the template's headers; a conversation whose last
                                            token is not the end-of-document id gets one, with mask 0 (a document
                                            separator, not the assistant's)

The template is `neoxray.model.chat_template`'s: the one `--chat-template` names, else the one the tokenizer's
folder ships, else neoxray's default (`resolve_template`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.chat_template import ChatTemplate, default_chat_template, resolve_chat_template
from neoxray.pipelines.pile import _component, _json_object, _utf8_problem, open_text_lines

ROLES = ("system", "user", "assistant")
"""The roles a message may have."""
CHAT_BAD_ROW_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_messages",
    "messages_not_a_list",
    "empty_conversation",
    "invalid_message",
    "unknown_role",
    "invalid_content",
    "no_assistant_turn",
    "template_error",
    "no_assistant_tokens",
)
"""Why a chat row was skipped: the reader's checks in this order, then the tokenizer actor's (`template_error`:
the template raised or does not render prefixes of the conversation as prefixes; `no_assistant_tokens`: the
rendering holds no token of an assistant turn)."""


def parse_chat_line(line: str, bad: Counter | None = None, labelled: Counter | None = None):
    """One JSON line -> (messages as canonical JSON, pile_set_name), or None (the reason counted in `bad`, the
    first of CHAT_BAD_ROW_REASONS' reader checks that fails). Blank lines return None without being counted; a
    missing component is counted in `labelled`."""
    if not line.strip():
        return None
    obj, reason = _json_object(line)
    if reason is None:
        reason = _messages_problem(obj)
    text = None
    if reason is None:
        text = json.dumps(obj["messages"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        reason = _utf8_problem(text)
    if reason is not None:
        if bad is not None:
            bad[reason] += 1
        return None
    return text, _component(obj, labelled)


def _messages_problem(obj: dict) -> str | None:
    if "messages" not in obj:
        return "missing_messages"
    messages = obj["messages"]
    if not isinstance(messages, list):
        return "messages_not_a_list"
    if not messages:
        return "empty_conversation"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return "invalid_message"
        if m["role"] not in ROLES:
            return "unknown_role"
        if not _valid_content(m.get("content")):
            return "invalid_content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn"
    return None


def _valid_content(content) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    )


def iter_chats(path: str, bad: Counter | None = None, labelled: Counter | None = None) -> Iterator[tuple[str, str]]:
    """(messages as canonical JSON, pile_set_name) for each usable row of the JSON Lines file `path` (.jsonl,
    .jsonl.gz, .jsonl.zst; local or a URI), streaming; bad rows skipped and counted in `bad` by reason."""
    for line in open_text_lines(str(path), bad):
        row = parse_chat_line(line, bad, labelled)
        if row is not None:
            yield row


# ------------------------------------------------------------------------------------------------ the template
def resolve_template(spec: str | None, tokenizer: str) -> ChatTemplate:
    """The template prepare renders with: `spec` (`--chat-template`: a file, a model folder or the template
    itself), else the one the `tokenizer` folder (or a tokenizer.json's folder) ships, else neoxray's default."""
    path = Path(os.fspath(tokenizer)).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    return resolve_chat_template(spec, folder) or default_chat_template()


def template_spec(template: ChatTemplate) -> dict:
    """What the tokenizer actors rebuild a template from (a compiled one does not pickle), and what the manifest
    records of it: its text, its sha256, where it came from and its special-token variables."""
    return {
        "source": template.source,
        "sha256": hashlib.sha256(template.text.encode("utf-8")).hexdigest(),
        "text": template.text,
        "special_tokens": dict(sorted(template.special_tokens.items())),
    }


class ChatEncoder:
    """Per tokenizer actor: conversations (the reader's canonical JSON) -> (ids, loss mask), or None with the
    reason counted."""

    def __init__(self, tokenizer, spec: dict):
        self.tokenizer, self.eod = tokenizer, tokenizer.eod_id
        self.template = ChatTemplate(spec["text"], spec["source"], spec["special_tokens"])

    def encode(self, text: str, bad: Counter) -> tuple[list[int], list[int]] | None:
        try:
            ids, mask = self.template.encode_with_assistant_mask(self.tokenizer, json.loads(text))
        except NeoxrayError:
            bad["template_error"] += 1
            return None
        if not any(mask):
            bad["no_assistant_tokens"] += 1
            return None
        if ids[-1] != self.eod:
            ids.append(self.eod)
            mask.append(0)
        return ids, mask
