"""The topology planner behind `neoxray plan` and `parallel: auto`: for a model and N GPUs, every
data x tensor x pipeline (dp, tp, pp) layout with dp x tp x pp = N, whether it fits in GPU memory, and an
estimated step time, best first; the layouts that cannot work are listed with the reason.

Plain arithmetic (no torch, no Ray, no DeepSpeed), modelled on what `neoxray.platform.train.engine` really builds:
the stages DeepSpeed's partitioner makes (`stage_layers`) and each one's parameters (`stage_parameters`), the
bytes per parameter of each precision and ZeRO stage, activations after Korthikanti et al. 2022
(`layer_activation_bytes`), a LoRA run's frozen base and adapters (`lora_layer_parameters`), all per GPU of the
busiest stage (`stage_memory`); and a step time from the FLOPs, the 1F1B bubble and the tensor- and
data-parallel all-reduces (`step_time`). docs/planner.md has every formula with a worked example, and how the
memory model is checked against the engine's real allocations; `Assumptions` holds the hardware figures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from neoxray.errors import NeoxrayError
from neoxray.model.config import ModelConfig
from neoxray.model.info import GIB
from neoxray.model.lora_spec import COLUMN_PARALLEL, TARGETS, target_shape
from neoxray.platform.train.plan_checks import PRECISIONS, check_inputs, structural_problem


@dataclass(frozen=True)
class Assumptions:
    """The hardware and efficiency figures the estimates rest on. Change them to match your cluster."""

    peak_tflops: float = 312.0
    """Dense 16-bit peak of one GPU, TFLOP/s (312: A100, the GPU GPT-NeoX-20B was trained on; 989: H100/H200
    SXM)."""
    mfu: float = 0.40
    """Fraction of the peak a stage's layers reach on the FLOPs they execute (recomputation included),
    before the pipeline bubble and communication are added."""
    tp_bandwidth_gbs: float = 150.0
    """All-reduce bus bandwidth inside a node (NVLink), GB/s (1e9 bytes/s): tensor-parallel all-reduces, and
    data-parallel ones when a whole data-parallel group sits in one node."""
    dp_bandwidth_gbs: float = 25.0
    """All-reduce bus bandwidth per GPU between nodes, GB/s (a 200 Gb/s InfiniBand NIC per GPU)."""
    overhead_gib: float = 1.5
    """Memory per GPU beyond weights, gradients, optimizer states and activations, GiB: CUDA context and
    kernels, cuBLAS workspaces, NCCL and DeepSpeed communication buffers."""
    flash_attention: bool = True
    """The attention keeps no s x s score matrices for its backward pass (a fused kernel, as PyTorch's
    scaled_dot_product_attention picks on GPUs); False counts them as Korthikanti et al. do."""
    reserve_fraction: float = 0.05
    """Share of each GPU's memory left free for the caching allocator's fragmentation: a layout fits when it
    needs at most (1 - reserve_fraction) x gpu memory."""


@dataclass(frozen=True)
class Cluster:
    """What the layouts must fit: N devices of equal memory, grouped in nodes."""

    gpus: int
    """Devices to train on (N = dp x tp x pp)."""
    gpu_memory_gib: float
    """Memory of one device, GiB (2**30 bytes; a "40 GB" A100 has 40 GiB)."""
    gpus_per_node: int | None = None
    """Devices per node: a tensor-parallel group must fit inside one; null: all N in one node."""

    def per_node(self) -> int:
        return self.gpus_per_node or self.gpus


@dataclass(frozen=True)
class Training:
    """The batch arithmetic and precision of the run being planned."""

    global_batch: int = 1024
    """Sequences per optimizer step (B); must be divisible by dp x micro_batch."""
    micro_batch: int = 4
    """Sequences per forward/backward pass on one data-parallel replica (b)."""
    seq_len: int | None = None
    """Tokens per sequence (s); null: the model's max_seq_len."""
    precision: str = "bf16"
    """bf16, fp16 or fp32, as `train.precision`."""
    zero_stage: int = 1
    """1: ZeRO-1 shards the master weights and Adam states across dp (the engine's default); 0: no sharding."""
    activation_checkpointing: bool | None = None
    """True / False: plan with / without it; None: without where that fits, else with it."""
    lora_rank: int = 0
    """0: full training. R > 0: LoRA of rank R on `lora_targets`, as `lora.rank`: the base is frozen (no
    gradients, no optimizer state), only the adapters train."""
    lora_targets: tuple[str, ...] = TARGETS
    """The linear layers LoRA adapts (`lora.targets`)."""
    lora_dropout: float = 0.0
    """`lora.dropout`: above 0 each adapted layer keeps a dropped copy of its input for the backward pass."""


