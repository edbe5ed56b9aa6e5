"""Decoding rules shared by one-process generation (`neoxray.model.generate`) and the inference engine behind
`neoxray serve` and `neoxray eval` (`neoxray.platform.inference.output_processor`): how the next token is drawn,
when a sequence ends, and how its text is decoded as it grows. Written once here, so `neoxray generate` and the
HTTP endpoint stop at exactly the same place.

- `SamplingParams`: greedy, temperature, top-k, top-p, a per-sequence seed, stop strings, stop at end of document,
  and the controls OpenAI's and vLLM's clients send: logit bias, presence, frequency and repetition penalties.
- `apply_controls`: logits [b, V] -> the logits those controls make of them, each row with its own settings (and
  its own `TokenHistory`: the tokens it generated, the tokens of its prompt); before `sample_next`, greedy too.
  Log-probabilities handed to callers are taken from the logits before it (the model's own distribution).
- `apply_token_bitmask`: keep, in some rows of logits [b, V], only the tokens a packed bitmask allows (what a
  grammar lets come next: `neoxray.platform.inference.structured` computes the bits); in place, before
  `apply_controls`, so log-probabilities handed to callers are those of the distribution the tokens can come from.
- `sample_next`: logits [b, V] -> next ids [b], each row from its own generator (`seeded_generator`).
- `StopChecker`: the finish reason after a new token ('stop' at the end-of-document token or a stop string,
  'length' at the token budget), where a stop string cuts the text, and how much of a streamed text is safe to
  hand out (not the start of a stop string, not half a character).
- `IncrementalDetokenizer`: the text of the generated tokens so far, decoding only the tokens after the last
  complete character (byte-level BPE spells one character over several tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from neoxray.errors import NeoxrayError

REPLACEMENT = "\ufffd"
"""What a decoder yields for the bytes of a character that is not complete yet."""


class SamplingParamError(NeoxrayError):
    """A SamplingParams value out of range; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


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
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    """Token ids that end generation as the end-of-document token does ('stop'; the token is kept in the ids, its
    text left out), whatever `stop_at_eod` says: a chat template's own end of turn, vLLM's `stop_token_ids`."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> a bias in [-100, 100] added to its logit before anything else (OpenAI's logit_bias)."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted from the logit of every token this sequence has generated (OpenAI's)."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: times how often this sequence has generated a token, subtracted from its logit (OpenAI's)."""
    repetition_penalty: float = 1.0
    """> 0, 1 is off (vLLM's and transformers' CTRL penalty): for every token of the prompt or generated so far,
    a positive logit is divided by it and a negative one multiplied."""

    def validate(self) -> SamplingParams:
        def bad(name: str, rule: str, value) -> SamplingParamError:
            return SamplingParamError(f"{name} must be {rule}, got {value}", name)

        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", ">= 0", self.max_new_tokens)
        if self.temperature < 0:
            raise bad("temperature", ">= 0", self.temperature)
        if self.top_k < 0:
            raise bad("top_k", ">= 0", self.top_k)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]", self.top_p)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]", getattr(self, name))
        if not 0.0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "> 0", self.repetition_penalty)
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise bad("stop_token_ids", "token ids (integers >= 0)", repr(t))
        for t, b in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise bad("logit_bias", "keyed by token ids (integers >= 0)", repr(t))
            if not -100.0 <= b <= 100.0:
                raise bad("logit_bias", "in [-100, 100]", f"{b} for token {t}")
        return self

    @property
    def uses_penalties(self) -> bool:
        """Whether the tokens seen so far change this sequence's logits (it needs a `TokenHistory`)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def uses_controls(self) -> bool:
        return bool(self.logit_bias) or self.uses_penalties

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


class TokenHistory:
    """What one sequence's penalties look at, on the logits' device: `counts` [V] fp32, how often each token was
    generated so far; `in_prompt` [V] bool, the tokens of its prompt. `append` counts a new token without waiting
    for the device."""

    def __init__(self, prompt_ids: Sequence[int], vocab_size: int, device):
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.in_prompt[torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)] = True

    def append(self, token: int) -> None:
        self.counts[token] += 1


def apply_controls(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory | None]
) -> torch.Tensor:
    """logits [b, V] -> the logits to sample from (a new tensor; `logits` itself when no row uses a control):
    per row, logit_bias added, then for the tokens of the prompt or generated so far the repetition penalty
    (positive logits divided by it, negative ones multiplied), then presence_penalty x (count > 0) +
    frequency_penalty x count subtracted (counts of generated tokens). `histories[i]`: row i's TokenHistory,
    needed where its params use penalties. A batch where no row uses any control costs one pass over params."""
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    penalised = [i for i, p in enumerate(params) if p.uses_penalties]
    if not biased and not penalised:
        return logits
    out = logits.clone()
    dev = logits.device
    if biased:
        rows, toks, vals = [], [], []
        for i in biased:
            rows += [i] * len(params[i].logit_bias)
            toks += params[i].logit_bias.keys()
            vals += params[i].logit_bias.values()
        at = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
        out.index_put_(at, torch.tensor(vals, dtype=out.dtype, device=dev), accumulate=True)
    if penalised:
        idx = torch.tensor(penalised, device=dev)
        x = out[idx]  # [r, V]
        counts = torch.stack([histories[i].counts for i in penalised])  # [r, V]
        generated = counts > 0
        seen = generated | torch.stack([histories[i].in_prompt for i in penalised])

        def column(name):
            return torch.tensor([getattr(params[i], name) for i in penalised], dtype=x.dtype, device=dev)[:, None]

        rep = column("repetition_penalty")
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - column("frequency_penalty") * counts - column("presence_penalty") * generated
        out[idx] = x
    return out


def apply_token_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor, fallback: int) -> None:
    """In place: in each of `rows` of logits [b, V], every token whose bit is clear in that row's line of
    `bitmask` [len(rows), >= ceil(V / 32)] int32 becomes -inf (bit j of word w is token 32w + j, the layout
    llguidance and xgrammar fill). A row that allows no token keeps `fallback` (the end-of-document token), so
    that sampling from it stays defined."""
    dev, vocab = logits.device, logits.shape[-1]
    bits = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32, device=dev)
    blocked = (bitmask.to(dev)[:, :, None] & bits).eq(0).flatten(1)[:, :vocab]  # [r, V]
    blocked[:, fallback] &= ~blocked.all(dim=-1)
    if len(rows) == logits.shape[0] and list(rows) == list(range(len(rows))):
        logits.masked_fill_(blocked, float("-inf"))
    else:
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=dev)
        logits[idx] = logits[idx].masked_fill(blocked, float("-inf"))


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
    (when `params.stop_at_eod`; the token itself is kept, as transformers does) or one of `params.stop_token_ids`
    (always), 'length' when `budget` new
    tokens exist, else None. Stop strings are looked for in the decoded text: `find` returns where the earliest
    one starts (the text is cut there and the reason is 'stop'); `safe_end` is how much of a still-growing text
    may be handed out now (a tail that could be the start of a stop string, or an incomplete character, waits).
    """

    def __init__(self, params: SamplingParams, eod_id: int, budget: int):
        self.stop_at_eod = params.stop_at_eod
        self.eod_id = eod_id
        self.stop_ids = frozenset(params.stop_token_ids)
        self.budget = budget
        self.stops = tuple(s for s in params.stop if s)
        self.longest = max(map(len, self.stops), default=0)

    def after_token(self, token: int, n_generated: int) -> str | None:
        if (token == self.eod_id and self.stop_at_eod) or token in self.stop_ids:
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
    """The text of a growing list of generated tokens, end-of-document tokens (and `skip`: stop tokens) left out.
    Only the tokens after the last complete character are decoded again at each call, so the cost per token stays
    constant."""

    def __init__(self, tokenizer, eod_id: int, skip: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self.left_out = frozenset((eod_id, *skip))
        self._text = ""  # text of the first _done ids, ending on a complete character
        self._done = 0

    def text(self, generated: Sequence[int]) -> str:
        """The decoded text of `generated` (the same list, grown since the previous call)."""
        if self.tokenizer is None:
            return ""
        ids = [t for t in generated[self._done :] if t not in self.left_out]
        tail = self.tokenizer.decode(ids)
        if tail.endswith(REPLACEMENT):  # a character still being spelled: decode these tokens again next time
            return self._text + tail
        self._text += tail
        self._done = len(generated)
        return self._text
