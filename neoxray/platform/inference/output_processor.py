"""From logits to what callers receive: the output side of the inference engine.

For each request that gets a new token this step: the padding rows of the vocabulary are masked out, the token
is drawn (`neoxray.model.decoding.sample_next`, each request from its own generator, so a seed reproduces
whatever else is in the batch), its log-probability and the k most likely alternatives are taken from the fp32
logits, and an `Output` is made: the finish reason and the cut at a stop string come from the request's
`StopChecker`, the text from its `IncrementalDetokenizer`, and a tail that could still be the start of a stop
string or an incomplete character is held back until the next token (`StopChecker.safe_end`). These are the
rules `neoxray generate` uses, so both stop at exactly the same place.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from neoxray.model.decoding import IncrementalDetokenizer, StopChecker, sample_next, seeded_generator
from neoxray.platform.inference.request import Output, TokenLogprob
from neoxray.platform.inference.scheduler import SequenceState


class OutputProcessor:
    """Sampling, stop rules, text and log-probabilities for the requests of one engine."""

    def __init__(self, tokenizer, eod_id: int, vocab_limit: int, max_seq_len: int, device):
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self.vocab_limit = vocab_limit
        """Token ids from here on are padding rows of the embedding: never sampled."""
        self.max_seq_len = max_seq_len
        self.device = device

    def start(self, s: SequenceState) -> None:
        """Set up an admitted request's generator, stop rules and detokenizer."""
        s.generator = seeded_generator(s.req.sampling, self.device)
        s.stop = StopChecker(s.req.sampling, self.eod_id, min(s.req.max_tokens, self.max_seq_len - s.prompt_len))
        s.detokenizer = IncrementalDetokenizer(self.tokenizer, self.eod_id)
        if s.req.prompt_logprobs:
            s.prompt_lp = [TokenLogprob(s.req.prompt_ids[0], None)] if s.req.score_from == 0 else []

    def add_prompt_logprobs(self, s: SequenceState, logp: torch.Tensor, start: int) -> None:
        """logp [n, V]: log-probabilities after the prompt positions start .. start + n - 1 of `s`; records those
        of the prompt tokens that follow them."""
        k = s.req.logprobs or 0
        for j, t in enumerate(s.tokens[start + 1 : start + logp.shape[0] + 1]):  # targets inside the prompt
            if start + 1 + j >= s.req.score_from:
                s.prompt_lp.append(_entry(logp[j], t, k))

    def process(self, seqs: list[SequenceState], logits: torch.Tensor) -> list[Output]:
        """logits [r, V] fp32 for the next token of each of seqs -> the Output of each (finish_reason set for
        those that end now; a scoring-only request ends here without a token)."""
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")  # padding rows of the embedding never come out
        next_ids = sample_next(logits, [s.req.sampling for s in seqs], [s.generator for s in seqs]).tolist()
        want_lp = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        logp = F.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        lp_row = {i: r for r, i in enumerate(want_lp)}
        now = time.perf_counter()
        outs = []
        for i, (s, tok) in enumerate(zip(seqs, next_ids)):
            if s.req.max_tokens == 0:  # scoring only: the prompt is done, nothing is generated
                outs.append(self.final(s, "length"))
                continue
            s.tokens.append(tok)
            s.generated.append(tok)
            if i in lp_row:
                s.pending_lp.append(_entry(logp[lp_row[i]], tok, s.req.logprobs))
            first = s.first_token_at is None
            if first:
                s.first_token_at = now
            outs.append(self._output(s, s.stop.after_token(tok, len(s.generated)), first))
        return outs

    def _output(self, s: SequenceState, reason: str | None, first: bool) -> Output:
        """The Output for the newest token of `s`: its text since the previous Output (cut at a stop string,
        which ends the request; while running, less whatever could still change)."""
        text = s.detokenizer.text(s.generated)
        hit = s.stop.find(text, s.emitted_chars)
        if hit >= 0:
            text, reason = text[:hit], "stop"
        if reason is None:
            text = text[: s.stop.safe_end(text, s.emitted_chars)]
        delta = text[s.emitted_chars :]
        s.emitted_chars = max(s.emitted_chars, len(text))
        out = Output(
            request_id=s.req.request_id,
            token_ids=[s.generated[-1]],
            text=delta,
            logprobs=s.pending_lp if s.req.logprobs is not None else None,
            prompt_tokens=s.prompt_len,
            generated_tokens=len(s.generated),
        )
        if first:
            out.prompt_logprobs = s.prompt_lp
            out.time_to_first_token_s = s.first_token_at - s.arrival
        s.pending_lp = []
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
            generated_tokens=len(s.generated),
            error=error,
            latency_s=time.perf_counter() - s.arrival,
            logprobs=[] if s.req.logprobs is not None else None,
        )
        if not s.generated:
            out.prompt_logprobs = s.prompt_lp
        return out


def _entry(logp_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The log-probability of `token` and the k most likely tokens, from one row of log-probabilities [V]."""
    top = []
    if k:
        vals, idx = logp_row.topk(k)
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token, float(logp_row[token]), top)
