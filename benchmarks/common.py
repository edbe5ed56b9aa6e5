"""What the benchmark scripts share: the repository on sys.path (they run from a checkout without installing),
machine and device descriptions for the records in docs/benchmarks.md, GPU synchronisation, and transformers'
GPTNeoXForCausalLM built with our weights (the baseline most of them measure against).

A script in this folder imports it as `from common import ...` (Python puts the script's own folder first on
sys.path, so nothing installed can shadow it).
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
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


def agreement(ours: tuple, hf: tuple, rtol: float, grad_rtol: float) -> dict:
    """Whether the two models agree on the same weights and batch: `ours` and `hf` are (loss, gradient norm)
    or (loss, gradient norm, number of gradients); our gradient norm may be None (not measured)."""
    lo, go, *no = ours
    lh, gh, *nh = hf
    ok = math.isclose(lo, lh, rel_tol=rtol) and (go is None or math.isclose(go, gh, rel_tol=grad_rtol)) and no == nh
    out = dict(
        loss_ours=lo,
        loss_hf=lh,
        loss_rel_diff=abs(lo - lh) / abs(lh),
        grad_norm_ours=go,
        grad_norm_hf=gh,
        grad_norm_rel_diff=None if go is None else abs(go - gh) / abs(gh),
        loss_rtol=rtol,
        grad_rtol=grad_rtol,
        ok=ok,
    )
    if no:
        out.update(grads_ours=no[0], grads_hf=nh[0])
    return out


def print_agreement(chk: dict, strict: bool = True, what: str = "") -> None:
    """One line for `agreement`'s result; a mismatch stops the benchmark (`strict`) or warns."""
    if chk["grad_norm_ours"] is None:
        grad = f"grad norm ours n/a  HF {chk['grad_norm_hf']:.6f}"
    else:
        grad = (
            f"grad norm ours {chk['grad_norm_ours']:.6f}  HF {chk['grad_norm_hf']:.6f}  rel diff "
            f"{chk['grad_norm_rel_diff']:.2e} (rtol {chk['grad_rtol']:g})"
        )
    grads = f";  {chk['grads_ours']}/{chk['grads_hf']} grads" if "grads_ours" in chk else ""
    print(
        f"check{what}: loss ours {chk['loss_ours']:.6f}  HF {chk['loss_hf']:.6f}  rel diff "
        f"{chk['loss_rel_diff']:.2e} (rtol {chk['loss_rtol']:g});  {grad}{grads}  -> "
        f"{'OK' if chk['ok'] else 'MISMATCH'}",
        flush=True,
    )
    if not chk["ok"]:
        if strict:
            raise SystemExit(
                "the two models disagree on the same weights and batch: the comparison would be meaningless"
            )
        print("# WARNING: the two models disagree; the throughput comparison may be meaningless", flush=True)
