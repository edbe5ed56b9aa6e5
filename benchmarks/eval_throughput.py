"""Evaluation throughput: `neoxray eval`'s lm-eval backend (neoxray's continuous-batching engine) against
lm-eval's own `hf` backend (transformers) on the same model, weights and multiple-choice task, in one run.

Workload: a local multiple-choice task written here, lm-eval's format (4 choices per question, each choice a few
words, every question's context about `--context-tokens` tokens, shared by its 4 choices): lm-eval turns it
into 4 loglikelihood requests per question. Both backends are built first (model loading is not timed); we time
lm-eval's `loglikelihood` call of each, report requests per second and the ratio, and check that both gave the
same answers (identical acc and acc_norm, every log-likelihood within `--rtol`).

    python benchmarks/eval_throughput.py                       # Pythia-160M shape, random weights, CPU
    python benchmarks/eval_throughput.py --questions 25 --layers 2 --json /tmp/eval.json   # a quick look

The model has random weights (throughput does not depend on them) and is saved once as a Hugging Face directory
that both backends load. The tokenizer is ../shared/tokenizers/gpt-neox-20b when present, else one trained on
the bundled sample (as benchmarks/serve_throughput.py does).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import SAMPLE, device_name, load_tokenizer, loadavg, log, machine, now, write_json

TASK = "neoxray_bench_choice"
WARMUP = "neoxray_bench_warmup"


def save_model(preset: str, layers: int | None, tok, out: Path) -> Path:
    """A randomly initialised model of the preset's shape (the tokenizer's vocabulary), as a Hugging Face dir."""
    from neoxray.model.config import get_preset
    from neoxray.model.gptneox import build_model
    from neoxray.model.hf import save_pretrained

    overrides = {"n_layers": layers} if layers else {}
    if tok.vocab_size > get_preset(preset).vocab_size:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} tokens, more than {preset}'s vocabulary")
    cfg = get_preset(preset, eos_token_id=tok.eod_id, bos_token_id=tok.eod_id, **overrides)
    return save_pretrained(build_model(cfg, seed=0), out, tokenizer=tok)


def sample_words() -> list[str]:
    """The words of the bundled sample's English documents (the Python Language Reference topics)."""
    import zstandard

    words: list[str] = []
    with open(SAMPLE, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            doc = json.loads(line)
            if doc.get("meta", {}).get("pile_set_name") == "Python-Docs":
                words.extend(doc["text"].split())
    return words


def write_task(folder: Path, name: str, tok, questions: int, context_tokens: int, seed: int) -> Path:
    """The multiple-choice task `name` (YAML + JSON Lines) in `folder`: each question's context is a passage of
    the sample's English text of about context_tokens tokens; its 4 choices are short passages (2 to 5 words)."""
    rng = random.Random(seed)
    words = sample_words()
    rows = []
    for _ in range(questions):
        start = rng.randrange(len(words) - 4 * context_tokens)
        end = start + context_tokens // 2
        while len(tok.encode(" ".join(words[start:end]))) < context_tokens:
            end += 1
        choices = []
        for _ in range(4):
            at = rng.randrange(len(words) - 5)
            choices.append(" ".join(words[at : at + rng.randint(2, 5)]))
        rows.append({"context": " ".join(words[start:end]), "choices": choices, "label": rng.randrange(4)})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{context}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n"
    )
    return folder


