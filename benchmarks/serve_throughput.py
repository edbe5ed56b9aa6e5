"""Serving throughput: neoxray's continuous-batching engine (behind its HTTP endpoint, or driven directly)
against transformers' `generate` on the same model and weights, in one run.

Workload: every request has the same prompt length and asks for exactly `--max-tokens` new tokens (greedy,
`ignore_eos`), so both sides produce the same number of tokens. For each concurrency c in `--clients`, c
clients each send `--requests-per-client` requests back to back; we report output tokens/s over the wall time,
p50/p99 request latency and time to first token (streamed). Baselines, same process, same weights:
transformers `generate` one request at a time, and statically batched (c prompts in one `generate` call).

    # CPU, through `neoxray serve` on a local Ray cluster (the issue's CPU goal: >= 3x one-at-a-time at 32)
    python benchmarks/serve_throughput.py --preset pythia-70m --mode http
    # GPU without Ray (the engine driven directly): GPT-NeoX-20B shape in bf16, random weights
    python benchmarks/serve_throughput.py --preset neox-20b --mode engine --device cuda --dtype bf16 \
        --clients 1,16 --prompt-len 128 --max-tokens 128

Multi-LoRA (`--loras N`): N random rank-`--lora-rank` adapters on all four linears of every layer (written and
read in peft's format), loaded into one engine (or `neoxray serve --lora NAME=DIR ...`); the largest client count
runs twice on it, all clients on the base model, then client i on adapter i mod N, and the ratio of the two
throughputs is printed (the issue's goal: >= 0.8 on CPU). The transformers baselines are skipped then.

    python benchmarks/serve_throughput.py --preset pythia-70m --mode engine --loras 4 --clients 32

`--mode engine` imports only torch, transformers, tokenizers and neoxray (runs where Ray is absent);
`--mode http` starts `neoxray serve` (Ray Serve; `--no-ray-server` for uvicorn alone) and uses aiohttp.
Random weights: throughput does not depend on them. Transformers' and neoxray's models share the same
parameter tensors, so a 20B model is held once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import free_port, load_tokenizer, log, machine, now, sync, write_json

from neoxray.model.config import get_preset
from neoxray.model.gptneox import GPTNeoX
from neoxray.model.hf import config_to_hf, to_hf_name


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -------------------------------------------------------------------------------------------------------
# one set of weights, two models
# -------------------------------------------------------------------------------------------------------
def build_pair(preset: str, layers: int | None, device: str, dtype: torch.dtype, tok):
    """transformers' GPTNeoXForCausalLM with random weights, and neoxray's GPTNeoX sharing its tensors."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    overrides = {"n_layers": layers} if layers else {}
    if tok.vocab_size > get_preset(preset).vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} tokens, more than {preset}'s vocabulary")
    cfg = get_preset(preset, eos_token_id=tok.eod_id, bos_token_id=tok.eod_id, **overrides)
    hf_cfg = GPTNeoXConfig(**config_to_hf(cfg, dtype))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = GPTNeoXForCausalLM._from_config(hf_cfg, dtype=dtype)
    hf.eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    with torch.device("meta"):
        ours = GPTNeoX(cfg)
    hf_params = dict(hf.named_parameters())
    for name, _ in list(ours.named_parameters()):
        hf_name = to_hf_name(name)
        if hf_name not in hf_params and hf_name == "embed_out.weight":
            hf_name = "lm_head.weight"
        owner, attr = ours.get_submodule(name.rpartition(".")[0]) if "." in name else ours, name.rpartition(".")[2]
        setattr(owner, attr, hf_params[hf_name])  # the same Parameter object: no copy
    return cfg, hf, ours.eval()


