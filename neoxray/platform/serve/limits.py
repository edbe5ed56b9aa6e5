"""What one HTTP request may hold, so that no request (valid or not) can take a server's memory, its event loop
or its whole batch: the bounds (`ServingLimits`, set from `neoxray.platform.serve.args.ServeArgs`) and the
longest prompt text that can still fit the context (`prompt_char_bound`), checked before a prompt is tokenized.

Where each is enforced: the body size while the body is read (413, `neoxray.platform.serve.body`), the others
by the serving layer (`neoxray.platform.serve.context`) before anything reaches the engine (400 naming the
field); how many of one request's sequences run at once is the engine's `max_running_per_group`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_SEQS_PER_REQUEST = 64
DEFAULT_MAX_EMBEDDING_INPUTS = 128
DEFAULT_MAX_EMBEDDING_TOKENS = 65536

NFC_CHARS_PER_BYTE = 1.5
"""The most characters NFC composes into one UTF-8 byte of its output: a character whose canonical
decomposition has 3 characters is 2 bytes long (U+01D5: U + diaeresis + macron); no character does more
(tests/platform/serve/test_limits.py checks every code point)."""


@dataclass(frozen=True)
class ServingLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Most bytes of a request body; a longer one is refused with 413 before it is parsed."""
    max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST
    """Most sequences (n x prompts) one completion request may ask for."""
    max_embedding_inputs: int = DEFAULT_MAX_EMBEDDING_INPUTS
    """Most inputs of one /v1/embeddings request."""
    max_embedding_tokens: int = DEFAULT_MAX_EMBEDDING_TOKENS
    """Most tokens of one /v1/embeddings request, all inputs together."""


def prompt_char_bound(tokenizer, max_tokens: int) -> int | None:
    """The most characters a text of at most `max_tokens` tokens can have with this tokenizer, or None when no
    such bound is known (a pipeline that can drop characters). A longer prompt cannot fit the context, so it is
    refused without being tokenized; no prompt that fits is ever refused by it.

    Why it holds for a byte-level BPE (GPT-NeoX's): the tokens of a text spell the UTF-8 bytes of its
    normalised form, each token at most `longest` bytes, so that form has at most longest x tokens bytes, and
    as many characters at most. The normaliser can only shorten a text by composing characters: NFC turns at
    most 1.5 characters into one byte of its output (`NFC_CHARS_PER_BYTE`); no normaliser shortens nothing.
    Added tokens (<|endoftext|>) are matched in the text itself: their length counts too."""
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    normalizer = (spec.get("normalizer") or {}).get("type")
    pre = (spec.get("pre_tokenizer") or {}).get("type")
    if pre != "ByteLevel" or normalizer not in (None, "NFC", "NFKC", "NFD", "NFKD"):
        return None
    factor = NFC_CHARS_PER_BYTE if normalizer in ("NFC", "NFKC") else 1.0
    # a byte-level token is spelt with one character per byte; an added token is its text
    longest = max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)
    return math.ceil(factor * longest * max_tokens)
