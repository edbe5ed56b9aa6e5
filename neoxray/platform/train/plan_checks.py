"""Input checks of the topology planner (`neoxray.platform.train.plan`): what makes a request unplannable, and
what makes one (dp, tp, pp) layout impossible whatever the memory."""

from __future__ import annotations

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.lora_spec import targets_problem

PRECISIONS = ("bf16", "fp16", "fp32")


def check_inputs(model: ModelConfig, cluster, training, a) -> None:
    problems = []
    if not isinstance(cluster.gpus, int) or cluster.gpus < 1:
        problems.append(f"the number of GPUs must be a positive integer, got {cluster.gpus}")
    if not cluster.gpu_memory_gib > 0:
        problems.append(f"the GPU memory must be > 0 GiB, got {cluster.gpu_memory_gib}")
    if cluster.gpus_per_node is not None and cluster.gpus_per_node < 1:
        problems.append(f"GPUs per node must be >= 1, got {cluster.gpus_per_node}")
    if training.global_batch < 1:
        problems.append(f"the global batch must be >= 1, got {training.global_batch}")
    if training.micro_batch < 1:
        problems.append(f"the micro-batch must be >= 1, got {training.micro_batch}")
    if training.seq_len is not None and not 1 <= training.seq_len <= model.max_seq_len:
        problems.append(
            f"the sequence length must be in [1, {model.max_seq_len}] (the model's max_seq_len), got {training.seq_len}"
        )
    if training.precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {training.precision!r}")
    if training.zero_stage not in (0, 1):
        problems.append(
            f"ZeRO stage must be 0 or 1 (DeepSpeed's pipeline engine supports no other), got {training.zero_stage}"
        )
    if not isinstance(training.lora_rank, int) or training.lora_rank < 0:
        problems.append(f"--lora-rank (lora.rank) must be an integer >= 0, got {training.lora_rank}")
    targets = targets_problem(training.lora_targets)
    if targets:
        problems.append(f"--lora-targets (lora.targets): {targets}")
    if not 0 <= training.lora_dropout < 1:
        problems.append(f"--lora-dropout (lora.dropout) must be in [0, 1), got {training.lora_dropout}")
    if not a.peak_tflops > 0:
        problems.append(f"peak TFLOP/s must be > 0, got {a.peak_tflops}")
    if not 0 < a.mfu <= 1:
        problems.append(f"MFU must be in (0, 1], got {a.mfu}")
    if not (a.tp_bandwidth_gbs > 0 and a.dp_bandwidth_gbs > 0):
        problems.append("bandwidths must be > 0 GB/s")
    if a.overhead_gib < 0 or not 0 <= a.reserve_fraction < 1:
        problems.append("overhead must be >= 0 and the reserve fraction in [0, 1)")
    if problems:
        raise NeoxrayError("; ".join(problems))


def structural_problem(model: ModelConfig, training, per_node: int, dp: int, tp: int, pp: int) -> str | None:
    """Why (dp, tp, pp) cannot run at all, whatever the memory; None when it can."""
    if model.n_heads % tp:
        return f"tp {tp} does not divide {model.n_heads} heads"
    if model.vocab_size % tp:
        return f"tp {tp} does not divide {model.vocab_size} vocabulary rows"
    if model.ffn_dim % tp:
        return f"tp {tp} does not divide the MLP width {model.ffn_dim}"
    if tp > per_node:
        return f"tp {tp} > {per_node} GPUs per node"
    if per_node % tp:
        return f"tp {tp} does not divide {per_node} GPUs per node (a tensor-parallel group would span two nodes)"
    if pp > model.n_layers:
        return f"pp {pp} > {model.n_layers} layers"
    unit = dp * training.micro_batch
    if training.global_batch % unit:
        return (
            f"global batch {training.global_batch} is not divisible by dp {dp} x micro-batch "
            f"{training.micro_batch} = {unit}"
        )
    return None
