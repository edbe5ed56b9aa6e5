"""What the benchmark scripts share: the repository on sys.path (they run from a checkout without installing),
the bundled sample and the GPT-NeoX-20B tokenizer, machine and device descriptions for the records in
docs/benchmarks.md, GPU synchronisation, transformers' GPTNeoXForCausalLM built with our weights (the baseline
most of them measure against), the platform's training engine in a world of one, the timing of one model's
steps, and the report: the run's header, the two models' table and the JSON record.

A script in this folder imports it as `from common import ...` (Python puts the script's own folder first on
sys.path, so nothing installed can shadow it).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

SAMPLE = ROOT / "neoxray" / "pipelines" / "sample" / "sample.jsonl.zst"
SHARED_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "gpt-neox-20b"
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


def log(msg: str) -> None:
    """A progress line on stderr (stdout holds the results)."""
    print(msg, file=sys.stderr, flush=True)


def load_tokenizer(tmp: Path):
    """The GPT-NeoX-20B tokenizer from ../shared when present, else a 4096-token BPE trained on the bundled sample
    (saved under `tmp`)."""
    from neoxray.model.tokenizer import Tokenizer
    from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files

    if (SHARED_TOKENIZER / "tokenizer.json").exists():
        return Tokenizer.load(SHARED_TOKENIZER)
    return train_tokenizer_from_files([str(SAMPLE)], 4096, str(tmp / "tokenizer"))


# -------------------------------------------------------------------------------------------------------
# the platform's training engine, one process
# -------------------------------------------------------------------------------------------------------
def engine_run_config(name: str, preset: str, **run) -> object:
    """The validated, resolved run config of a `TrainEngine` in a world of one (dp = tp = pp = 1) that reads no
    data: `run` holds seq, micro_batch, global_batch, precision, device, steps, seed, and optionally layers
    (model.overrides.n_layers) and activation_checkpointing. A sequence longer than the preset's raises its
    max_seq_len."""
    from neoxray.model.config import get_preset
    from neoxray.platform.train.config import load_run_config, resolved, validate

    overrides = [
        f"name={name}",
        f"model.preset={preset}",
        f"model.activation_checkpointing={'true' if run.get('activation_checkpointing') else 'false'}",
        f"train.seq_len={run['seq']}",
        f"train.micro_batch={run['micro_batch']}",
        f"train.global_batch={run['global_batch']}",
        f"train.precision={run['precision']}",
        f"train.device={run['device']}",
        f"train.steps={run['steps']}",
        f"train.seed={run['seed']}",
        "parallel.data=1",
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "data.path=unused",  # the engine reads no data; validate() only checks the key is non-empty
    ]
    if run.get("layers"):
        overrides.append(f"model.overrides.n_layers={run['layers']}")
    if run["seq"] > get_preset(preset).max_seq_len:
        overrides.append(f"model.overrides.max_seq_len={run['seq']}")
    cfg = load_run_config(None, overrides)
    validate(cfg)  # not check_paths: data.path is never read here
    return resolved(cfg)


def neox_init_(named_parameters, mc, generator) -> None:
    """Fill parameters in place with GPT-NeoX's initialisation rules as `neoxray.model.init` applies them (zero
    biases, unit LayerNorms, small_init / wang_init normals), drawn from one generator on their device: quicker
    than the engine's per-parameter CPU generators, which a throughput or memory figure does not need."""
    import torch

    from neoxray.model.init import init_std

    with torch.no_grad():
        for name, p in named_parameters:
            if name.endswith("bias"):
                p.zero_()
            elif "layernorm" in name or "layer_norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, init_std(name, mc.d_model, mc.n_layers), generator=generator)


# -------------------------------------------------------------------------------------------------------
# one model's steps, timed
# -------------------------------------------------------------------------------------------------------
class StepRunner:
    """One model's step (`step`, defined by a subclass), timed on the host between device synchronisations: the
    checked first step, untimed and timed runs, rounds (warm-up then timed steps, the round's median kept)."""

    name = "?"

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []
        self.round_medians: list[float] = []
        self.first_step_s = None
        self.peak_gib = None
        self.inner_time = None  # the runner's own timing of its last step, if it has one
        self.inner_times: list[float] = []  # ... of the timed steps

    def step(self, check: bool = False):
        """One step; with `check`, its figures for the agreement check (loss, gradient norm[, gradients])."""
        raise NotImplementedError

    def check_step(self):
        """The very first step (compilation happens here): its check figures; its wall time is kept."""
        sync(self.device)
        t0 = time.perf_counter()
        out = self.step(check=True)
        sync(self.device)
        self.first_step_s = time.perf_counter() - t0
        return out

    def run(self, n: int, timed: bool = False) -> list[float]:
        """`n` steps; their wall times (and the runner's own, when `timed`)."""
        ts = []
        for _ in range(n):
            sync(self.device)
            t0 = time.perf_counter()
            self.step()
            sync(self.device)
            ts.append(time.perf_counter() - t0)
            if timed and self.inner_time is not None:
                self.inner_times.append(self.inner_time)
        return ts

    def block(self, warmup: int, steps: int) -> None:
        """One round: `warmup` untimed steps, then `steps` timed ones."""
        self.run(warmup)
        ts = self.run(steps, timed=True)
        self.times += ts
        self.round_medians.append(statistics.median(ts))


