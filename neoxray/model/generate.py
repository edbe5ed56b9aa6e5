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
from neoxray.model.decoding import IncrementalDetokenizer, SamplingParams, StopChecker, sample_next, seeded_generator
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
    the tokenizer's (or the model config's eos_token_id)."""
    if not prompts:
        return []
    b = len(prompts)
    params = SamplingParams() if params is None else params
    params = [params] * b if isinstance(params, SamplingParams) else list(params)
    if len(params) != b:
        raise NeoxrayError(f"{len(params)} sampling params for {b} prompts")
    for p in params:
        p.validate()
    cfg = model.config
    if eod_id is None:
        eod_id = tokenizer.eod_id if tokenizer is not None else cfg.eos_token_id
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise NeoxrayError(f"prompt {i} is empty")
        if n >= cfg.max_seq_len:
            raise NeoxrayError(
                f"prompt {i} has {n} tokens; the model's context is {cfg.max_seq_len} "
                f"(at most {cfg.max_seq_len - 1} prompt tokens leave room for one new token)"
            )
    budget = [min(p.max_new_tokens, cfg.max_seq_len - n) for p, n in zip(params, lengths)]
    if any(p.stop for p in params) and tokenizer is None:
        raise NeoxrayError("stop strings need a tokenizer")

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    P, steps = max(lengths), max(budget)
    ids = torch.zeros((b, P), dtype=torch.long)  # left padding; masked out, so any id will do
    valid = torch.zeros((b, P), dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        ids[i, P - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid[i, P - len(prompt) :] = True
    ids, valid = ids.to(device), valid.to(device)
    padded = not bool(valid.all())
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [b, P]

    cache = KVCache.for_model(model, b, P + max(steps, 1))
    mask = None
    if padded:  # causal & key is not padding; a padding query sees itself so no row is all -inf
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        mask = (causal[None] & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)[None]
        mask = mask[:, None]  # [b, 1, P, P]
    logits = model(ids, positions, mask, cache)[:, -1].float()  # [b, V]
    cache.length = P

    generators = [seeded_generator(p, device) for p in params]
    checkers = [StopChecker(p, eod_id, n) for p, n in zip(params, budget)]
    detok = [IncrementalDetokenizer(tokenizer, eod_id) for _ in range(b)]
    new: list[list[int]] = [[] for _ in range(b)]
    texts: list[str | None] = [None] * b  # set when a stop string cut the text
    finish: list[str | None] = ["length" if n == 0 else None for n in budget]
    searched = [0] * b  # characters of each text already searched for stop strings
    last_pos = positions[:, -1]
    for _ in range(steps):
        if all(finish):
            break
        nxt = sample_next(logits, params, generators)  # [b]
        tokens = nxt.tolist()
        for i, tok in enumerate(tokens):
            if finish[i]:
                continue
            new[i].append(tok)
            finish[i] = checkers[i].after_token(tok, len(new[i]))
            if checkers[i].stops:
                text = detok[i].text(new[i])
                hit = checkers[i].find(text, searched[i])
                searched[i] = len(text)
                if hit >= 0:
                    texts[i], finish[i] = text[:hit], "stop"
        if all(finish):
            break
        feed = torch.tensor([0 if finish[i] else t for i, t in enumerate(tokens)], device=device)[:, None]
        last_pos = last_pos + 1
        step_mask = None
        if padded:
            keys = torch.cat([valid, torch.ones(b, cache.length - P + 1, dtype=torch.bool, device=device)], 1)
            step_mask = keys[:, None, None, :]  # [b, 1, 1, t]
        logits = model(feed, last_pos[:, None], step_mask, cache)[:, -1].float()
        cache.length += 1

    model.train(was_training)
    results = []
    for i in range(b):
        text = texts[i]
        if text is None:
            text = detok[i].text(new[i])
        results.append(Generation(token_ids=new[i], text=text, finish_reason=finish[i] or "length"))
    return results


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