@dataclass(frozen=True)
class StageMemory:
    """Bytes one GPU of a pipeline stage holds."""

    stage: int
    """Pipeline stage index (0: the embedding's; pp - 1: the head's)."""
    layers: int
    """Transformer layers on this stage."""
    parameters: int
    """Parameters on one tensor-parallel rank of this stage (with LoRA: the frozen base and the adapters)."""
    trainable: int
    """Of those, the ones that train (all of them, or with LoRA the adapters)."""
    in_flight: int
    """Micro-batches whose activations the 1F1B schedule keeps at once on this stage."""
    weights: int
    gradients: int
    optimizer: int
    """fp32 master weights (when kept) and Adam's m and v, this rank's ZeRO-1 share."""
    activations: int
    """Without activation checkpointing."""
    activations_checkpointed: int
    """With full activation checkpointing (layer inputs, plus one layer recomputed in the backward pass)."""
    overhead: int

    def static(self) -> int:
        """Weights + gradients + optimizer states + overhead: everything but the activations."""
        return self.weights + self.gradients + self.optimizer + self.overhead

    def total(self, checkpointing: bool) -> int:
        return self.static() + (self.activations_checkpointed if checkpointing else self.activations)


@dataclass(frozen=True)
class StepTime:
    """Estimated seconds of one optimizer step, and its parts."""

    compute_s: float
    """Slowest stage's compute over the m micro-batches (no bubble, no communication)."""
    tp_comm_s: float
    """Slowest stage's tensor-parallel all-reduces over the m micro-batches."""
    bubble_s: float
    """Idle pipeline slots: (pp - 1) slots of the slowest stage."""
    dp_comm_s: float
    """Data-parallel gradient reduction (ZeRO-1 reduce-scatter + all-gather)."""

    @property
    def total_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.bubble_s + self.dp_comm_s


