"""From logits to what callers receive: the output side of the inference engine.

For each request that gets a new token this step: the padding rows of the vocabulary are masked out, and so,
for the requests that ask for structured output (`Request.structured`), are the tokens their grammar does not
allow next (`neoxray.platform.inference.structured`: a packed mask per such row, computed by llguidance and
applied by `neoxray.model.decoding.apply_token_bitmask`; the other rows are untouched), the requests' logit bias
and penalties are applied (`neoxray.model.decoding.apply_controls`, each row its own, from the tokens its
`TokenHistory` counted; skipped when no request in the batch uses them), the token is drawn
(`neoxray.model.decoding.sample_next`, each request from its own generator, so a seed reproduces whatever else
is in the batch), its log-probability and the k most likely alternatives are taken from the fp32 logits as the
model gave them (before bias, penalties and temperature, as vLLM's default: the model's own distribution, the
one prompt log-probabilities and scoring report too; with the padding rows and a grammar's disallowed tokens
masked out, as vLLM applies its grammar bitmask before its sampler takes log-probabilities, so a chosen token's
log-probability is never -inf), and an `Output` is made: the finish reason and the cut at a stop string come
from the request's `StopChecker` (and from its grammar: once the text is complete and nothing may follow, or
the end of document that completes it is drawn, the request ends with 'stop', whatever `stop_at_eod` says), the
text from its `IncrementalDetokenizer`, and a tail that could still be the start of a stop string or an
incomplete character is held back until the next token (`StopChecker.safe_end`). These are the rules
`neoxray generate` uses, so both stop at exactly the same place.

Every token id that becomes text becomes it here, once: the generated text, and for a request that asks
(`Request.token_text`: an OpenAI completion's log-probabilities and echo) the prompt's text, each log-probability
entry's token text, its alternatives' and its character offset (`text_offsets`), so that the serving layer,
which only tokenizes, never decodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from neoxray.model.decoding import (
    REPLACEMENT,
    IncrementalDetokenizer,
    StopChecker,
    TokenHistory,
    apply_controls,
    apply_token_bitmask,
    sample_next,
    seeded_generator,
)
from neoxray.platform.inference.request import Output, TokenLogprob
from neoxray.platform.inference.sequence import SequenceState
from neoxray.platform.inference.structured import GrammarCompiler


class OutputProcessor:
    """Sampling, stop rules, text and log-probabilities for the requests of one engine."""

    def __init__(self, tokenizer, eod_id: int, vocab_limit: int, max_seq_len: int, device, vocab_size: int):
        """`vocab_size`: the width of the model's logits (`vocab_limit` and the padding rows after it)."""
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self.vocab_limit = vocab_limit
        """Token ids from here on are padding rows of the embedding: never sampled."""
        self.max_seq_len = max_seq_len
        self.device = device
        self.grammars = GrammarCompiler(tokenizer, vocab_size) if tokenizer is not None else None
        """Structured output's grammars (None without a tokenizer: such requests are refused on intake)."""
        self._token_text = lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t])) if tokenizer is not None else None

    def start(self, s: SequenceState) -> None:
        """Set up an admitted request's generator, stop rules and detokenizer."""
        s.decoding.generator = seeded_generator(s.req.sampling, self.device)
        s.decoding.stop = StopChecker(
            s.req.sampling, self.eod_id, min(s.req.max_tokens, self.max_seq_len - s.prompt_len)
        )
        s.decoding.detokenizer = IncrementalDetokenizer(self.tokenizer, self.eod_id, s.req.sampling.stop_token_ids)
        if s.req.structured is not None and s.req.max_tokens > 0:
            s.decoding.grammar = self.grammars.matcher(s.req.structured)
        if s.req.prompt_logprobs:
            if self._spells(s):
                s.decoding.prompt_offsets = text_offsets(self._decode, s.req.prompt_ids)
            s.decoding.prompt_lp = [self._entry(s, None, 0, 0)] if s.req.score_from == 0 else []

    def add_prompt_logprobs(self, s: SequenceState, logp: torch.Tensor, start: int) -> None:
        """logp [n, V]: log-probabilities after the prompt positions start .. start + n - 1 of `s`; records those
        of the prompt tokens that follow them."""
        for j in range(logp.shape[0]):
            at = start + 1 + j  # a target inside the prompt
            if s.req.score_from <= at < s.prompt_len:
                s.decoding.prompt_lp.append(
                    self._entry(s, logp[j], at, s.decoding.prompt_offsets[at] if s.decoding.prompt_offsets else None)
                )

    def process(self, seqs: list[SequenceState], logits: torch.Tensor) -> list[Output]:
        """logits [r, V] fp32 for the next token of each of seqs -> the Output of each (finish_reason set for
        those that end now; a scoring-only request ends here without a token)."""
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")  # padding rows of the embedding never come out
        constrained = [i for i, s in enumerate(seqs) if s.decoding.grammar is not None]
        if constrained:  # structured output: what each grammar allows next, only in its own row
            bitmask = self.grammars.fill_bitmask([seqs[i].decoding.grammar for i in constrained])
            apply_token_bitmask(logits, constrained, bitmask, self.grammars.eod_id)
        params = [s.req.sampling for s in seqs]
        controlled = apply_controls(logits, params, self._histories(seqs, logits))
        next_ids = sample_next(controlled, params, [s.decoding.generator for s in seqs]).tolist()
        want_lp = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        logp = F.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        lp_row = {i: r for r, i in enumerate(want_lp)}
        now = time.perf_counter()
        outs = []
        for i, (s, tok) in enumerate(zip(seqs, next_ids)):
            if s.req.max_tokens == 0:  # scoring only: the prompt is done, nothing is generated
                outs.append(self.final(s, "length"))
                continue
            grammar = s.decoding.grammar
            refused = grammar.advance(tok) if grammar is not None else None
            if refused is not None:  # cannot happen with the mask applied; never a silent wrong document
                outs.append(self.final(s, "abort", error=f"structured output: {refused}"))
                continue
            s.tokens.append(tok)
            s.decoding.generated.append(tok)
            if s.decoding.history is not None:
                s.decoding.history.append(tok)
            if i in lp_row:
                s.decoding.pending_lp.append(self._entry(s, logp[lp_row[i]], len(s.tokens) - 1, s.decoding.text_chars))
            first = s.decoding.first_token_at is None
            if first:
                s.decoding.first_token_at = now
            reason = s.decoding.stop.after_token(tok, len(s.decoding.generated))
            if grammar is not None and grammar.done:
                reason = "stop"
            outs.append(self._output(s, reason, first))
        return outs

    def _histories(self, seqs: list[SequenceState], logits: torch.Tensor) -> list[TokenHistory | None]:
        """Each sequence's TokenHistory, made on its first sampled token for those whose penalties need one."""
        for s in seqs:
            if s.decoding.history is None and s.req.sampling.uses_penalties:
                s.decoding.history = TokenHistory(s.req.prompt_ids, logits.shape[-1], logits.device)
        return [s.decoding.history for s in seqs]

    def _output(self, s: SequenceState, reason: str | None, first: bool) -> Output:
        """The Output for the newest token of `s`: its text since the previous Output (cut at a stop string,
        which ends the request; while running, less whatever could still change)."""
        text = s.decoding.detokenizer.text(s.decoding.generated)
        s.decoding.text_chars = len(text)
        hit = s.decoding.stop.find(text, s.decoding.emitted_chars)
        if hit >= 0:
            text, reason = text[:hit], "stop"
        if reason is None:
            text = text[: s.decoding.stop.safe_end(text, s.decoding.emitted_chars)]
        delta = text[s.decoding.emitted_chars :]
        s.decoding.emitted_chars = max(s.decoding.emitted_chars, len(text))
        out = Output(
            request_id=s.req.request_id,
            token_ids=[s.decoding.generated[-1]],
            text=delta,
            logprobs=s.decoding.pending_lp if s.req.logprobs is not None else None,
            prompt_tokens=s.prompt_len,
            generated_tokens=len(s.decoding.generated),
        )
        if first:
            self._with_prompt(s, out)
            out.time_to_first_token_s = s.decoding.first_token_at - s.arrival
        s.decoding.pending_lp = []
        if reason is not None:
            out.finish_reason = reason
            out.latency_s = time.perf_counter() - s.arrival
        return out

    def final(self, s: SequenceState, reason: str, error: str | None = None) -> Output:
        """The last Output of a request that ends without a new token (abort, scoring only, engine failure)."""
        out = Output(
            request_id=s.req.request_id,
            token_ids=[],
            text="",
            finish_reason=reason,
            prompt_tokens=s.prompt_len,
            generated_tokens=len(s.decoding.generated),
            error=error,
            latency_s=time.perf_counter() - s.arrival,
            logprobs=[] if s.req.logprobs is not None else None,
        )
        if not s.decoding.generated:
            self._with_prompt(s, out)
        return out

    def _with_prompt(self, s: SequenceState, out: Output) -> None:
        """What a request's first Output carries about its prompt."""
        out.prompt_logprobs = s.decoding.prompt_lp
        if self._spells(s):
            out.prompt_text = self._decode(s.req.prompt_ids)

    def _entry(self, s: SequenceState, logp_row: torch.Tensor | None, at: int, offset: int | None) -> TokenLogprob:
        """The log-probability entry of the token at position `at` of `s`, and of the `logprobs` most likely
        tokens, from one row of log-probabilities [V] (None: the first prompt token, which has no context);
        spelled out (starting at `offset` in its text) when the request asks for it."""
        token, k = s.tokens[at], s.req.logprobs or 0
        top = []
        if logp_row is not None and k:
            vals, idx = logp_row.topk(k)
            top = list(zip(idx.tolist(), vals.tolist()))
        entry = TokenLogprob(token, None if logp_row is None else float(logp_row[token]), top)
        if self._spells(s):
            entry.text, entry.offset = self._token_text(token), offset
            entry.top_text = [self._token_text(t) for t, _ in top]
        return entry

    def _spells(self, s: SequenceState) -> bool:
        return s.req.token_text and self._token_text is not None

    def _decode(self, ids: Sequence[int]) -> str:
        return self._token_text(ids[0]) if len(ids) == 1 else self.tokenizer.decode(ids)


def text_offsets(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> list[int]:
    """Where each token of `ids` starts in their text: len(decode(ids[:i])) for each i. Only the tokens since the
    last one that ended on a complete character are decoded again, so each token costs one short decode, not a
    decode of everything before it."""
    offsets, done, chars = [], 0, 0
    for i in range(len(ids)):
        offsets.append(chars + (len(decode(ids[done:i])) if i > done else 0))
        piece = decode(ids[done : i + 1])
        if not piece.endswith(REPLACEMENT):  # a complete character: later tokens add to it
            chars, done = chars + len(piece), i + 1
    return offsets
