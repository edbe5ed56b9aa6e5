"""What the benchmark scripts share: the repository on sys.path (they run from a checkout without installing),
machine and device descriptions for the records in docs/benchmarks.md, GPU synchronisation, and transformers'
GPTNeoXForCausalLM built with our weights (the baseline most of them measure against).

A script in this folder imports it as `from common import ...` (Python puts the script's own folder first on
sys.path, so nothing installed can shadow it).
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

PEAK_FLOPS = 989e12
"""Dense bf16 datasheet figure of an H100/H200 SXM: the MFU denominator (as in ../shared/gpu)."""
GIB = 2**30


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name, or the CPU's with its logical CPU count."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def machine() -> str:
    """One line for a benchmark record: CPU, CPU count, OS."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def now() -> str:
    """The local date and time, ISO 8601 with the offset."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device) -> None:
    """Wait for the GPU (timings must not stop before its queued work is done)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def free_memory(device, reset_compiled: bool = False) -> None:
    """Drop what a finished measurement held (compiled graphs too, with `reset_compiled`)."""
    import torch

    if reset_compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_hf(cfg, device, state_dict, dtype=None):
    """GPTNeoXForCausalLM of the same architecture, SDPA attention, holding `state_dict` (our parameter names),
    in training mode. `dtype`: cast after loading (default: the state dict's)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neoxray.model.hf import config_to_hf, from_hf_name

    d = config_to_hf(cfg, torch.float32)
    d.pop("neoxray", None)
    hf_cfg = GPTNeoXConfig(**d, attn_implementation="sdpa")
    with torch.device(device):
        model = GPTNeoXForCausalLM(hf_cfg)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise RuntimeError(f"HF model uses attention implementation {impl!r}, not 'sdpa'")
    hf_sd = model.state_dict()
    mapped = {from_hf_name(k): k for k in hf_sd}
    missing, extra = sorted(set(state_dict) - set(mapped)), sorted(set(mapped) - set(state_dict))
    if missing or extra:
        raise RuntimeError(f"name map mismatch: ours only {missing[:5]}, HF only {extra[:5]}")
    with torch.no_grad():
        for ours_name, hf_name in mapped.items():
            src, dst = state_dict[ours_name], hf_sd[hf_name]
            if src.shape != dst.shape:
                raise RuntimeError(f"{ours_name}: shape {tuple(src.shape)} vs HF {hf_name} {tuple(dst.shape)}")
            dst.copy_(src)
    if dtype is not None:
        model = model.to(dtype)
    return model.train()