def timed_run(lm, tm, warmup: bool) -> dict:
    """lm-eval on the task with `lm`, timing only its loglikelihood calls, after an untimed run of the warmup
    task (other questions: first calls pay for memory first touched and kernels first built, on both sides)."""
    import lm_eval

    if warmup:
        lm_eval.simple_evaluate(model=lm, tasks=[WARMUP], task_manager=tm, bootstrap_iters=0)
    spent = {"s": 0.0, "requests": 0}
    inner = lm.loglikelihood

    def loglikelihood(requests, *a, **k):
        t0 = time.perf_counter()
        out = inner(requests, *a, **k)
        spent["s"] += time.perf_counter() - t0
        spent["requests"] += len(requests)
        return out

    lm.loglikelihood = loglikelihood  # the evaluator looks the method up on the instance
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, log_samples=True, bootstrap_iters=0)
    res = results["results"][TASK]
    return {
        "requests": spent["requests"],
        "seconds": spent["s"],
        "requests_per_s": spent["requests"] / spent["s"],
        "acc": res["acc,none"],
        "acc_norm": res["acc_norm,none"],
        "loglikelihoods": [r[0][0] for s in results["samples"][TASK] for r in s["resps"]],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-160m", help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--questions", type=int, default=100, help="questions (x 4 choices = requests)")
    p.add_argument("--context-tokens", type=int, default=100, help="tokens of each question's shared context")
    p.add_argument("--batch-size", type=int, default=32, help="both backends' batch size")
    p.add_argument("--prefill-chunk", type=int, default=None, help="the engine's prompt tokens per step")
    p.add_argument("--no-group-by-context", action="store_true", help="submit longest first, not by context")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=8, help="questions of another task run untimed first, both sides")
    p.add_argument("--rtol", type=float, default=1e-3, help="log-likelihoods must agree within this")
    p.add_argument("--json", default=None, help="write the results here too")
    return p.parse_args(argv)


def run_both(args) -> tuple[dict, dict]:
    """The model, the tasks and both backends in a temporary folder; lm-eval's hf backend, then ours."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from neoxray.platform.eval.lm import NeoxrayLM

    with tempfile.TemporaryDirectory(prefix="neoxray-eval-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tok = load_tokenizer(tmp)
        model_dir = save_model(args.preset, args.layers, tok, tmp / "model")
        write_task(tmp, TASK, tok, args.questions, args.context_tokens, seed=0)
        write_task(tmp, WARMUP, tok, args.warmup, args.context_tokens, seed=1)
        tm = TaskManager(include_path=str(tmp), include_defaults=False)
        log(f"model {args.preset} ({args.layers or 'all'} layers, random weights) in {model_dir}")
        hf = HFLM(pretrained=str(model_dir), device=args.device, dtype="float32", batch_size=args.batch_size)
        ours = NeoxrayLM(
            pretrained=str(model_dir),
            device=args.device,
            dtype="fp32",
            batch_size=args.batch_size,
            prefill_chunk=args.prefill_chunk,
            group_by_context=not args.no_group_by_context,
        )
        log("running lm-eval's hf backend")
        base = timed_run(hf, tm, args.warmup > 0)
        log("running the neoxray backend")
        return base, timed_run(ours, tm, args.warmup > 0)


def print_results(base: dict, mine: dict, ratio: float, worst: float, same: bool, rtol: float) -> None:
    print(
        f"lm-eval hf backend : {base['requests_per_s']:8.2f} requests/s ({base['requests']} in {base['seconds']:.2f} s)"
    )
    print(
        f"neoxray backend    : {mine['requests_per_s']:8.2f} requests/s ({mine['requests']} in {mine['seconds']:.2f} s)"
    )
    print(f"ratio              : {ratio:8.2f}x")
    print(
        f"check: acc {mine['acc']:.4f} vs {base['acc']:.4f}, acc_norm {mine['acc_norm']:.4f} vs {base['acc_norm']:.4f},"
        f" worst log-likelihood rel diff {worst:.2e} (rtol {rtol:g}) -> {'OK' if same else 'MISMATCH'}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, mine = run_both(args)
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine["loglikelihoods"], base["loglikelihoods"]))
    same = mine["acc"] == base["acc"] and mine["acc_norm"] == base["acc_norm"] and worst <= args.rtol
    ratio = mine["requests_per_s"] / base["requests_per_s"]
    print_results(base, mine, ratio, worst, same, args.rtol)
    report = {
        "date": now(),
        "machine": machine(),
        "device": device_name(torch.device(args.device)),
        "loadavg": loadavg(),
        "torch_threads": torch.get_num_threads(),
        **{k: getattr(args, k) for k in ("preset", "layers", "questions", "context_tokens", "batch_size")},
        "warmup_questions": args.warmup,
        "prefill_chunk": args.prefill_chunk,
        "group_by_context": not args.no_group_by_context,
        "hf": {k: v for k, v in base.items() if k != "loglikelihoods"},
        "neoxray": {k: v for k, v in mine.items() if k != "loglikelihoods"},
        "ratio": ratio,
        "max_loglikelihood_rel_diff": worst if math.isfinite(worst) else None,
        "results_equal": same,
    }
    write_json(args.json, report, announce=False)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
