"""GPT-NeoX, top to bottom as in Black et al. (2022), "GPT-NeoX-20B: An Open-Source Autoregressive Language Model".

Plain PyTorch: no distributed code here. Tensor parallelism rewrites these modules afterwards
(`neoxray.model.tensor_parallel.parallelize`) and pipeline parallelism splits the layer list
(`neoxray.platform.train.pipe`). Module and parameter names follow the
Hugging Face `GPTNeoXForCausalLM` layout (minus its `gpt_neox.` prefix), so interop is a rename, not a reshape.

Shapes: b batch, s query length, t key length (s plus cached tokens), d d_model, h heads (local to this rank
after tensor parallelism), hd head_dim, r rotary dims, f ffn_dim, V vocab rows.

Build recipe (how every caller makes a model):
    with torch.device("meta"):
        model = GPTNeoX(config)           # no memory touched
    ...parallelize here (tensor parallel rewrite, pipeline split)...
    model.to_empty(device=device)
    model.init_weights(seed)              # or load a checkpoint into it
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neoxray.model.config import ModelConfig
from neoxray.model.init import init_parameters


class KVCacheLike(Protocol):
    """What attention needs of a key/value cache (see `neoxray.model.generate.KVCache`)."""

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, h, s, hd] after the cached ones; return all keys and values [b, h, t, hd]."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al., 2021) on the first r = rotary_pct * hd dimensions of each head
# ---------------------------------------------------------------------------------------------------------
def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """cos, sin [b, 1, s, r] for positions [b, s] (computed in fp32, then cast, as GPT-NeoX does)."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim)
    )  # [r/2]
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [b, s, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, r]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, hd]: rotate the first r dims, pass the rest through unchanged."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Attention: fused QKV in GPT-NeoX's per-head layout, rotary, causal scaled-dot-product attention
# ---------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        # output rows grouped per head as [q_h | k_h | v_h] for h = 0..H-1 -- splitting rows by heads keeps
        # every head whole, which is what the column-parallel rewrite relies on.
        self.query_key_value = nn.Linear(config.d_model, 3 * config.d_model)  # d -> 3d
        self.dense = nn.Linear(config.d_model, config.d_model)  # d -> d (a "wang_init" output projection)

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCacheLike | None = None):
        b, s, _ = x.shape
        qkv = self.query_key_value(x)  # [b, s, 3 h hd]
        qkv = qkv.view(b, s, -1, 3 * self.head_dim).transpose(1, 2)  # [b, h, s, 3 hd]
        q, k, v = qkv.chunk(3, dim=-1)  # each [b, h, s, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [b, h, t, hd]
        if attn_mask is None:
            # training / prefill without padding: plain causal; one new token attends to everything cached
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # mask [b, 1, s, t] bool
        out = out.transpose(1, 2).reshape(b, s, -1)  # [b, s, h hd]
        return self.dense(out)  # [b, s, d]


# ---------------------------------------------------------------------------------------------------------
# MLP: d -> 4d -> d with exact (erf) GELU
# ---------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.d_model, config.ffn_dim)  # d -> f
        self.dense_4h_to_h = nn.Linear(config.ffn_dim, config.d_model)  # f -> d (a "wang_init" output projection)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # [b, s, d]


# ---------------------------------------------------------------------------------------------------------
# One layer: parallel residual  x + attn(ln1(x)) + mlp(ln2(x)),  or sequential  x += attn(ln1(x)); x += mlp(ln2(x))
# ---------------------------------------------------------------------------------------------------------
class Layer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)
        self.attention = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):  # x [b, s, d] -> [b, s, d]
        attn = self.attention(self.input_layernorm(x), cos, sin, attn_mask, cache)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------------------
# The model: embedding -> L layers -> final LayerNorm -> output head (untied from the embedding)
# ---------------------------------------------------------------------------------------------------------
class GPTNeoX(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = config.activation_checkpointing
        self.embed_in = nn.Embedding(config.vocab_size, config.d_model)  # V x d
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.n_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)
        self.embed_out = nn.Linear(config.d_model, config.vocab_size, bias=False)  # d -> V

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        """input_ids [b, s] -> final-LayerNorm output [b, s, d]."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None]  # [1, s], broadcast over the batch
        x = self.embed_in(input_ids)  # [b, s, d]
        cos, sin = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rotary_base, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache)
        return self.final_layer_norm(x)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        """input_ids [b, s] -> logits [b, s, V]."""
        return self.embed_out(self.hidden_states(input_ids, position_ids, attn_mask, cache))

    # -- initialisation as GPT-NeoX does it ---------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """small_init (std sqrt(2 / 5d), Nguyen & Salazar 2019) for every weight matrix and the embedding;
        wang_init (std 2 / (L sqrt(d))) for the two output projections of each layer; zero biases;
        LayerNorm weight 1, bias 0. Each parameter is drawn from its own generator seeded by (seed, its name),
        full-size on the CPU and then sliced, so every tensor/pipeline-parallel layout, device and dtype gets
        the same numbers (`neoxray.model.init`)."""
        init_parameters(self, seed, config=self.config)


def build_model(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int | None = 0) -> GPTNeoX:
    """Build on the meta device, materialise on `device`, and initialise (seed None: leave uninitialised,
    for a checkpoint to be loaded into)."""
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.to_empty(device=device)
    if seed is not None:
        model.init_weights(seed)
    return model.to(dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss over the labels that are not `ignore_index` (0 when there are none); logits [b, s, V]
    already aligned with labels [b, s]."""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)
