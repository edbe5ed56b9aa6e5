"""ModelConfig and the named presets (GPT-NeoX-20B, the Pythia suite, tiny test sizes).

Everything here is plain data: no torch. Sizes follow the published Hugging Face configs of
EleutherAI/gpt-neox-20b and EleutherAI/pythia-*, and the GPT-NeoX-20B paper (Black et al., 2022, table 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from neoxray.errors import NeoxrayError

FUNCTION_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "vocab_size",
    "ffn_dim",
    "parallel_residual",
    "rotary_pct",
    "rotary_base",
    "layernorm_eps",
)
"""What a set of weights computes depends on these (`ffn_dim` is `intermediate_size` resolved)."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one GPT-NeoX model. Frozen: derive variants with `dataclasses.replace`."""

    n_layers: int
    """Number of transformer layers (L)."""
    d_model: int
    """Hidden size (d); every layer's residual stream width."""
    n_heads: int
    """Attention heads per layer; d_model must divide evenly into them."""
    vocab_size: int
    """Rows of the input embedding and the output head, already padded (50257 tokens -> 50432 for 20B)."""
    max_seq_len: int = 2048
    """Context length: the longest sequence the model is trained on and may attend over."""
    rotary_pct: float = 0.25
    """Fraction of each head's dimensions that carry rotary position embeddings (the rest carry none)."""
    rotary_base: float = 10000.0
    """Base of the rotary frequencies."""
    intermediate_size: int = 0
    """MLP hidden size; 0 means 4 * d_model, as GPT-NeoX uses."""
    parallel_residual: bool = True
    """x + attn(ln1(x)) + mlp(ln2(x)) when True (GPT-NeoX, Pythia); the sequential form when False."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (training only)."""
    tokenizer_vocab_size: int = 0
    """Real tokenizer size before padding (informational; 0 when unknown)."""
    bos_token_id: int = 0
    """Id of <|endoftext|>, which GPT-NeoX uses as both beginning and end of document."""
    eos_token_id: int = 0
    """Id of <|endoftext|> (the end-of-document token appended after every document)."""
    name: str = field(default="custom", compare=False)
    """Preset name this config came from (informational)."""

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise NeoxrayError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise NeoxrayError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise NeoxrayError(f"model.rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2:
            raise NeoxrayError(
                f"model.rotary_pct ({self.rotary_pct}) x head_dim ({self.head_dim}) must give an even "
                f"number of rotary dimensions, got {self.rotary_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size or 4 * self.d_model

    def num_parameters(self) -> int:
        """Exact parameter count (weights and biases of every linear, LayerNorms, embedding, head)."""
        d, f, v, n = self.d_model, self.ffn_dim, self.vocab_size, self.n_layers
        per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        return n * per_layer + 2 * v * d + 2 * d

    def matmul_parameters(self) -> int:
        """Parameters that take part in matrix multiplies: L * (4 d^2 + 2 d f) + d V (embedding lookup excluded)."""
        d, f = self.d_model, self.ffn_dim
        return self.n_layers * (4 * d * d + 2 * d * f) + d * self.vocab_size

    def train_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N_matmul + 12 L d seq (forward and backward, attention scores included)."""
        s = seq_len or self.max_seq_len
        return 6 * self.matmul_parameters() + 12 * self.n_layers * self.d_model * s

    def function_differences(self, other: ModelConfig) -> list[str]:
        """The fields that make `other` compute a different function from this config's weights (the
        architecture: shapes, residual form, rotary settings, LayerNorm epsilon), as "field: self vs other".
        Context length, token ids, activation checkpointing and the preset name change no computation."""
        out = []
        for name in FUNCTION_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} {mine} vs {theirs}")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NeoxrayError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


def pad_vocab(n_tokens: int, multiple: int = 128) -> int:
    """Megatron-style padding of the embedding rows to a multiple (128 x tensor-parallel size in GPT-NeoX)."""
    return -(-n_tokens // multiple) * multiple


def _neox_tokenizer(n_layers: int, d_model: int, n_heads: int, vocab_size: int = 50304, max_seq_len: int = 2048):
    """A model of the GPT-NeoX-20B tokenizer (50277 tokens; `vocab_size` is the padded embedding) with rotary
    embeddings on a quarter of each head: GPT-NeoX-20B and the Pythia suite."""
    return dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        rotary_pct=0.25,
        tokenizer_vocab_size=50277,
    )


# name: layers, d_model, heads (and the padded vocabulary where it is not 50304), one line each
_PRESETS: dict[str, dict] = {
    "neox-20b": _neox_tokenizer(44, 6144, 64, vocab_size=50432),
    "pythia-70m": _neox_tokenizer(6, 512, 8),
    "pythia-160m": _neox_tokenizer(12, 768, 12),
    "pythia-410m": _neox_tokenizer(24, 1024, 16),
    "pythia-1b": _neox_tokenizer(16, 2048, 8),
    "pythia-1.4b": _neox_tokenizer(24, 2048, 16),
    "pythia-2.8b": _neox_tokenizer(32, 2560, 32),
    "pythia-6.9b": _neox_tokenizer(32, 4096, 32, vocab_size=50432),
    "pythia-12b": _neox_tokenizer(36, 5120, 40, vocab_size=50688),
    # test and laptop sizes: `tiny` pairs with the 4096-token tokenizer trained on the bundled sample,
    # `tiny-neox` with the real GPT-NeoX-20B tokenizer, `tiny-seq` is the sequential-residual form.
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, vocab_size=4096, max_seq_len=256, rotary_pct=0.25),
    "tiny-neox": _neox_tokenizer(2, 64, 4, max_seq_len=256),
    "tiny-seq": dict(
        n_layers=2, d_model=64, n_heads=4, vocab_size=4096, max_seq_len=256, rotary_pct=1.0, parallel_residual=False
    ),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with field overrides applied (e.g. `vocab_size=`, `max_seq_len=`)."""
    if name not in _PRESETS:
        raise NeoxrayError(f"unknown model preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return ModelConfig(name=name, **{**_PRESETS[name], **overrides})