def prompts_for(n: int, length: int, tok, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    hi = min(tok.vocab_size, 50000)
    return torch.randint(100, hi, (n, length), generator=g).tolist()


# -------------------------------------------------------------------------------------------------------
# transformers baselines
# -------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def hf_generate(hf, batch: list[list[int]], max_tokens: int, device) -> float:
    """Seconds for one greedy `generate` of exactly max_tokens new tokens for a batch of equal-length prompts."""
    ids = torch.tensor(batch, device=device)
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    sync(device)
    assert out.shape[1] == ids.shape[1] + max_tokens
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------------------------------
# neoxray: the engine directly, or the HTTP endpoint
# -------------------------------------------------------------------------------------------------------
async def run_clients(send, prompts: list[list[int]], clients: int, per_client: int) -> dict:
    """c clients, each sending per_client requests back to back; send(prompt, client index) -> (ttft_s,
    latency_s, tokens)."""
    records = []

    async def client(i):
        for j in range(per_client):
            records.append(await send(prompts[(i * per_client + j) % len(prompts)], i))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in records)
    return {
        "clients": clients,
        "requests": len(records),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": pct([r[1] for r in records], 50),
        "latency_p99_s": pct([r[1] for r in records], 99),
        "ttft_p50_s": pct([r[0] for r in records], 50),
        "ttft_p99_s": pct([r[0] for r in records], 99),
    }


def engine_sender(engine, max_tokens: int, loras: list[str] | None = None):
    """Client i's requests use adapter loras[i mod len] (None: the base model)."""
    from neoxray.model.decoding import SamplingParams
    from neoxray.platform.inference.request import Request

    async def send(prompt, client=0):
        t0 = time.perf_counter()
        ttft, n = None, 0
        sampling = SamplingParams(greedy=True, stop_at_eod=False)
        lora = loras[client % len(loras)] if loras else None
        req = Request(list(prompt), max_tokens=max_tokens, sampling=sampling, lora=lora)
        async for ready in engine.stream([req]):
            for _, out in ready:
                if out.token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
                n += len(out.token_ids)
        return ttft, time.perf_counter() - t0, n

    return send


def http_sender(session, url: str, model: str, max_tokens: int, loras: list[str] | None = None):
    async def send(prompt, client=0):
        body = {
            "model": loras[client % len(loras)] if loras else model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        ttft, n = None, 0
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
        return ttft, time.perf_counter() - t0, n

    return send


@contextlib.contextmanager
def http_server(model_dir: Path, args, log_path: Path, extra=()):
    """`neoxray serve` of `model_dir` on a free port (`extra`: more flags), until it answers /health; yields its URL
    and stops it (SIGINT, then SIGKILL to its process group after 60 s)."""
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("neoxray")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "neoxray.cli"]
    cmd += ["serve", "--model", str(model_dir), "--port", str(port), "--name", "bench"]
    cmd += ["--max-num-seqs", str(max(args.clients_list)), "--device", args.device]
    cmd += ["--dtype", {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[args.torch_dtype]]
    cmd += [*extra, *(["--no-ray"] if args.no_ray_server else [])]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"neoxray serve exited:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise SystemExit("neoxray serve did not become healthy")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def http_run(url: str, prompts, clients: int, per_client: int, max_tokens: int, loras=None) -> dict:
    """`run_clients` against the endpoint, in one aiohttp session."""
    import aiohttp

    async def measure():
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600)) as s:
            return await run_clients(http_sender(s, url, "bench", max_tokens, loras), prompts, clients, per_client)

    return asyncio.run(measure())


def make_engine(ours, tok, args, clients: int, **lora_config):
    """An InferenceEngine (not started) over `ours`, sized for `clients` sequences (`lora_config`: max_loras, ...)."""
    from neoxray.platform.inference.engine import InferenceEngine
    from neoxray.platform.inference.request import EngineConfig

    kv_tokens = clients * (args.prompt_len + args.max_tokens + 16)
    config = EngineConfig(max_num_seqs=clients, kv_cache_tokens=kv_tokens, **lora_config)
    return InferenceEngine(ours, tok, config)


def report_head(benchmark: str, args, cfg, **after_layers) -> dict:
    """The first fields of a run's record: what ran, when, where, on which model shape and device."""
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    return {
        "benchmark": benchmark,
        "date": now(),
        "machine": machine() + gpu,
        "torch": torch.__version__,
        "preset": args.preset,
        "layers": cfg.n_layers,
        **after_layers,
        "device": args.device,
        "dtype": str(args.torch_dtype),
        "mode": args.mode + (" (no Ray)" if args.no_ray_server and args.mode == "http" else ""),
    }


