"""Weight-only quantization of an inference model with torchao (`--quantization`).

The weights of the model's linears (plain `nn.Linear`, the tensor-parallel `ColumnParallelLinear` /
`RowParallelLinear`, and their LoRA-carrying subclasses) are replaced, in place, by torchao tensor subclasses
holding integer data and scales; activations stay in the model's dtype, and `F.linear` on such a weight
dispatches to torchao's kernel (every linear of `neoxray.model.gptneox` and `neoxray.model.tensor_parallel`
calls `F.linear(x, self.weight, ...)`). What stays as it was:

    embed_in          an embedding (a table lookup, not a matmul): nothing to gain in compute, and torchao's
                      weight-only configs target linears
    LayerNorms, biases small, and sensitive to rounding
    LoRA slots        `neoxray.model.multi_lora` buffers (A, B, scale): in the model's dtype, as is the adapter
                      arithmetic; only the base weight under them is quantized

The vocabulary head `embed_out` IS quantized with int8: a [V, d] linear, a quarter of a Pythia-160M's weights,
and per-row int8 on it moved held-out perplexity by +0.009% (docs/benchmarks.md). With int4 it stays in the
model's dtype: int4 could not be measured here (no CPU kernel), and the head's rounding error lands directly on
every logit, so the cautious choice until a GPU measurement says otherwise.

Schemes (torchao 0.18):

    int8_weight_only  per-output-row symmetric int8 (`Int8WeightOnlyConfig`): any device. Its eager kernel
                      (torchao's code reads the same for CPU and CUDA; without torch.compile) converts the int8
                      weight to the activation dtype at each call: it saves memory, not time (on CPU decode
                      ran at 0.54 of fp32 for Pythia-160M, docs/benchmarks.md).
    int4_weight_only  groups of 128 input columns, asymmetric int4 (`Int4WeightOnlyConfig`, the tile-packed
                      "tinygemm" layout): CUDA with compute capability >= 8.0 and a bfloat16 model only.
                      torchao 0.18 has no CPU int4 weight-only kernel (no `Int4CPULayout` any more, version-1
                      configs refused), so `check_scheme` refuses int4 there.

Call order, for the loader / server:

    check_scheme(scheme, device, dtype)        # at start, before any weight is read: one-line NeoxrayError
    model = ...load weights, on `device`...
    quantize_weights(model, scheme)            # after the weights are loaded (and after `parallelize`)
    engine = InferenceEngine(model, ...)       # then the engine: its multi-LoRA slots wrap the quantized linears
    weight_bytes(model)                        # what the weights hold in memory now, for the logs and /health

`neoxray.model.multi_lora.MultiLoRA` may also wrap the linears before `quantize_weights` (the tests check both
orders); quantizing first is the simpler rule.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from neoxray.errors import NeoxrayError
from neoxray.model.tensor_parallel import ColumnParallelLinear, RowParallelLinear

SCHEMES = ("int8_weight_only", "int4_weight_only")
"""The names `--quantization` accepts."""

INT4_GROUP_SIZE = 128
"""Input columns sharing one int4 scale and zero point."""

LINEARS = (nn.Linear, ColumnParallelLinear, RowParallelLinear)
"""The module types whose weights are quantized (the multi-LoRA and LoRA wrappers subclass these)."""

HEAD = "embed_out"


def check_scheme(scheme: str, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """A one-line NeoxrayError when `scheme` is unknown, or torchao has no kernel for it on `device` (with the
    model in `dtype`, when given). Reads no weights: call it before loading."""
    if scheme not in SCHEMES:
        raise NeoxrayError(f"--quantization {scheme!r} is not a known scheme; choose one of: {', '.join(SCHEMES)}")
    device = torch.device(device)
    if scheme == "int4_weight_only":
        if device.type != "cuda":
            raise NeoxrayError(
                f"--quantization int4_weight_only needs a CUDA GPU: torchao has no int4 weight-only kernel for "
                f"device {device.type!r} (int8_weight_only runs there)"
            )
        if dtype is not None and dtype != torch.bfloat16:
            raise NeoxrayError(
                f"--quantization int4_weight_only needs the model in bfloat16 (torchao's int4 kernel), not {dtype}"
            )
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(device)
            raise NeoxrayError(
                f"--quantization int4_weight_only needs a GPU of compute capability >= 8.0, {device} has "
                f"{major}.{minor} (int8_weight_only runs there)"
            )


@contextmanager
def _quiet_import():
    """torchao's import logs a warning for each optional native library this torch build cannot load (CUDA-only
    kernels on a CPU build) and torch warns about torchao's enum registration: harmless, and noise in a
    server's log."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _config(scheme: str):
    with _quiet_import():
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)  # no global torch._inductor changes
    return Int4WeightOnlyConfig(
        group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
    )


def is_quantized(t: torch.Tensor) -> bool:
    """Whether `t` is a tensor subclass holding other tensors (a torchao quantized weight)."""
    return is_traceable_wrapper_subclass(t)


def quantize_weights(model: nn.Module, scheme: str, *, head: bool | None = None) -> None:
    """Quantize the weights of `model`'s linears in place with `scheme` (see the module docstring for which).
    `head`: quantize the vocabulary head `embed_out` too (None: the scheme's default, yes for int8, no for
    int4). The model must hold its loaded weights on its final device; call `check_scheme` first. Attributes set
    on the original weight parameters (the tensor-parallel tags `tp_dim`, `tp_size`, ...) are carried over."""
    if any(p.is_meta for p in model.parameters()):
        raise NeoxrayError("quantize_weights: the model is on the meta device; load its weights first")
    w = next(model.parameters(), None)
    check_scheme(scheme, "cpu" if w is None else w.device, None if w is None else w.dtype)  # the model as it is
    with _quiet_import():
        from torchao.quantization import quantize_

    if head is None:
        head = scheme == "int8_weight_only"

    def chosen(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, LINEARS) or is_quantized(module.weight):
            return False
        if fqn.rpartition(".")[2] == HEAD and not head:
            return False
        if scheme == "int4_weight_only" and module.weight.shape[1] % INT4_GROUP_SIZE:
            raise NeoxrayError(
                f"--quantization int4_weight_only: {fqn} has {module.weight.shape[1]} input features, not a "
                f"multiple of the group size {INT4_GROUP_SIZE}"
            )
        return True

    targets = {name: m for name, m in model.named_modules() if chosen(m, name)}
    tags = {name: dict(m.weight.__dict__) for name, m in targets.items()}
    with torch.no_grad():
        quantize_(model, _config(scheme), filter_fn=lambda m, fqn: fqn in targets and m is targets[fqn])
    for name, m in targets.items():
        if not is_quantized(m.weight):
            raise NeoxrayError(f"quantize_weights: torchao left {name}.weight unquantized with {scheme}")
        for attr, value in tags[name].items():
            if not hasattr(m.weight, attr):
                setattr(m.weight, attr, value)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes `t` holds: for a tensor subclass the sum over its inner tensors (integer data, scales, zero
    points), not its nominal dtype times its shape."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for inner in (getattr(t, n) for n in names) if inner is not None)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters (its weights) hold in memory, quantized or not; each shared parameter once.
    Buffers (LoRA slots, rotary tables) and the KV cache are not weights and are not counted."""
    return sum(tensor_bytes(p) for p in model.parameters())
