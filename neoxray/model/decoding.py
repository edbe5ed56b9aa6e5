"""Decoding rules shared by one-process generation (`neoxray.model.generate`) and the inference engine behind
`neoxray serve` and `neoxray eval` (`neoxray.platform.inference.output_processor`): how the next token is drawn,
when a sequence ends, and how its text is decoded as it grows. Written once here, so `neoxray generate` and the
HTTP endpoint stop at exactly the same place.

- `SamplingParams`: greedy, temperature, top-k, top-p, a per-sequence seed, stop strings, stop at end of document.
- `sample_next`: logits [b, V] -> next ids [b], each row from its own generator (`seeded_generator`).
- `StopChecker`: the finish reason after a new token ('stop' at the end-of-document token or a stop string,
  'length' at the token budget), where a stop string cuts the text, and how much of a streamed text is safe to
  hand out (not the start of a stop string, not half a character).
- `IncrementalDetokenizer`: the text of the generated tokens so far, decoding only the tokens after the last
  complete character (byte-level BPE spells one character over several tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neoxray.errors import NeoxrayError

REPLACEMENT = "\ufffd"
"""What a decoder yields for the bytes of a character that is not complete yet."""


@dataclass
class SamplingParams:
    """How one sequence is decoded. temperature 0 (or greedy) means argmax."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    greedy: bool = False
    seed: int | None = None
    """Same seed and same request give the same output, whatever else is in the batch."""
    stop: Sequence[str] = field(default_factory=tuple)
    """Stop strings: generation ends when the text contains one; the returned text ends before it."""
    stop_at_eod: bool = True

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 0:
            raise NeoxrayError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise NeoxrayError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise NeoxrayError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise NeoxrayError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def seeded_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The random generator a sequence samples from: None for greedy decoding (nothing is drawn), else one
    seeded with `params.seed` (or from the system's entropy when it is None)."""
    if params.is_greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams], generators) -> torch.Tensor:
    """logits [b, V] (fp32) -> next token ids [b]: argmax for greedy rows; temperature, then top-k, then top-p,
    then a draw from each row's own generator for the others."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return out
    sub = logits[rows]  # [r, V]
    temp = torch.tensor([params[i].temperature for i in rows], device=sub.device)[:, None]
    sub = sub / temp
    sorted_logits, order = sub.sort(dim=-1, descending=True)  # [r, V]
    ranks = torch.arange(sub.shape[-1], device=sub.device)[None]
    top_k = torch.tensor([params[i].top_k or sub.shape[-1] for i in rows], device=sub.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
    top_p = torch.tensor([params[i].top_p for i in rows], device=sub.device)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ahead of each token
    sorted_logits = sorted_logits.masked_fill((before >= top_p) & (top_p < 1.0), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    for j, i in enumerate(rows):
        pick = torch.multinomial(probs[j], 1, generator=generators[i])
        out[i] = order[j, pick[0]]
    return out


class StopChecker:
    """When one sequence ends, and where its text ends.

    `after_token` gives the finish reason once a new token is appended: 'stop' for the end-of-document token
    (when `params.stop_at_eod`; the token itself is kept, as transformers does), 'length' when `budget` new
    tokens exist, else None. Stop strings are looked for in the decoded text: `find` returns where the earliest
    one starts (the text is cut there and the reason is 'stop'); `safe_end` is how much of a still-growing text
    may be handed out now (a tail that could be the start of a stop string, or an incomplete character, waits).
    """

    def __init__(self, params: SamplingParams, eod_id: int, budget: int):
        self.stop_at_eod = params.stop_at_eod
        self.eod_id = eod_id
        self.budget = budget
        self.stops = tuple(s for s in params.stop if s)
        self.longest = max(map(len, self.stops), default=0)

    def after_token(self, token: int, n_generated: int) -> str | None:
        if token == self.eod_id and self.stop_at_eod:
            return "stop"
        if n_generated >= self.budget:
            return "length"
        return None

    def find(self, text: str, searched: int = 0) -> int:
        """Start of the earliest stop string in `text`, or -1. `searched`: text[:searched] was already looked at
        (and held no stop string), so only matches that end after it are new."""
        if not self.stops:
            return -1
        lo = max(0, searched - self.longest + 1)
        hits = [h for h in (text.find(s, lo) for s in self.stops) if h >= 0]
        return min(hits) if hits else -1

    def safe_end(self, text: str, emitted: int = 0) -> int:
        """How much of `text` (no stop string in it) may be handed out now: it ends before an incomplete
        character and before a tail that could grow into a stop string; never before `emitted`."""
        end = len(text)
        while end > emitted and text[end - 1] == REPLACEMENT:
            end -= 1
        for s in self.stops:
            for m in range(min(len(s) - 1, end - emitted), 0, -1):
                if text[end - m : end] == s[:m]:
                    end -= m
                    break
        return end


class IncrementalDetokenizer:
    """The text of a growing list of generated tokens, end-of-document tokens left out. Only the tokens after
    the last complete character are decoded again at each call, so the cost per token stays constant."""

    def __init__(self, tokenizer, eod_id: int):
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self._text = ""  # text of the first _done ids, ending on a complete character
        self._done = 0

    def text(self, generated: Sequence[int]) -> str:
        """The decoded text of `generated` (the same list, grown since the previous call)."""
        if self.tokenizer is None:
            return ""
        ids = [t for t in generated[self._done :] if t != self.eod_id]
        tail = self.tokenizer.decode(ids)
        if tail.endswith(REPLACEMENT):  # a character still being spelled: decode these tokens again next time
            return self._text + tail
        self._text += tail
        self._done = len(generated)
        return self._text