# -------------------------------------------------------------------------------------------------------
# the run: transformers one at a time and statically batched, then neoxray at each client count
# -------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--mode", choices=["http", "engine"], default="http")
    p.add_argument("--no-ray-server", action="store_true", help="http mode: `neoxray serve --no-ray` (uvicorn)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-single-requests", type=int, default=3, help="requests timed for the one-at-a-time baseline")
    p.add_argument("--static-batches", default=None, help="static batch sizes for transformers (default: --clients)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--loras", type=int, default=0, help="multi-LoRA: this many adapters vs the base alone")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of each --loras adapter")
    p.add_argument(
        "--quantization",
        default=None,
        help="engine mode: neoxray's linears weight-only int8_weight_only / int4_weight_only (torchao); "
        "transformers keeps the weights as they are",
    )
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.torch_dtype = {
        "auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }[args.dtype]
    args.clients_list = [int(x) for x in args.clients.split(",")]
    args.statics = [int(x) for x in (args.static_batches or args.clients).split(",")]
    return args


def hf_baselines(hf, prompts, args) -> tuple[dict, dict]:
    """transformers one request at a time, then each static batch size."""
    hf_generate(hf, prompts[:1], 4, args.device)  # warm-up
    times = [hf_generate(hf, [prompts[i]], args.max_tokens, args.device) for i in range(args.hf_single_requests)]
    hf_single = {"tokens_per_s": args.max_tokens * len(times) / sum(times), "latency_p50_s": statistics.median(times)}
    log(f"transformers one at a time: {hf_single['tokens_per_s']:.1f} tokens/s")
    hf_static = {}
    for b in args.statics:
        t = hf_generate(hf, prompts[:b], args.max_tokens, args.device)
        hf_static[b] = {"tokens_per_s": b * args.max_tokens / t, "latency_s": t}
        log(f"transformers static batch {b}: {hf_static[b]['tokens_per_s']:.1f} tokens/s")
    return hf_single, hf_static


def engine_runs(ours, tok, prompts, args) -> list[dict]:
    """The engine driven directly, at each client count (after a one-request warm-up)."""
    engine = make_engine(ours, tok, args, max(args.clients_list))
    engine.start()
    send = engine_sender(engine, args.max_tokens)
    asyncio.run(run_clients(send, prompts, 1, 1))  # warm-up
    results = []
    for c in args.clients_list:
        r = asyncio.run(run_clients(send, prompts, c, args.requests_per_client))
        results.append(r)
        log(f"neoxray engine, {c} clients: {r['tokens_per_s']:.1f} tokens/s, p50 latency {r['latency_p50_s']:.3f} s")
    engine.stop(timeout=10)
    return results


def http_runs(model_dir: Path, prompts, args, tmp: Path) -> list[dict]:
    """`neoxray serve` measured through HTTP at each client count (after a one-request warm-up)."""
    results = []
    with http_server(model_dir, args, tmp / "serve.log") as url:
        http_run(url, prompts, 1, args.requests_per_client, args.max_tokens)  # warm-up
        for c in args.clients_list:
            r = http_run(url, prompts, c, args.requests_per_client, args.max_tokens)
            results.append(r)
            log(
                f"neoxray endpoint, {c} clients: {r['tokens_per_s']:.1f} tokens/s, "
                f"p50 latency {r['latency_p50_s']:.3f} s, p50 TTFT {r['ttft_p50_s']:.3f} s"
            )
    return results


def print_results(results: list[dict], hf_single: dict, hf_static: dict) -> None:
    print(
        f"\n{'clients':>8} {'tok/s':>10} {'p50 lat s':>10} {'p99 lat s':>10} {'p50 TTFT':>9} "
        f"{'x HF 1-by-1':>12} {'x HF static':>12}"
    )
    for r in results:
        st = r.get("ratio_vs_transformers_static_batch")
        print(
            f"{r['clients']:>8} {r['tokens_per_s']:>10.1f} {r['latency_p50_s']:>10.3f} {r['latency_p99_s']:>10.3f} "
            f"{r['ttft_p50_s']:>9.3f} {r['ratio_vs_transformers_one_at_a_time']:>12.2f} "
            f"{'' if st is None else f'{st:.2f}':>12}"
        )
    print(
        f"transformers: one at a time {hf_single['tokens_per_s']:.1f} tok/s; static batches "
        + ", ".join(f"{b}: {v['tokens_per_s']:.1f}" for b, v in hf_static.items())
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="neoxray-serve-bench-"))
    tok = load_tokenizer(tmp)
    cfg, hf, ours = build_pair(args.preset, args.layers, args.device, args.torch_dtype, tok)
    n_req = max(args.clients_list) * args.requests_per_client
    prompts = prompts_for(max(n_req, max(args.statics), args.hf_single_requests), args.prompt_len, tok)
    log(
        f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}: {cfg.num_parameters():,} parameters, "
        f"{args.device} {args.torch_dtype}, prompt {args.prompt_len}, {args.max_tokens} new tokens per request"
    )
    if args.loras:
        return lora_benchmark(args, cfg, ours, tok, tmp, hf)

    hf_single, hf_static = hf_baselines(hf, prompts, args)
    if args.quantization:  # after the baselines: quantize_ gives neoxray's linears new weights, transformers keeps its
        from neoxray.platform.inference.quantization import check_scheme, quantize_weights

        check_scheme(args.quantization, args.device, args.torch_dtype)
        quantize_weights(ours, args.quantization)
    if args.mode == "engine":
        results = engine_runs(ours, tok, prompts, args)
    else:
        from neoxray.model.hf import save_pretrained

        model_dir = save_pretrained(ours, tmp / "model", tokenizer=tok)
        del hf, ours
        results = http_runs(model_dir, prompts, args, tmp)
    for r in results:
        r["ratio_vs_transformers_one_at_a_time"] = r["tokens_per_s"] / hf_single["tokens_per_s"]
        if r["clients"] in hf_static:
            r["ratio_vs_transformers_static_batch"] = r["tokens_per_s"] / hf_static[r["clients"]]["tokens_per_s"]
    report = report_head("serve_throughput", args, cfg, parameters=cfg.num_parameters(), quantization=args.quantization)
    report.update(prompt_len=args.prompt_len, max_tokens=args.max_tokens)
    report.update(transformers_one_at_a_time=hf_single, transformers_static_batch=hf_static, neoxray=results)
    print_results(results, hf_single, hf_static)
    write_json(args.json, report, announce=False)
    return 0