@dataclass(frozen=True)
class Layout:
    """One feasible layout with its memory and time estimates."""

    dp: int
    tp: int
    pp: int
    micro_batches: int
    """Micro-batches per pipeline per step (m = global_batch / (dp x micro_batch))."""
    activation_checkpointing: bool
    """Whether the estimate (and the fit) is with activation checkpointing."""
    busiest: StageMemory
    """The stage that needs the most memory (with this layout's checkpointing setting)."""
    stages: tuple[StageMemory, ...]
    time: StepTime
    tokens_per_step: int
    memory_limit: int
    """Usable bytes per GPU ((1 - reserve) x gpu memory)."""

    @property
    def memory(self) -> int:
        """Bytes per GPU on the busiest stage."""
        return self.busiest.total(self.activation_checkpointing)

    @property
    def bubble(self) -> float:
        """The 1F1B bubble fraction (pp - 1) / (m + pp - 1)."""
        return (self.pp - 1) / (self.micro_batches + self.pp - 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total_s

    def to_dict(self) -> dict:
        b = self.busiest
        return {
            "dp": self.dp,
            "tp": self.tp,
            "pp": self.pp,
            "micro_batches": self.micro_batches,
            "activation_checkpointing": self.activation_checkpointing,
            "bubble": self.bubble,
            "busiest_stage": b.stage,
            "memory_bytes": self.memory,
            "memory_limit_bytes": self.memory_limit,
            "memory": {
                "weights": b.weights,
                "gradients": b.gradients,
                "optimizer": b.optimizer,
                "activations": b.activations,
                "activations_checkpointed": b.activations_checkpointed,
                "overhead": b.overhead,
            },
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "step_time_s": self.time.total_s,
            "step_time": dataclasses.asdict(self.time),
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass(frozen=True)
class Rejected:
    """A layout that cannot work, and why."""

    dp: int
    tp: int
    pp: int
    reason: str
    memory_bytes: int | None = None
    """For layouts rejected for memory: what the busiest stage would need."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Plan:
    """Every (dp, tp, pp) of a cluster: the feasible ones fastest first, the others with their reason."""

    model: ModelConfig
    cluster: Cluster
    training: Training
    assumptions: Assumptions
    seq_len: int
    feasible: list[Layout] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def best(self) -> Layout | None:
        return self.feasible[0] if self.feasible else None

    def to_dict(self) -> dict:
        return {
            "model": self.model.name,
            "parameters": self.model.num_parameters(),
            "cluster": dataclasses.asdict(self.cluster),
            "training": {**dataclasses.asdict(self.training), "seq_len": self.seq_len},
            "assumptions": dataclasses.asdict(self.assumptions),
            "feasible": [x.to_dict() for x in self.feasible],
            "rejected": [x.to_dict() for x in self.rejected],
        }


# ---------------------------------------------------------------------------------------------------------
# pipeline stages as the engine builds them
# ---------------------------------------------------------------------------------------------------------
def stage_layers(n_layers: int, pp: int) -> list[int]:
    """Transformer layers per stage under DeepSpeed's `type:LayerPipe` partition: as even as possible, the
    first n_layers mod pp stages one layer more (checked against DeepSpeed in tests/test_plan.py)."""
    q, r = divmod(n_layers, pp)
    return [q + 1 if i < r else q for i in range(pp)]


def layer_parameters(model: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank: the QKV and first MLP projections
    (weights and biases) and the two output projections' weights are split t ways; the output projections'
    biases and both LayerNorms are replicated."""
    d, f = model.d_model, model.ffn_dim
    split = 4 * d * d + 2 * d * f + 3 * d + f  # QKV [3d, d] + 3d, dense [d, d], h->4h [f, d] + f, 4h->h [d, f]
    replicated = 2 * d + 4 * d  # dense and 4h->h biases, two LayerNorms (weight and bias)
    return split // tp + replicated


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters one tensor-parallel rank of pipeline stage `stage` holds: its layers, the vocab-parallel
    embedding [V/t, d] on stage 0, the final LayerNorm (replicated) and vocab-parallel head [V/t, d] on the
    last stage."""
    d, v = model.d_model, model.vocab_size
    n = stage_layers(model.n_layers, pp)[stage] * layer_parameters(model, tp)
    if stage == 0:
        n += v * d // tp
    if stage == pp - 1:
        n += 2 * d + v * d // tp
    return n


def _lora_shapes(model: ModelConfig, targets) -> list[tuple[int, int, bool]]:
    """(in, out, column-parallel?) of each adapted linear of one layer, full sizes."""
    return [(*target_shape(model, t), t in COLUMN_PARALLEL) for t in targets]


def lora_layer_parameters(model: ModelConfig, rank: int, tp: int = 1, targets=TARGETS) -> int:
    """Adapter parameters of one transformer layer on one tensor-parallel rank: A [r, in] and B [out, r] per
    adapted linear, sharded as the linear is: a column-parallel layer's B by output rows (A replicated), a
    row-parallel layer's A by input columns (B replicated)."""
    n = 0
    for fan_in, fan_out, column in _lora_shapes(model, targets):
        n += rank * fan_in + rank * fan_out // tp if column else rank * fan_in // tp + rank * fan_out
    return n


def layer_activation_bytes(
    model: ModelConfig, seq_len: int, micro_batch: int, tp: int, act_bytes: int, flash_attention: bool = True
) -> int:
    """Activations one layer keeps for its backward pass, one micro-batch, no checkpointing (Korthikanti et
    al. 2022 with tensor parallelism): s b d (10 + 24 / t + 5 a s / (d t)) bytes at 16 bits, the last term
    (attention scores) only without flash attention; x act_bytes / 2."""
    s, b, d, a = seq_len, micro_batch, model.d_model, model.n_heads
    scores = 0.0 if flash_attention else 5 * a * s / (d * tp)
    sixteen_bit = s * b * d * (10 + 24 / tp + scores)
    return int(sixteen_bit * act_bytes / 2)


def _bytes_per_parameter(precision: str, zero_stage: int, dp: int) -> tuple[int, float, float]:
    """(weights, gradients, optimizer states) bytes per parameter of one rank (docs/planner.md's table)."""
    if precision not in PRECISIONS:
        raise NeoxrayError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    shard = dp if zero_stage >= 1 else 1
    if precision == "bf16":
        return 2, 2.0 + 4.0, 12 / shard
    g = 4 if precision == "fp32" else 2
    if zero_stage < 1:
        return g, float(g), 8.0 if precision == "fp32" else 12.0  # an fp32 model's AdamW needs no master copy
    # ZeRO-1 keeps its own fp32 partition (even of an fp32 model); at the step it holds this rank's reduced
    # gradient partition and an fp32 flat copy of it
    return g, max(float(g), (g + 4) / dp), 12 / dp


def stage_memory(
    model: ModelConfig,
    dp: int,
    tp: int,
    pp: int,
    stage: int,
    training: Training,
    assumptions: Assumptions = Assumptions(),
    micro_batches: int | None = None,
) -> StageMemory:
    """Bytes one GPU of stage `stage` holds under the layout (dp, tp, pp) (docs/planner.md, the memory model)."""
    s = training.seq_len or model.max_seq_len
    b = training.micro_batch
    m = micro_batches if micro_batches is not None else max(1, training.global_batch // (dp * b))
    act = 4 if training.precision == "fp32" else 2
    w, g, o = _bytes_per_parameter(training.precision, training.zero_stage, dp)
    layers = stage_layers(model.n_layers, pp)[stage]
    n_params = stage_parameters(model, tp, pp, stage)
    trainable = n_params
    in_flight = min(pp - stage, m)
    per_layer = layer_activation_bytes(model, s, b, tp, act, assumptions.flash_attention)
    r = training.lora_rank
    if r:
        trainable = layers * lora_layer_parameters(model, r, tp, training.lora_targets)
        n_params += trainable
        for fan_in, _, column in _lora_shapes(model, training.lora_targets):
            per_layer += s * b * r * act  # the rank-r hidden x A^T
            if training.lora_dropout > 0:
                per_layer += s * b * (fan_in if column else fan_in // tp) * act  # the dropped copy of x
    layer_input = s * b * model.d_model * act  # [b, s, d], replicated over the tensor-parallel ranks
    head = 0
    if stage == pp - 1:
        head = s * b * (model.vocab_size // tp) * (act + 4) + 2 * s * b * model.d_model * act
    activations = in_flight * layers * per_layer + head
    checkpointed = in_flight * layers * layer_input + (per_layer if layers else 0) + head
    return StageMemory(
        stage=stage,
        layers=layers,
        parameters=n_params,
        trainable=trainable,
        in_flight=in_flight,
        weights=n_params * w,
        gradients=int(trainable * g),
        optimizer=int(trainable * o),
        activations=activations,
        activations_checkpointed=checkpointed,
        overhead=int(assumptions.overhead_gib * GIB),
    )


def step_time(
    model: ModelConfig,
    dp: int,
    tp: int,
    pp: int,
    training: Training,
    checkpointing: bool,
    gpus_per_node: int,
    assumptions: Assumptions = Assumptions(),
) -> StepTime:
    """Estimated optimizer step time of the layout (docs/planner.md, the time model). Ranks are numbered tensor-parallel
    fastest, then data-parallel, then pipeline (DeepSpeed's topology), so a data-parallel group spans dp x tp
    consecutive ranks: inside one node when dp x tp <= gpus_per_node."""
    a = assumptions
    s = training.seq_len or model.max_seq_len
    b = training.micro_batch
    m = training.global_batch // (dp * b)
    d, f, v = model.d_model, model.ffn_dim, model.vocab_size
    act = 4 if training.precision == "fp32" else 2
    # FLOPs per token, split as ModelConfig.train_flops_per_token splits them: 2 per weight and token forward,
    # 2 for the input gradient, 2 for the weight gradient, which a frozen (LoRA) base does not compute; its
    # adapters cost 6 per adapter parameter
    r = training.lora_rank
    per_weight = 4 if r else 6
    layer_flops = per_weight * (4 * d * d + 2 * d * f) + 12 * d * s
    if r:
        layer_flops += 6 * lora_layer_parameters(model, r, 1, training.lora_targets)
    head_flops = per_weight * d * v
    recompute = (per_weight + 2) / per_weight if checkpointing else 1.0  # one more forward
    speed = tp * a.peak_tflops * 1e12 * a.mfu  # FLOP/s of one stage (its tp GPUs)
    tokens = b * s  # per micro-batch
    if tp > 1:
        allreduce_s = 2 * (tp - 1) / tp * tokens * d * act / (a.tp_bandwidth_gbs * 1e9)
    else:
        allreduce_s = 0.0
    per_layer_allreduces = 6 if checkpointing else 4
    slots = []  # (compute, tp comm) per micro-batch, per stage
    for i, layers in enumerate(stage_layers(model.n_layers, pp)):
        flops = tokens * (layers * layer_flops * recompute + (head_flops if i == pp - 1 else 0))
        slots.append((flops / speed, layers * per_layer_allreduces * allreduce_s))
    compute, comm = max(slots, key=lambda x: x[0] + x[1])
    if r:  # only the adapters' gradients are reduced
        params = max(
            n * lora_layer_parameters(model, r, tp, training.lora_targets) for n in stage_layers(model.n_layers, pp)
        )
    else:
        params = max(stage_parameters(model, tp, pp, i) for i in range(pp))
    grad_bytes = 2 if training.precision == "fp16" else 4  # bf16 reduces its fp32 accumulation buffer
    dp_bw = a.tp_bandwidth_gbs if dp * tp <= gpus_per_node else a.dp_bandwidth_gbs
    dp_s = 2 * (dp - 1) / dp * params * grad_bytes / (dp_bw * 1e9) if dp > 1 else 0.0
    return StepTime(compute_s=m * compute, tp_comm_s=m * comm, bubble_s=(pp - 1) * (compute + comm), dp_comm_s=dp_s)


# ---------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    """The divisors of n (n >= 1), ascending."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def factorizations(n: int) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) with dp x tp x pp = n, by tp then pp."""
    divs = divisors(n)
    return [(n // (tp * pp), tp, pp) for tp in divs for pp in divs if (n // tp) % pp == 0]


def plan(
    model: ModelConfig, cluster: Cluster, training: Training = Training(), assumptions: Assumptions = Assumptions()
) -> Plan:
    """Every (dp, tp, pp) for `cluster.gpus` devices: feasible layouts fastest first (ties: less memory), the
    others with the reason each fails."""
    check_inputs(model, cluster, training, assumptions)
    s = training.seq_len or model.max_seq_len
    per_node = cluster.per_node()
    limit = int(cluster.gpu_memory_gib * GIB * (1 - assumptions.reserve_fraction))
    out = Plan(model=model, cluster=cluster, training=training, assumptions=assumptions, seq_len=s)
    for dp, tp, pp in factorizations(cluster.gpus):
        reason = structural_problem(model, training, per_node, dp, tp, pp)
        if reason:
            out.rejected.append(Rejected(dp, tp, pp, reason))
            continue
        m = training.global_batch // (dp * training.micro_batch)
        stages = tuple(stage_memory(model, dp, tp, pp, i, training, assumptions, m) for i in range(pp))
        options = (
            [training.activation_checkpointing] if training.activation_checkpointing is not None else [False, True]
        )
        chosen = None
        for ckpt in options:
            need = max(st.total(ckpt) for st in stages)
            if need <= limit:
                chosen = ckpt
                break
        if chosen is None:
            ckpt = options[-1]
            busiest = max(stages, key=lambda st: st.total(ckpt))
            need = busiest.total(ckpt)
            how = "with" if ckpt else "without"
            out.rejected.append(
                Rejected(
                    dp,
                    tp,
                    pp,
                    f"needs {need / GIB:.1f} GiB per GPU > {limit / GIB:.1f} GiB usable of {cluster.gpu_memory_gib:g} "
                    f"GiB (stage {busiest.stage}, {how} activation checkpointing)",
                    memory_bytes=need,
                )
            )
            continue
        busiest = max(stages, key=lambda st: st.total(chosen))
        timing = step_time(model, dp, tp, pp, training, chosen, per_node, assumptions)
        out.feasible.append(
            Layout(
                dp=dp,
                tp=tp,
                pp=pp,
                micro_batches=m,
                activation_checkpointing=chosen,
                busiest=busiest,
                stages=stages,
                time=timing,
                tokens_per_step=training.global_batch * s,
                memory_limit=limit,
            )
        )
    out.feasible.sort(key=lambda x: (round(x.time.total_s, 9), x.memory, x.tp, x.pp))
    out.rejected.sort(key=lambda r: (r.memory_bytes is None, r.memory_bytes or 0))  # closest misses first
    return out
