"""What a training engine's rank holds in one step, by kind: weights, gradients, optimizer states (bytes of
distinct tensor storages, views of one flat buffer counted once). The planner's memory model is checked against
it (`tests/platform/train/test_plan.py`), and `benchmarks/lora_memory.py` measures LoRA against full training
with it. Wraps the engine's gradient reduction and optimizer steps to look at the gradients at their largest;
use it on an engine built for measuring, not for training."""

from __future__ import annotations

import torch


def _storage_bytes(tensors, exclude=frozenset()) -> tuple[int, set]:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in exclude and st.nbytes():
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values()), set(seen)


def _tensors_in(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth + 1)


def held_step(engine, batches) -> dict:
    """One training step of `engine` (a `TrainEngine`, on micro-batches from `batches`) and the bytes this rank
    held: weights (every parameter, a LoRA run's frozen base too), gradients (the trained parameters' .grad and
    every gradient buffer of DeepSpeed's optimizer wrapper, at their largest: before the gradient reduction,
    before the step and inside the torch optimizer's step), optimizer states (the torch optimizer's parameters,
    i.e. ZeRO's fp32 partitions, and its state tensors). Raises if a frozen parameter ever has a gradient."""
    params = [p for _, p in engine.named_parameters()] + [p for _, p in engine.frozen_parameters()]
    trained = [p for _, p in engine.named_parameters()]
    wrapper = engine.optimizer  # DeepSpeed's ZeRO / BF16 optimizer
    inner = wrapper.optimizer  # the torch AdamW it drives
    weights, weight_keys = _storage_bytes(params)
    masters = [p for g in inner.param_groups for p in g["params"]]
    _, master_keys = _storage_bytes(masters, exclude=weight_keys)
    peaks: list[int] = []

    def snapshot():
        buffers = [t for name, v in vars(wrapper).items() if "grad" in name.lower() for t in _tensors_in(v)]
        grads = [p.grad for p in trained] + [p.grad for p in masters] + buffers
        if any(p.grad is not None for _, p in engine.frozen_parameters()):
            raise RuntimeError("a frozen base parameter has a gradient")
        peaks.append(_storage_bytes(grads, exclude=weight_keys | master_keys)[0])

    def before(fn):
        def wrapped(*a, **kw):
            snapshot()
            return fn(*a, **kw)

        return wrapped

    engine.ds_engine.allreduce_gradients = before(engine.ds_engine.allreduce_gradients)
    wrapper.step = before(wrapper.step)
    inner.step = before(inner.step)
    metrics = engine.train_step(batches)
    states = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    optimizer, _ = _storage_bytes(masters + states, exclude=weight_keys)
    return dict(
        weights=weights,
        gradients=max(peaks),
        optimizer=optimizer,
        snapshots=len(peaks),
        loss=metrics["loss"],
        step_time_s=metrics["step_time_s"],
    )
