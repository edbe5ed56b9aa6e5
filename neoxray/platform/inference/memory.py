"""Will a model replica fit its device? Serving memory from arithmetic alone: no torch, no device.

Per device of a replica (t = tensor-parallel size; d `d_model`, f MLP width, V vocabulary rows, L layers,
a heads of hd dims; e = bytes of the dtype, 2 for bf16 on GPUs, 4 for fp32 on CPUs):

- Weights, sharded as `neoxray.model.tensor_parallel.parallelize` shards them: QKV and the first MLP
  projection by output rows (weight and bias / t), the attention output and second MLP projection by input
  columns (weight / t, bias replicated), `embed_in` and `embed_out` by vocabulary rows (V d / t each); the
  LayerNorms replicated. Quantized linears hold what `neoxray.platform.inference.quantization` makes of them
  with torchao 0.18: int8_weight_only 1 byte a weight plus an fp32 scale and an int8 zero point per output
  row; int4_weight_only (tile-packed for tinygemm) half a byte a weight of the matrix padded to a multiple of
  1024 input columns and 8 output rows, plus a bf16 scale and zero point per 128 input columns of each row.
  Biases, LayerNorms and `embed_in` stay in the dtype; `embed_out` is quantized with int8, not with int4
  (`quantize_head` overrides). These constants follow torchao's layouts: adjust them with it.
- KV cache: 2 (keys, values) x L x (a / t) x hd x e bytes per token, as `PagedKVCache.for_model` allocates;
  a sequence of `context` tokens holds whole blocks.
- Activations: the peak transient memory of one engine step, the larger of a prefill step (`prefill_chunk`
  tokens) and a decode step (one token for each of `max_num_seqs` rows), each over keys of `context` tokens:
  the paged cache gathers every row's keys and values of one layer ([rows, context, a/t, hd] twice); one layer's
  hidden states, QKV and MLP intermediates for the step's tokens; attention scores [rows, a/t, new, context]
  in fp32 (the math kernel's; fused kernels keep fewer); the head's logits [n, V/t] in the dtype and two fp32
  [n, V] copies (logits gathered, then log-softmax or sampling), n the positions scored (the whole chunk when a
  prompt is scored).
- Overhead: `GPU_OVERHEAD_BYTES` (1 GiB: CUDA context, cuBLAS workspaces, allocator slack; 0 on CPUs).

A layout fits when weights + activations + overhead + KV cache for `max_num_seqs` sequences of `context`
tokens stay within `memory_utilization` (0.9, as vLLM's `gpu_memory_utilization`) of the device's memory;
the sequences that fit are those whose KV cache (and their share of a decode step) fits what is left."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig

GIB = 1 << 30
"""Bytes in a GiB; device memory is counted as datasheets do (a "40 GB" A100 has 40 GiB)."""
QUANTIZATIONS = (None, "int8_weight_only", "int4_weight_only")
"""What `--quantization` accepts (None: the weights in the dtype)."""
INT4_GROUP_SIZE = 128
"""Input columns sharing one int4 scale and zero point (torchao's `Int4WeightOnlyConfig` default)."""
INT4_PAD = (8, 1024)
"""torchao's tile-packed int4 layout pads a weight's output rows and input columns to these multiples."""
INT4_SCALE_BYTES = 2
"""Bytes of an int4 group's scale and of its zero point (bf16, the only dtype the int4 kernel takes)."""
INT8_ROW_BYTES = 5
"""Bytes per output row of an int8 weight-only linear beside its weights: an fp32 scale, an int8 zero point."""
HEAD_QUANTIZED = {"int8_weight_only": True, "int4_weight_only": False}
"""Whether each quantization applies to `embed_out` (as `neoxray.platform.inference.quantization` does)."""
GPU_OVERHEAD_BYTES = GIB
"""Per-device memory outside PyTorch's tensors on a GPU: CUDA context, cuBLAS workspaces, allocator slack."""
GPU_MEMORY_UTILIZATION = 0.9
"""Share of a device's memory the replica may plan for, as vLLM's `gpu_memory_utilization`."""


@dataclass(frozen=True)
class ServeLayout:
    """One model replica: the model, the device it runs on, how it is split and what it must hold."""

    model: ModelConfig
    """The architecture (`neoxray.model.config`)."""
    device_memory_bytes: int
    """Memory of one device of the replica, bytes (`int(40 * GIB)` for an A100 40GB)."""
    tensor_parallel_size: int = 1
    """Devices the replica's model is split over (`--tensor-parallel-size`)."""
    quantization: str | None = None
    """None, "int8_weight_only" or "int4_weight_only" (`--quantization`): the linears' weights."""
    dtype_bytes: int = 2
    """Bytes per element of the dtype the model runs in: 2 for bf16 (GPUs), 4 for fp32 (CPUs)."""
    max_num_seqs: int = 32
    """Sequences decoded together (`--max-num-seqs`)."""
    context: int | None = None
    """Tokens each sequence may hold, prompt and generated (None: the model's `max_seq_len`)."""
    kv_cache_tokens: int | None = None
    """KV cache token budget, all sequences together (`--kv-cache-tokens`; None: `max_num_seqs` x `context`)."""
    block_size: int = 16
    """Tokens per KV cache block; a sequence holds whole blocks."""
    prefill_chunk: int = 512
    """Prompt tokens prefilled in one engine step (`EngineConfig.prefill_chunk`)."""
    memory_utilization: float = GPU_MEMORY_UTILIZATION
    """Share of the device's memory the replica may use."""
    overhead_bytes: int = GPU_OVERHEAD_BYTES
    """Memory beyond tensors per device (0 for a CPU)."""
    quantize_head: bool | None = None
    """Whether the quantization also applies to `embed_out` (None: `HEAD_QUANTIZED`)."""

    @property
    def tokens(self) -> int:  # the context of each sequence
        return self.context or self.model.max_seq_len

    def validate(self) -> ServeLayout:
        """Raise a one-line NeoxrayError naming the option at fault; return self."""
        cfg, tp = self.model, self.tensor_parallel_size
        if self.quantization not in QUANTIZATIONS:
            known = ", ".join(q for q in QUANTIZATIONS if q)
            raise NeoxrayError(f"--quantization {self.quantization!r} is not one of none, {known}")
        if tp < 1:
            raise NeoxrayError(f"--tensor-parallel-size must be >= 1, got {tp}")
        for n, what in ((cfg.n_heads, "heads"), (cfg.vocab_size, "vocabulary rows"), (cfg.ffn_dim, "MLP width")):
            if n % tp:
                raise NeoxrayError(f"--tensor-parallel-size {tp} does not divide the model's {n} {what}")
        int4_groups = (cfg.d_model // tp) % INT4_GROUP_SIZE == (cfg.ffn_dim // tp) % INT4_GROUP_SIZE == 0
        if self.quantization == "int4_weight_only" and not int4_groups:
            raise NeoxrayError(f"--quantization int4_weight_only needs d_model / tp in multiples of {INT4_GROUP_SIZE}")
        if self.device_memory_bytes <= 0:
            raise NeoxrayError(f"--gpu-memory must be > 0, got {self.device_memory_bytes / GIB:g} GiB")
        for name in ("max_num_seqs", "block_size", "prefill_chunk", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise NeoxrayError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.tokens <= cfg.max_seq_len:
            raise NeoxrayError(
                f"--context must be between 1 and the model's context {cfg.max_seq_len}, got {self.tokens}"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise NeoxrayError(f"--kv-cache-tokens must be >= {self.block_size}, got {self.kv_cache_tokens}")
        if not 0 < self.memory_utilization <= 1:
            raise NeoxrayError(f"--gpu-memory-utilization must be in (0, 1], got {self.memory_utilization}")
        return self


def _linear_bytes(out_f: int, in_f: int, quantization: str | None, dtype_bytes: int) -> int:
    """The weight of one linear (one device's shard, out_f x in_f), biases not included."""
    if quantization is None:
        return out_f * in_f * dtype_bytes
    if quantization == "int8_weight_only":
        return out_f * in_f + out_f * INT8_ROW_BYTES
    rows, cols = (-(-n // m) * m for n, m in zip((out_f, in_f), INT4_PAD))
    return rows * cols // 2 + rows * (cols // INT4_GROUP_SIZE) * 2 * INT4_SCALE_BYTES


def weight_bytes(
    config: ModelConfig,
    tp: int = 1,
    quantization: str | None = None,
    dtype_bytes: int = 2,
    quantize_head: bool | None = None,
) -> int:
    """Bytes of the weights on one device of a replica split over `tp` devices (see the module docstring);
    `quantize_head` None: as `HEAD_QUANTIZED` says for the quantization."""
    if quantize_head is None:
        quantize_head = HEAD_QUANTIZED.get(quantization, False)
    d, f, v, x = config.d_model, config.ffn_dim, config.vocab_size, dtype_bytes
    q = quantization
    layer = (
        _linear_bytes(3 * d // tp, d, q, x)  # query_key_value: column-parallel
        + _linear_bytes(d, d // tp, q, x)  # attention dense: row-parallel
        + _linear_bytes(f // tp, d, q, x)  # dense_h_to_4h: column-parallel
        + _linear_bytes(d, f // tp, q, x)  # dense_4h_to_h: row-parallel
        + (3 * d // tp + f // tp) * x  # column-parallel biases, split
        + 2 * d * x  # row-parallel biases, replicated
        + 4 * d * x  # two LayerNorms, replicated
    )
    embed_in = v // tp * d * x  # vocab-parallel
    head = _linear_bytes(v // tp, d, q if quantize_head else None, x)  # column-parallel, no bias
    return config.n_layers * layer + embed_in + 2 * d * x + head  # 2 d: the final LayerNorm


def kv_bytes_per_token(config: ModelConfig, tp: int = 1, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token position on one device: keys and values of every layer's local heads."""
    return 2 * config.n_layers * (config.n_heads // tp) * config.head_dim * dtype_bytes


def activation_bytes(layout: ServeLayout, num_seqs: int | None = None) -> int:
    """Peak transient bytes of one engine step on one device with `num_seqs` rows (default `max_num_seqs`):
    the larger of a prefill step and a decode step (the module docstring lists the terms)."""
    cfg, tp, x = layout.model, layout.tensor_parallel_size, layout.dtype_bytes
    rows = layout.max_num_seqs if num_seqs is None else num_seqs
    d, f, v, t = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, layout.tokens
    local_heads = cfg.n_heads // tp
    kv_row = kv_bytes_per_token(cfg, tp, x) // cfg.n_layers  # one layer's keys and values per token

    def step(n_rows: int, tokens: int, query_rows: int, queries: int, scored: int) -> int:
        gathered = n_rows * t * kv_row  # every row's keys and values of one layer, gathered from the pool
        hidden = tokens * (4 * d + 6 * d // tp + 2 * f // tp) * x  # residual, norms, QKV + rotary, MLP
        scores = query_rows * local_heads * queries * t * 4
        head = scored * (v // tp * x + 2 * v * 4)
        return gathered + hidden + scores + head

    chunk = min(layout.prefill_chunk, t)
    prefill = step(rows, chunk, 1, chunk, chunk)  # rows' last chunks; at worst one row of a whole chunk, scored
    decode = step(rows, rows, rows, 1, rows)
    return max(prefill, decode)


@dataclass(frozen=True)
class ServeMemory:
    """What one device of a replica holds, bytes, and whether it fits (`serve_memory`)."""

    layout: ServeLayout
    weight_bytes: int
    """The weights on this device."""
    kv_bytes_per_token: int
    """KV cache per token position."""
    kv_bytes_per_sequence: int
    """KV cache of one sequence of `context` tokens (whole blocks)."""
    kv_cache_bytes: int
    """KV cache as the engine allocates it: `kv_cache_tokens` (whole blocks), else `max_num_seqs` sequences of
    `context` tokens."""
    activation_bytes: int
    """Peak transient memory of one engine step at `max_num_seqs` rows."""
    overhead_bytes: int
    """Memory beyond tensors."""
    budget_bytes: int
    """`memory_utilization` x the device's memory."""
    max_num_seqs_fit: int
    """Most sequences of `context` tokens that fit beside the weights (0: not even one)."""
    max_kv_cache_tokens: int
    """Most KV cache tokens (whole blocks) that fit beside the weights with `max_num_seqs` rows (0: none)."""

    @property
    def total_bytes(self) -> int:
        """Everything at the asked batch and context."""
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        """Whether `max_num_seqs` sequences of `context` tokens fit."""
        return self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        """Plain data for JSON: the layout (model by name) and every figure in bytes."""
        layout = dataclasses.asdict(self.layout) | {"model": self.layout.model.name, "context": self.layout.tokens}
        figures = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout"}
        return {"layout": layout, **figures, "total_bytes": self.total_bytes, "fits": self.fits}


def serve_memory(layout: ServeLayout) -> ServeMemory:
    """The memory of one device of `layout` (validated first: a bad option is a one-line NeoxrayError)."""
    layout.validate()
    cfg, tp, x = layout.model, layout.tensor_parallel_size, layout.dtype_bytes
    per_token = kv_bytes_per_token(cfg, tp, x)
    per_seq = -(-layout.tokens // layout.block_size) * layout.block_size * per_token
    weights = weight_bytes(cfg, tp, layout.quantization, x, layout.quantize_head)
    budget = int(layout.device_memory_bytes * layout.memory_utilization)

    def need(n: int) -> int:
        return weights + layout.overhead_bytes + n * per_seq + activation_bytes(layout, max(n, 1))

    if layout.kv_cache_tokens is None:
        kv_cache = layout.max_num_seqs * per_seq
    else:
        kv_cache = layout.kv_cache_tokens // layout.block_size * layout.block_size * per_token
    room = budget - weights - layout.overhead_bytes - activation_bytes(layout)
    block = layout.block_size * per_token
    lo, hi = 0, max(1, budget // per_seq + 1)  # need(hi) > budget: a binary search for the largest n that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid - 1)
    return ServeMemory(
        layout=layout,
        weight_bytes=weights,
        kv_bytes_per_token=per_token,
        kv_bytes_per_sequence=per_seq,
        kv_cache_bytes=kv_cache,
        activation_bytes=activation_bytes(layout),
        overhead_bytes=layout.overhead_bytes,
        budget_bytes=budget,
        max_num_seqs_fit=lo,
        max_kv_cache_tokens=max(0, room // block * layout.block_size),
    )


def _fits(layout: ServeLayout) -> bool:
    try:
        return serve_memory(layout).fits
    except NeoxrayError:  # a layout that cannot exist (int4 groups that do not divide a shard's inputs)
        return False


def what_would_fit(layout: ServeLayout) -> str:
    """One line for an error message: what would fit instead of `layout` (fewer sequences, a larger
    tensor-parallel size, a quantization), or that nothing up to 8 devices does."""
    mem = serve_memory(layout)
    if mem.fits:
        return "it fits as asked"
    cfg, tp = layout.model, layout.tensor_parallel_size
    gib = f"{layout.device_memory_bytes / GIB:g} GiB"
    ideas = []
    if mem.max_num_seqs_fit >= 1 and layout.kv_cache_tokens is None:
        ideas.append(f"--max-num-seqs {mem.max_num_seqs_fit} at context {layout.tokens}")
    if mem.max_kv_cache_tokens >= layout.tokens and layout.kv_cache_tokens != mem.max_kv_cache_tokens:
        ideas.append(f"--kv-cache-tokens {mem.max_kv_cache_tokens} (sequences wait for cache room)")
    for size in range(tp + 1, 9):
        if any(n % size for n in (cfg.n_heads, cfg.vocab_size, cfg.ffn_dim)):
            continue
        if _fits(dataclasses.replace(layout, tensor_parallel_size=size)):
            ideas.append(f"--tensor-parallel-size {size} ({size} devices of {gib})")
            break
    stronger = QUANTIZATIONS[QUANTIZATIONS.index(layout.quantization) + 1 :]
    quants = [q for q in stronger if _fits(dataclasses.replace(layout, quantization=q))]
    if quants:
        ideas.append(f"--quantization {' or '.join(quants)} at --tensor-parallel-size {tp}")
    if not ideas:
        return f"nothing up to 8 devices of {gib} fits {layout.max_num_seqs} sequences of {layout.tokens} tokens"
    return "would fit: " + "; or ".join(ideas)


def check_fits(layout: ServeLayout) -> ServeMemory:
    """`serve_memory(layout)` when it fits; else a one-line NeoxrayError with the figures and `what_would_fit`."""
    mem = serve_memory(layout)
    if not mem.fits:
        raise NeoxrayError(
            f"{layout.model.name} does not fit: {describe(mem)} > {mem.budget_bytes / GIB:.1f} GiB usable of "
            f"{layout.device_memory_bytes / GIB:g} GiB per device; {what_would_fit(layout)}"
        )
    return mem


def describe(mem: ServeMemory) -> str:
    """One line of the figures, e.g. for a replica's start message: weights, KV cache, activations, overhead."""
    lay = mem.layout
    return (
        f"{mem.total_bytes / GIB:.1f} GiB per device = weights {mem.weight_bytes / GIB:.2f} + KV cache "
        f"{mem.kv_cache_bytes / GIB:.2f} ({lay.max_num_seqs} x {lay.tokens} tokens) + activations "
        f"{mem.activation_bytes / GIB:.2f} + overhead {mem.overhead_bytes / GIB:.2f}"
    )


def format_serve_memory(mem: ServeMemory) -> str:
    """The table `neoxray plan --serve` prints."""
    lay = mem.layout
    quant = lay.quantization or f"none ({lay.dtype_bytes}-byte weights)"
    seqs = f"{lay.max_num_seqs} sequence{'s' * (lay.max_num_seqs != 1)}"
    kv_name = f"KV cache, {seqs}" if lay.kv_cache_tokens is None else "KV cache, --kv-cache-tokens"
    rows = [
        ("weights", mem.weight_bytes),
        (f"KV cache per sequence ({lay.tokens} tokens)", mem.kv_bytes_per_sequence),
        (kv_name, mem.kv_cache_bytes),
        ("activations (one engine step)", mem.activation_bytes),
        ("overhead", mem.overhead_bytes),
        ("total", mem.total_bytes),
        (f"usable ({lay.memory_utilization:g} of {lay.device_memory_bytes / GIB:g} GiB)", mem.budget_bytes),
    ]
    lines = [
        f"serving {lay.model.name} ({lay.model.num_parameters() / 1e9:.2f} B parameters): tensor-parallel size "
        f"{lay.tensor_parallel_size}, quantization {quant}, {seqs} of {lay.tokens} tokens",
        "",
        f"  {'per device':<44}{'GiB':>10}",
        *(f"  {name:<44}{n / GIB:>10.2f}" for name, n in rows),
        "",
        f"fits: {'yes' if mem.fits else 'no'}",
        f"max concurrent sequences of {lay.tokens} tokens: {mem.max_num_seqs_fit}",
        f"max KV cache tokens beside {lay.max_num_seqs} rows: {mem.max_kv_cache_tokens}",
    ]
    if not mem.fits:
        lines.append(what_would_fit(lay))
    return "\n".join(lines)