# -------------------------------------------------------------------------------------------------------
# multi-LoRA: the same engine, its largest client count on the base alone and spread over N adapters
# -------------------------------------------------------------------------------------------------------
def write_adapters(cfg, n: int, rank: int, out: Path) -> dict[str, Path]:
    """n random adapters (all four linears, every layer) in peft's format."""
    from neoxray.model.lora import TARGETS, LoRAAdapter, LoRASpec
    from neoxray.model.peft_format import write_peft_adapter

    d, f = cfg.d_model, cfg.ffn_dim
    shapes = {"query_key_value": (d, 3 * d), "dense": (d, d), "dense_h_to_4h": (d, f), "dense_4h_to_h": (f, d)}
    sub = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
    dirs = {}
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        tensors = {}
        for layer in range(cfg.n_layers):
            for t in TARGETS:
                i, o = shapes[t]
                tensors[f"layers.{layer}.{sub[t]}.{t}.lora_A"] = torch.randn(rank, i, generator=g) / i**0.5
                tensors[f"layers.{layer}.{sub[t]}.{t}.lora_B"] = torch.randn(o, rank, generator=g) * 0.01
        adapter = LoRAAdapter(LoRASpec(r=rank, alpha=2.0 * rank), tensors, name=f"lora{k}")
        dirs[f"lora{k}"] = write_peft_adapter(adapter, out / f"lora{k}")
    return dirs


def lora_engine_runs(args, ours, tok, dirs: dict[str, Path], prompts: dict) -> dict:
    """One engine holding every adapter: the base alone, then the adapters spread over the clients."""
    from neoxray.model.peft_format import read_peft_adapter

    c, names = max(args.clients_list), list(dirs)
    engine = make_engine(ours, tok, args, c, max_loras=args.loras, max_lora_rank=args.lora_rank)
    for name, d in dirs.items():
        engine.add_lora(name, read_peft_adapter(d, engine.model_config, name), str(d))
    engine.start()
    warm = prompts_for(len(names), args.prompt_len, tok, seed=3)
    asyncio.run(run_clients(engine_sender(engine, 4, names), warm, len(names), 1))  # warm-up, every adapter
    results = {}
    results["base"] = asyncio.run(
        run_clients(engine_sender(engine, args.max_tokens), prompts["base"], c, args.requests_per_client)
    )
    results["loras"] = asyncio.run(
        run_clients(engine_sender(engine, args.max_tokens, names), prompts["loras"], c, args.requests_per_client)
    )
    results["mixed_forwards"] = engine.runner.mixed_forwards
    engine.stop(timeout=10)
    return results


def lora_http_runs(args, ours, tok, dirs: dict[str, Path], prompts: dict, tmp: Path) -> dict:
    """`neoxray serve --lora NAME=DIR ...`: the base alone, then the adapters spread over the clients."""
    from neoxray.model.hf import save_pretrained

    c, names = max(args.clients_list), list(dirs)
    model_dir = save_pretrained(ours, tmp / "model", tokenizer=tok)
    extra = [x for name, d in dirs.items() for x in ("--lora", f"{name}={d}")] + ["--max-loras", str(args.loras)]
    with http_server(model_dir, args, tmp / "serve.log", extra) as url:
        warm = prompts_for(len(names), args.prompt_len, tok, seed=3)
        http_run(url, warm, len(names), args.requests_per_client, 4, names)  # warm-up, every adapter
        return {
            "base": http_run(url, prompts["base"], c, args.requests_per_client, args.max_tokens),
            "loras": http_run(url, prompts["loras"], c, args.requests_per_client, args.max_tokens, names),
        }


def lora_benchmark(args, cfg, ours, tok, tmp: Path, hf) -> int:
    c = max(args.clients_list)
    dirs = write_adapters(cfg, args.loras, args.lora_rank, tmp / "loras")
    n_req = c * args.requests_per_client
    prompts = {
        "base": prompts_for(n_req, args.prompt_len, tok, seed=1),
        "loras": prompts_for(n_req, args.prompt_len, tok, seed=2),  # fresh prompts: no prefix-cache advantage
    }
    del hf
    if args.mode == "engine":
        results = lora_engine_runs(args, ours, tok, dirs, prompts)
    else:
        results = lora_http_runs(args, ours, tok, dirs, prompts, tmp)
    ratio = results["loras"]["tokens_per_s"] / results["base"]["tokens_per_s"]
    report = report_head("serve_throughput --loras", args, cfg)
    report.update(clients=c, prompt_len=args.prompt_len, max_tokens=args.max_tokens, loras=args.loras)
    report.update(lora_rank=args.lora_rank, **results, ratio_loras_vs_base=ratio)
    print(f"\n{'run':>28} {'tok/s':>10} {'p50 lat s':>10} {'p99 lat s':>10} {'p50 TTFT':>9}")
    for key, label in (("base", f"{c} clients, base model"), ("loras", f"{c} clients, {args.loras} adapters")):
        r = results[key]
        print(
            f"{label:>28} {r['tokens_per_s']:>10.1f} {r['latency_p50_s']:>10.3f} {r['latency_p99_s']:>10.3f} "
            f"{r['ttft_p50_s']:>9.3f}"
        )
    print(f"multi-LoRA / base-only throughput: {ratio:.2f}x (goal on CPU: >= 0.8x)")
    write_json(args.json, report, announce=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
