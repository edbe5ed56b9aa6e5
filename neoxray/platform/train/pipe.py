"""The layer list of a training run as pipeline pieces: the embedding, each transformer layer, the final norm with
the output head. DeepSpeed's `PipelineModule` builds only its stage's share of them; each piece is made on the
meta device, rewritten by `neoxray.model.tensor_parallel.parallelize`, materialised, and initialised
layout-independently (or loaded). Each piece knows the plain single-model names of its parameters.

A LoRA run (`lora=(spec, adapter_loader)`) then gives each layer's target linears their adapters
(`neoxray.model.lora.apply_lora`, initialised from the seed independently of the layout, or filled by
`adapter_loader` on resume) and freezes everything else: the base takes no gradients and no optimizer state."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from neoxray.model.config import ModelConfig
from neoxray.model.gptneox import Layer, rotary_cos_sin
from neoxray.model.init import init_parameters
from neoxray.model.lora import apply_lora, mark_only_lora_trainable
from neoxray.model.tensor_parallel import parallelize


class Piece(nn.Module):
    """A piece of the layer list. `prefix` maps its parameter names to the plain model's names."""

    prefix = ""

    def _finish(self, tp_group, seed, device, loader=None, lora=None):
        parallelize(self, tp_group)  # sharded params carry tp_dim and DeepSpeed's tensor_model_parallel flag
        self.to_empty(device=device)
        if loader is not None:
            loader(self)
        else:
            init_parameters(self, seed, prefix=self.prefix)
        if lora is not None:
            spec, adapter_loader = lora
            if isinstance(self, LayerPipe):
                apply_lora(self, spec, seed, prefix=self.prefix)
                if adapter_loader is not None:
                    adapter_loader(self)
            mark_only_lora_trainable(self)

    def canonical_parameters(self):
        for name, p in self.named_parameters():
            yield self.prefix + name, p


class EmbeddingPipe(Piece):
    def __init__(self, config: ModelConfig, tp_group, seed, device, loader=None, lora=None):
        super().__init__()
        with torch.device("meta"):
            self.embed_in = nn.Embedding(config.vocab_size, config.d_model)
        self._finish(tp_group, seed, device, loader, lora)

    def forward(self, input_ids):  # [b, s] -> [b, s, d]
        return self.embed_in(input_ids)


class LayerPipe(Layer, Piece):
    """One transformer layer as a pipeline piece: same parameters and names as `Layer`; computes its rotary
    tables from the sequence length, since only the hidden states travel between pipeline stages."""

    def __init__(self, config: ModelConfig, idx: int, tp_group, seed, device, loader=None, lora=None):
        with torch.device("meta"):
            Layer.__init__(self, config, idx)
        self.config = config
        self.prefix = f"layers.{idx}."
        self.activation_checkpointing = config.activation_checkpointing
        self._finish(tp_group, seed, device, loader, lora)

    def forward(self, x):  # [b, s, d] -> [b, s, d]
        pos = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = rotary_cos_sin(pos, self.config.rotary_dim, self.config.rotary_base, x.dtype)
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, cos, sin, use_reentrant=False)
        return super().forward(x, cos, sin)


class HeadPipe(Piece):
    def __init__(self, config: ModelConfig, tp_group, seed, device, loader=None, lora=None):
        super().__init__()
        with torch.device("meta"):
            self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)
            self.embed_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._finish(tp_group, seed, device, loader, lora)

    def forward(self, x):  # [b, s, d] -> logits [b, s, V / tp]
        return self.embed_out(self.final_layer_norm(x))


def no_decay(name: str) -> bool:
    """GPT-NeoX applies weight decay to weight matrices only: not to biases or LayerNorm parameters."""
    return name.endswith("bias") or "layernorm" in name or "layer_norm" in name
