"""Incremental decoding with a key/value cache, sampling, and scoring.

A batch of prompts of different lengths is left-padded; each sequence gets its own position ids and the
padding is masked out of attention, so every sequence decodes exactly as it would alone. Prefill runs the
prompts once, then each step feeds one new token per sequence and attends over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from neoxray.errors import NeoxrayError
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
    def for_model(cls, model: GPTNeoX, batch: int, max_len: int) -> "KVCache":
        p = next(model.parameters())
        c = model.config
        n_local_heads = model.layers[0].attention.query_key_value.out_features // (3 * c.head_dim)
        return cls(c.n_layers, batch, n_local_heads, max_len, c.head_dim, p.device, p.dtype)

    def update(self, layer_idx, k, v):
        end = self.length + k.shape[2]
        if end > self.k[layer_idx].shape[2]:
            raise NeoxrayError(f"KV cache overflow: {end} positions > {self.k[layer_idx].shape[2]}")
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


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

    def validate(self) -> "SamplingParams":
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


@dataclass
class Generation:
    token_ids: list[int]
    """The new tokens (an end-of-document token that ended generation is included, as transformers does)."""
    text: str
    """Decoded new tokens, cut before a stop string; special tokens left out."""
    finish_reason: str
    """'stop' (end of document or a stop string) or 'length' (max_new_tokens or the context was reached)."""


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


def _generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@torch.no_grad()
def generate(
    model: GPTNeoX,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    tokenizer=None,
    eod_id: int | None = None,
) -> list[Generation]:
    """Decode each prompt (token ids). `tokenizer` decodes text and checks stop strings; `eod_id` defaults to
    the tokenizer's (or the model config's eos_token_id)."""
    if not prompts:
        return []
    b = len(prompts)
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
        ids[i, P - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid[i, P - len(prompt):] = True
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

    generators = [_generator(p.seed, device) for p in params]
    new: list[list[int]] = [[] for _ in range(b)]
    texts: list[str | None] = [None] * b  # set when a stop string cut the text
    finish: list[str | None] = [None] * b
    for i in range(b):
        if budget[i] == 0:
            finish[i] = "length"
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
            if tok == eod_id and params[i].stop_at_eod:
                finish[i] = "stop"
            elif params[i].stop:
                text = tokenizer.decode(new[i])
                hit = min((text.find(s) for s in params[i].stop if s and s in text), default=-1)
                if hit >= 0:
                    texts[i], finish[i] = text[:hit], "stop"
            if not finish[i] and len(new[i]) >= budget[i]:
                finish[i] = "length"
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
            text = tokenizer.decode([t for t in new[i] if t != eod_id]) if tokenizer is not None else ""
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
