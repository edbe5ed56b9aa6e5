"""The DeepSpeed JSON config a run passes to `deepspeed.initialize`, derived from the run config."""

from __future__ import annotations

from typing import Any

from neoxray.errors import NeoxrayError
from neoxray.platform.train.config import PRECISIONS, ZERO_STAGES, RunConfig, gradient_accumulation_steps

# fp16 dynamic loss scaling, as GPT-NeoX-20B and Pythia were trained (gpt-neox configs/20B.yml): start at
# 2**12, halve on overflow after `hysteresis` overflowing steps, double after `window` clean steps.
FP16_INITIAL_SCALE_POWER = 12
FP16_LOSS_SCALE_WINDOW = 1000
FP16_HYSTERESIS = 2
FP16_MIN_LOSS_SCALE = 1
# we log ourselves; DeepSpeed's own periodic print is pushed out of reach
DEEPSPEED_STEPS_PER_PRINT = 10**12


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON config for `deepspeed.initialize`. We pass our own torch AdamW and set the learning
    rate ourselves (`lr_at`), so there is no `optimizer` or `scheduler` entry; DeepSpeed owns the batch
    arithmetic, gradient clipping, ZeRO and mixed precision."""
    gas = gradient_accumulation_steps(cfg)
    precision = cfg.train.precision
    if precision not in PRECISIONS:
        raise NeoxrayError(f"train.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    if cfg.parallel.zero_stage not in ZERO_STAGES:
        raise NeoxrayError(
            f"parallel.zero_stage={cfg.parallel.zero_stage}: DeepSpeed's pipeline engine supports "
            f"ZeRO stages 0 and 1 only"
        )
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(cfg.optimizer.clip_grad),
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # a torch.optim.AdamW instance is not on ZeRO's list of tested optimizers
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": DEEPSPEED_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": FP16_HYSTERESIS,
            "min_loss_scale": FP16_MIN_LOSS_SCALE,
        }
    if precision == "bf16" and cfg.parallel.zero_stage == 1:
        # accumulate micro-batch gradients in fp32 (DeepSpeed's BF16_Optimizer path); with ZeRO 0 DeepSpeed
        # accepts only gradient accumulation in the model dtype
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds
