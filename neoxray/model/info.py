"""What `neoxray model info` reports: size, training FLOPs per token, and training memory."""

from __future__ import annotations

from neoxray.model.config import ModelConfig

GIB = 2**30


def model_info(config: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameters, FLOPs per token (6 N_matmul + 12 L d seq) and the memory of training with bf16 weights and
    gradients plus fp32 master weights and Adam moments (2 + 2 + 4 + 4 + 4 = 16 bytes a parameter), unsharded."""
    n = config.num_parameters()
    seq = seq_len or config.max_seq_len
    mem = {
        "weights_bf16": 2 * n,
        "gradients_bf16": 2 * n,
        "master_weights_fp32": 4 * n,
        "adam_states_fp32": 8 * n,
    }
    mem["total"] = sum(mem.values())
    return {
        "preset": config.name,
        "parameters": n,
        "matmul_parameters": config.matmul_parameters(),
        "n_layers": config.n_layers,
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "seq_len": seq,
        "rotary_pct": config.rotary_pct,
        "parallel_residual": config.parallel_residual,
        "train_flops_per_token": config.train_flops_per_token(seq),
        "memory_bytes": mem,
    }


def format_info(info: dict) -> str:
    m = info["memory_bytes"]
    lines = [
        f"preset              {info['preset']}",
        f"parameters          {info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)",
        f"shape               {info['n_layers']} layers, d_model {info['d_model']}, {info['n_heads']} heads of "
        f"{info['head_dim']}, vocab {info['vocab_size']}, rotary_pct {info['rotary_pct']}, "
        f"{'parallel' if info['parallel_residual'] else 'sequential'} residual",
        f"train FLOPs/token   {info['train_flops_per_token']:.4e} at seq {info['seq_len']} "
        f"(6 x {info['matmul_parameters']:,} matmul params + 12 L d seq)",
        "training memory (bf16 weights and gradients, fp32 master weights and Adam moments, before sharding):",
        f"  weights           {m['weights_bf16'] / GIB:10.2f} GiB",
        f"  gradients         {m['gradients_bf16'] / GIB:10.2f} GiB",
        f"  fp32 master       {m['master_weights_fp32'] / GIB:10.2f} GiB",
        f"  Adam moments      {m['adam_states_fp32'] / GIB:10.2f} GiB",
        f"  total             {m['total'] / GIB:10.2f} GiB",
    ]
    return "\n".join(lines)
