"""Incremental decoding with a key/value cache, sampling, and scoring.

A batch of prompts of different lengths is left-padded; each sequence gets its own position ids and the
padding is masked out of attention, so every sequence decodes exactly as it would alone. Prefill runs the
prompts once, then each step feeds one new token per sequence and attends over the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import (
    IncrementalDetokenizer,
    SamplingParams,
    StopChecker,
    TokenHistory,
    apply_controls,
    sample_next,
    seeded_generator,
)
from neoxray.model.gptneox import GPTNeoX


class KVCache:
    """Preallocated keys and values for every layer: [b, h, max_len, hd] each. `length` positions are filled;
    attention writes its new keys after them (`update`), and the caller advances `length` after the forward."""

    def __init__(self, n_layers, batch, n_heads, max_len, head_dim, device, dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0

    @classmethod
    def for_model(cls, model: GPTNeoX, batch: int, max_len: int) -> KVCache:
        p = next(model.parameters())
        c = model.config
        n_local_heads = model.layers[0].attention.query_key_value.out_features // (3 * c.head_dim)
        return cls(c.n_layers, batch, n_local_heads, max_len, c.head_dim, p.device, p.dtype)

    def update(self, layer_idx, k, v):
        end = self.length + k.shape[2]
        if end > self.k[layer_idx].shape[2]:
            raise NeoxrayError(f"KV cache overflow: {end} positions > {self.k[layer_idx].shape[2]}")
        self.k[layer_idx][:, :, self.length : end] = k
        self.v[layer_idx][:, :, self.length : end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


@dataclass
class Generation:
    token_ids: list[int]
    """The new tokens (an end-of-document token that ended generation is included, as transformers does)."""
    text: str
    """Decoded new tokens, cut before a stop string; special tokens left out."""
    finish_reason: str
    """'stop' (end of document or a stop string) or 'length' (max_new_tokens or the context was reached)."""


@torch.no_grad()
def generate(
    model: GPTNeoX,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    tokenizer=None,
    eod_id: int | None = None,
) -> list[Generation]:
    """Decode each prompt (token ids). `tokenizer` decodes text and checks stop strings; `eod_id` defaults to
    the tokenizer's (or the model config's eos_token_id). Prefill the left-padded batch once, then one token per
    unfinished sequence per step."""
    if not prompts:
        return []
    params = _params_per_prompt(params, len(prompts))
    if eod_id is None:
        eod_id = tokenizer.eod_id if tokenizer is not None else model.config.eos_token_id
    budget = _token_budgets(prompts, params, model.config.max_seq_len, tokenizer)
    for p in params:
        if any(t >= model.config.vocab_size for t in p.logit_bias):
            raise NeoxrayError(f"logit_bias has token ids outside the vocabulary [0, {model.config.vocab_size})")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = _LeftPadded(prompts, device)
    cache = KVCache.for_model(model, len(prompts), batch.width + max(max(budget), 1))
    logits = model(batch.ids, batch.positions, batch.prefill_mask(), cache)[:, -1].float()  # [b, V]
    cache.length = batch.width
    rows = [_Row(p, eod_id, n, tokenizer) for p, n in zip(params, budget)]
    for row, p, prompt in zip(rows, params, prompts):
        if p.uses_penalties:
            row.history = TokenHistory(prompt, logits.shape[-1], device)
    _decode(model, batch, cache, logits, params, rows, max(budget))
    model.train(was_training)
    return [row.result() for row in rows]


def _params_per_prompt(params, b: int) -> list[SamplingParams]:
    """One validated SamplingParams per prompt (one given for all, or one each)."""
    params = SamplingParams() if params is None else params
    params = [params] * b if isinstance(params, SamplingParams) else list(params)
    if len(params) != b:
        raise NeoxrayError(f"{len(params)} sampling params for {b} prompts")
    for p in params:
        p.validate()
    return params


def _token_budgets(prompts, params: list[SamplingParams], context: int, tokenizer) -> list[int]:
    """New tokens each prompt may get: max_new_tokens, cut to what is left of the context. Empty prompts, prompts
    that fill the context and stop strings without a tokenizer are refused."""
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        if n == 0:
            raise NeoxrayError(f"prompt {i} is empty")
        if n >= context:
            raise NeoxrayError(
                f"prompt {i} has {n} tokens; the model's context is {context} "
                f"(at most {context - 1} prompt tokens leave room for one new token)"
            )
    if any(p.stop for p in params) and tokenizer is None:
        raise NeoxrayError("stop strings need a tokenizer")
    return [min(p.max_new_tokens, context - len(prompt)) for p, prompt in zip(params, prompts)]


class _LeftPadded:
    """Prompts of different lengths as one left-padded batch [b, P]: which positions hold a token (`valid`),
    each sequence's own position ids, and the attention masks that keep padding out."""

    def __init__(self, prompts, device):
        b, self.width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((b, self.width), dtype=torch.long)  # left padding; masked out, so any id will do
        valid = torch.zeros((b, self.width), dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            ids[i, self.width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            valid[i, self.width - len(prompt) :] = True
        self.ids, self.valid, self.device = ids.to(device), valid.to(device), device
        self.padded = not bool(self.valid.all())
        self.positions = (self.valid.long().cumsum(-1) - 1).clamp(min=0)  # [b, P]

    def prefill_mask(self) -> torch.Tensor | None:
        """[b, 1, P, P]: causal and the key is not padding; a padding query sees itself so no row is all -inf.
        None without padding (plain causal attention)."""
        if not self.padded:
            return None
        P, dev = self.width, self.device
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        mask = (causal[None] & self.valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
        return mask[:, None]

    def step_mask(self, cache_length: int) -> torch.Tensor | None:
        """[b, 1, 1, t] for one new token per sequence over the cache's t positions (padding left out)."""
        if not self.padded:
            return None
        new = torch.ones(self.valid.shape[0], cache_length - self.width + 1, dtype=torch.bool, device=self.device)
        return torch.cat([self.valid, new], 1)[:, None, None, :]


class _Row:
    """One sequence's decoding: its stop rules, the tokens it got, the text a stop string cut, why it finished."""

    def __init__(self, params: SamplingParams, eod_id: int, budget: int, tokenizer):
        self.checker = StopChecker(params, eod_id, budget)
        self.detok = IncrementalDetokenizer(tokenizer, eod_id, params.stop_token_ids)
        self.new: list[int] = []
        self.text: str | None = None  # set when a stop string cut the text
        self.finish: str | None = "length" if budget == 0 else None
        self.searched = 0  # characters of the text already searched for stop strings
        self.history: TokenHistory | None = None  # with penalties: the tokens its prompt holds and it generated

    def take(self, token: int) -> None:
        """A sampled token: kept, then the stop rules (end of document, budget, stop strings) say whether it ends."""
        self.new.append(token)
        if self.history is not None:
            self.history.append(token)
        self.finish = self.checker.after_token(token, len(self.new))
        if self.checker.stops:
            text = self.detok.text(self.new)
            hit = self.checker.find(text, self.searched)
            self.searched = len(text)
            if hit >= 0:
                self.text, self.finish = text[:hit], "stop"

    def result(self) -> Generation:
        text = self.text if self.text is not None else self.detok.text(self.new)
        return Generation(token_ids=self.new, text=text, finish_reason=self.finish or "length")


def _decode(model, batch: _LeftPadded, cache: KVCache, logits, params, rows: list[_Row], steps: int) -> None:
    """Sample a token for every unfinished row (after its logit bias and penalties), then feed them back (finished
    rows feed a dummy 0) through the cache, until every row has finished or `steps` tokens were drawn."""
    generators = [seeded_generator(p, batch.device) for p in params]
    last_pos = batch.positions[:, -1]
    for _ in range(steps):
        if all(row.finish for row in rows):
            break
        logits = apply_controls(logits, params, [row.history for row in rows])
        tokens = sample_next(logits, params, generators).tolist()  # [b]
        for row, token in zip(rows, tokens):
            if not row.finish:
                row.take(token)
        if all(row.finish for row in rows):
            break
        feed = torch.tensor([0 if row.finish else t for row, t in zip(rows, tokens)], device=batch.device)[:, None]
        last_pos = last_pos + 1
        logits = model(feed, last_pos[:, None], batch.step_mask(cache.length), cache)[:, -1].float()
        cache.length += 1


@torch.no_grad()
def score(model: GPTNeoX, token_ids: Sequence[int]) -> list[float | None]:
    """Log-probability of each token given the ones before it; the first token has none (None)."""
    n, ctx = len(token_ids), model.config.max_seq_len
    if n == 0:
        raise NeoxrayError("nothing to score: the text encodes to no tokens")
    if n > ctx:
        raise NeoxrayError(f"text has {n} tokens; the model's context is {ctx}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=device)[None]
    logprobs = F.log_softmax(model(ids)[0, :-1].float(), dim=-1)  # [n-1, V]
    chosen = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
    model.train(was_training)
    return [None] + chosen.tolist()
