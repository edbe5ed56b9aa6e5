"""The table `neoxray plan` prints: every feasible layout with its per-GPU memory of the busiest stage and its
estimated step time, fastest first, then the rejected layouts with their reasons."""

from __future__ import annotations

from neoxray.model.info import GIB
from neoxray.platform.train.plan import Plan


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def format_plan(p: Plan) -> str:
    """The plan as a table: feasible layouts fastest first, then the rejected ones with their reasons."""
    c, t, a = p.cluster, p.training, p.assumptions
    zero = f"ZeRO-{t.zero_stage}" if t.zero_stage else "no ZeRO"
    ckpt = {
        None: "activation checkpointing where needed",
        True: "activation checkpointing",
        False: "no activation checkpointing",
    }[t.activation_checkpointing]
    lora = ""
    if t.lora_rank:
        trainable = p.feasible[0].busiest.trainable if p.feasible else None
        lora = f", LoRA rank {t.lora_rank} on {', '.join(t.lora_targets)} (base frozen)"
        if trainable is not None:
            lora += f": {trainable / 1e6:.2f} M trainable parameters on the busiest GPU"
    lines = [
        f"{p.model.name} ({p.model.num_parameters() / 1e9:.2f} B parameters) on {c.gpus} GPUs of "
        f"{c.gpu_memory_gib:g} GiB, {c.per_node()} per node: seq {p.seq_len}, global batch {t.global_batch}, "
        f"micro-batch {t.micro_batch}, {t.precision}, {zero}, {ckpt}{lora}",
        "",
    ]
    if p.feasible:
        lines.append(
            f"{len(p.feasible)} feasible layout(s), fastest first (GiB per GPU on the busiest pipeline "
            f"stage; usable {_gib(p.feasible[0].memory_limit)} GiB):"
        )
        head = (
            f"{'#':>3} {'dp':>4} {'tp':>3} {'pp':>3} {'micro':>6} {'bubble':>7} {'ckpt':>5} {'stage':>5} "
            f"{'weights':>8} {'grads':>7} {'optim':>7} {'act':>7} {'act/ckpt':>8} {'total':>7} "
            f"{'step s':>9} {'tokens/s':>10}"
        )
        lines.append(head)
        for i, x in enumerate(p.feasible, 1):
            b = x.busiest
            lines.append(
                f"{i:>3} {x.dp:>4} {x.tp:>3} {x.pp:>3} {x.micro_batches:>6} {x.bubble:>7.1%} "
                f"{'yes' if x.activation_checkpointing else 'no':>5} {b.stage:>5} {_gib(b.weights):>8} "
                f"{_gib(b.gradients):>7} {_gib(b.optimizer):>7} {_gib(b.activations):>7} "
                f"{_gib(b.activations_checkpointed):>8} {_gib(x.memory):>7} {x.time.total_s:>9.2f} "
                f"{x.tokens_per_s:>10,.0f}"
            )
    else:
        lines.append("no feasible layout")
    if p.rejected:
        lines += ["", f"{len(p.rejected)} rejected layout(s):"]
        lines += [f"  dp {r.dp:>3} tp {r.tp:>3} pp {r.pp:>3}: {r.reason}" for r in p.rejected]
    lines += [
        "",
        f"assumptions: {a.peak_tflops:g} TFLOP/s peak per GPU at {a.mfu:.0%} MFU; all-reduce "
        f"{a.tp_bandwidth_gbs:g} GB/s in a node, {a.dp_bandwidth_gbs:g} GB/s between nodes; "
        f"{'fused' if a.flash_attention else 'unfused'} attention; {a.overhead_gib:g} GiB overhead and "
        f"{a.reserve_fraction:.0%} reserve per GPU (docs/planner.md)",
    ]
    return "\n".join(lines)