def tolerances(low_precision: bool, compiled: bool) -> tuple[float, float]:
    """Relative tolerances (loss, gradient norm) of the first-step agreement: fp32, or bf16 weights or autocast;
    compiled graphs drift a little from eager."""
    rtol, grad_rtol = (2e-2, 5e-2) if low_precision else (1e-4, 1e-3)
    if compiled:
        rtol, grad_rtol = max(rtol, 1e-3), max(grad_rtol, 1e-2)
    return rtol, grad_rtol


# -------------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------------
def fill_defaults(args, cuda: bool, table) -> None:
    """Flags left at None take their default for the device: `table` holds (dest, CPU default, CUDA default)."""
    for key, cpu_default, cuda_default in table:
        if getattr(args, key) is None:
            setattr(args, key, cuda_default if cuda else cpu_default)


def pick(args, *names) -> dict:
    """{name: args.name} for the setup record."""
    return {name: getattr(args, name) for name in names}


def run_env(device, versions: dict, interop_threads: bool = False) -> dict:
    """The run's environment for the record: date, library versions (torch, then `versions`), Python, the device,
    torch's threads, CUDA's version and the load average at the start."""
    import torch

    env = dict(date=now(), torch=torch.__version__, **versions, python=platform.python_version())
    env.update(device=str(device), device_name=device_name(device), threads=torch.get_num_threads())
    if interop_threads:
        env["interop_threads"] = torch.get_num_interop_threads()
    env.update(cuda=torch.version.cuda if device.type == "cuda" else None, loadavg_start=loadavg())
    return env


def print_run_header(script: str, env: dict, versions: tuple[str, ...]) -> None:
    """The first two lines of a run: script, date, versions; the device and its threads."""
    cuda = env["cuda"] is not None
    names = "  ".join(f"{k} {env[k]}" for k in ("torch", *versions, "python"))
    print(f"# {script}  {env['date']}  {names}" + (f"  CUDA {env['cuda']}" if cuda else ""))
    interop = f" (interop {env['interop_threads']})" if "interop_threads" in env else ""
    print(
        f"# device {env['device']}: {env['device_name']}  threads {env['threads']}{interop}"
        + (f"  load average {env['loadavg_start']}" if not cuda else "")
    )


def step_summary(r: StepRunner, tokens_per_step: int, flops_per_token: float, **after_name) -> dict:
    """One model's row: median step time, tokens/s and TFLOP/s over its timed steps, their range, each round's
    median, the first step's time (`after_name`: fields that follow the model's name)."""
    med = statistics.median(r.times)
    tok_s = tokens_per_step / med
    return dict(
        model=r.name,
        **after_name,
        ms_per_step=1e3 * med,
        tokens_per_s=tok_s,
        tflops=tok_s * flops_per_token / 1e12,
        ms_per_step_min=1e3 * min(r.times),
        ms_per_step_max=1e3 * max(r.times),
        round_medians_ms=[1e3 * t for t in r.round_medians],
        timed_steps=len(r.times),
        first_step_s=r.first_step_s,
    )


def print_step_table(rows: list[dict], cuda: bool, range_width: int, compiled: bool = False) -> float:
    """The two models' rows (ours first): tokens/s, ms/step, its range, TFLOP/s (MFU and peak GiB on CUDA;
    whether compiled, with `compiled`), then the ratio of their tokens/s, which it returns."""
    lo, hi = range_width // 2, range_width - range_width // 2 - 2
    hdr = f"{'model':<14}" + (f"{'compiled':>9}" if compiled else "")
    hdr += f"{'tokens/s':>12}{'ms/step':>10}{'min..max ms':>{range_width}}{'TFLOP/s':>9}"
    print(hdr + (f"{'MFU':>7}{'peak GiB':>10}" if cuda else ""))
    for r in rows:
        line = f"{r['model']:<14}" + (f"{str(r['compiled']):>9}" if compiled else "")
        line += (
            f"{r['tokens_per_s']:>12,.0f}{r['ms_per_step']:>10.1f}"
            f"{r['ms_per_step_min']:>{lo}.1f}..{r['ms_per_step_max']:<{hi}.1f}{r['tflops']:>9.2f}"
        )
        print(line + (f"{r['mfu']:>7.3f}{r['peak_gib']:>10.1f}" if cuda else ""))
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"ratio ours/HF (tokens/s): {ratio:.3f}")
    return ratio


def print_first_steps(rows: list[dict]) -> None:
    """The first step's time of each model, compilation included."""
    print("# first step (includes compilation): " + ", ".join(f"{r['model']} {r['first_step_s']:.1f} s" for r in rows))


def write_json(path, result: dict, announce: bool = True) -> None:
    """The run's record at `path` (its folder made), if one was asked for; `announce`: say so."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    if announce:
        print(f"# wrote {path}")


def model_shape(cfg) -> dict:
    """The model's shape for the setup record."""
    shape = {k: getattr(cfg, k) for k in ("n_layers", "d_model", "n_heads", "vocab_size")}
    return {**shape, "params": cfg.num_parameters()}


def shape_line(preset: str, cfg, layers_given: bool) -> str:
    """`# PRESET[ with N layers]: L.., d.., heads.., V.., NM params`, the start of a run's third header line."""
    return (
        f"# {preset}"
        + (f" with {cfg.n_layers} layers" if layers_given else "")
        + f": L {cfg.n_layers}, d {cfg.d_model}, heads {cfg.n_heads}, V {cfg.vocab_size}, "
        f"{cfg.num_parameters() / 1e6:.1f}M params"
    )
