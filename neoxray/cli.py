"""`neoxray` command line: each subcommand parses its arguments and calls one function. No logic here."""

from __future__ import annotations

import argparse
import json
import os
import sys

from neoxray.errors import NeoxrayError
from neoxray.model.precision import DTYPE_CHOICES, PRECISIONS


def _dtype(name: str):
    from neoxray.model.precision import to_dtype

    return to_dtype(name, "--dtype")


def _print_json(obj) -> None:
    print(json.dumps(obj))


# ----------------------------------------------------------------------------------------------- commands
def cmd_model_info(args) -> None:
    from neoxray.model.config import get_preset
    from neoxray.model.info import format_info, model_info

    info = model_info(get_preset(args.preset), args.seq_len)
    print(json.dumps(info) if args.json else format_info(info))


def cmd_model_init(args) -> None:
    from neoxray.model.config import get_preset, pad_vocab
    from neoxray.model.gptneox import build_model
    from neoxray.model.hf import save_pretrained
    from neoxray.model.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    overrides = {"eos_token_id": tok.eod_id, "bos_token_id": tok.eod_id, "tokenizer_vocab_size": tok.vocab_size}
    config = get_preset(args.preset)
    if tok.vocab_size > config.vocab_size:
        overrides["vocab_size"] = pad_vocab(tok.vocab_size)
    config = get_preset(args.preset, **overrides)
    model = build_model(config, seed=args.seed)
    out = save_pretrained(model, args.out, tokenizer=tok, dtype=_dtype(args.dtype))
    print(f"wrote a randomly initialised {config.name} model ({config.num_parameters():,} parameters) to {out}")


def cmd_tokenizer_train(args) -> None:
    from neoxray.pipelines.tokenizer_training import train_tokenizer_from_files

    tok = train_tokenizer_from_files(args.input, args.vocab_size, args.output)
    print(f"trained a byte-level BPE with {tok.vocab_size} tokens; saved to {args.output}")


def cmd_prepare(args) -> None:
    from neoxray.pipelines.prepare import prepare

    result = prepare(
        args.input,
        args.tokenizer,
        args.seq_len,
        args.output,
        val_fraction=args.val_fraction,
        workers=args.workers,
        text_key=args.text_key,
        by_component=args.by_component,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    m = result.manifest
    if args.json:
        _print_json(
            {
                "output": result.output,
                "skipped": result.skipped,
                **{k: m[k] for k in ("documents", "tokens", "rows", "dropped_tokens", "bad_rows", "seq_len")},
            }
        )
    elif not result.skipped:
        print(
            f"prepared {m['rows']:,} rows of {m['seq_len'] + 1} tokens ({m['documents']:,} documents, "
            f"{m['tokens']:,} tokens) in {result.output}"
        )


def _load(args):
    from neoxray.platform.model_loading import load_for_inference

    model, tok, _ = load_for_inference(args.model, device=args.device, dtype=_dtype(args.dtype))
    return model, tok


def cmd_generate(args) -> None:
    from neoxray.model.decoding import SamplingParams
    from neoxray.model.generate import generate

    model, tok = _load(args)
    ids = tok.encode(args.prompt)
    if not ids:
        raise NeoxrayError("--prompt encodes to no tokens")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    out = generate(model, [ids], params, tokenizer=tok)[0]
    if args.json:
        _print_json(
            {
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
                "prompt_tokens": len(ids),
            }
        )
    else:
        print(args.prompt + out.text)


def cmd_score(args) -> None:
    from neoxray.model.generate import score

    model, tok = _load(args)
    ids = tok.encode(args.text)
    logprobs = score(model, ids)
    if args.json:
        _print_json({"tokens": ids, "logprobs": logprobs})
    else:
        total = sum(lp for lp in logprobs if lp is not None)
        for t, lp in zip(ids, logprobs):
            print(f"{t:>8} {tok.decode([t])!r:<24} {'' if lp is None else f'{lp:.4f}'}")
        print(f"total log-probability {total:.4f} over {len(ids) - 1} predicted tokens")


def cmd_train(args) -> None:
    from neoxray.platform.train.config import check_paths, load_run_config
    from neoxray.platform.train.driver import run_train
    from neoxray.platform.train.local import run_local

    cfg = load_run_config(args.config, args.overrides)
    check_paths(cfg)
    if args.no_ray:
        run_local(cfg, run_dir=args.run_dir, verbose=args.verbose)
    else:
        run_train(cfg, run_dir=args.run_dir, address=args.address, max_failures=args.max_failures, verbose=args.verbose)


def cmd_export(args) -> None:
    from neoxray.platform.checkpoint import export_checkpoint
    from neoxray.platform.model_loading import resolve_checkpoint_path

    ckpt = resolve_checkpoint_path(args.checkpoint)  # a run directory: its newest complete checkpoint
    out = export_checkpoint(ckpt, args.out, dtype=_dtype(args.dtype))
    print(f"exported {ckpt} to {out}")


def cmd_report(args) -> None:
    from neoxray.platform.train.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")


def cmd_plan(args) -> None:
    from neoxray.model.config import get_preset
    from neoxray.platform.train.plan import Assumptions, Cluster, Training, plan
    from neoxray.platform.train.plan_table import format_plan

    ckpt = {"auto": None, "on": True, "off": False}[args.activation_checkpointing]
    result = plan(
        get_preset(args.preset),
        Cluster(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, gpus_per_node=args.gpus_per_node),
        Training(
            global_batch=args.global_batch,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            precision=args.precision,
            zero_stage=args.zero_stage,
            activation_checkpointing=ckpt,
        ),
        Assumptions(peak_tflops=args.peak_tflops, mfu=args.mfu),
    )
    print(json.dumps(result.to_dict()) if args.json else format_plan(result))


def cmd_serve(args) -> None:
    from pydantic import ValidationError

    from neoxray.platform.serve.args import ServeArgs
    from neoxray.platform.serve.run import run_serve

    given = dict(
        model=args.model,
        name=args.name,
        api_key=args.api_key,
        device=args.device,
        dtype=args.dtype,
        num_replicas=args.replicas,
        num_gpus=args.num_gpus,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        max_num_seqs=args.max_num_seqs,
        max_running_per_request=args.max_running_per_request,
        kv_cache_tokens=args.kv_cache_tokens,
        max_request_bytes=args.max_request_bytes,
        max_seqs_per_request=args.max_seqs_per_request,
        max_embedding_inputs=args.max_embedding_inputs,
        max_embedding_tokens=args.max_embedding_tokens,
    )
    try:
        serve_args = ServeArgs(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise NeoxrayError(f"serve: {'.'.join(map(str, err['loc']))}: {msg}") from None
    run_serve(
        serve_args, host=args.host, port=args.port, address=args.address, no_ray=args.no_ray, verbose=args.verbose
    )


def cmd_eval(args) -> None:
    from neoxray.platform.eval.run import EvalArgs, run_eval

    run_eval(
        EvalArgs(
            model=args.model,
            tasks=[t.strip() for t in (args.tasks or "").split(",") if t.strip()],
            suite=args.suite,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            include_path=args.include_path or [],
            batch_size=args.batch_size,
            replicas=args.replicas,
            num_gpus=args.num_gpus,
            kv_cache_tokens=args.kv_cache_tokens,
            output=args.output,
            log_samples=args.log_samples,
            json=args.json,
            device=args.device,
            dtype=args.dtype,
            address=args.address,
            bootstrap_iters=args.bootstrap_iters,
            verbose=args.verbose,
        )
    )


# ----------------------------------------------------------------------------------------------- parser
def _parser_class():
    class Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("formatter_class", _Help)
            super().__init__(*args, **kwargs)

    return Parser


class _Help(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless there is none to show or the text already gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from neoxray import __version__

    p = argparse.ArgumentParser(prog="neoxray", description="GPT-NeoX-family models on Ray.", formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"neoxray {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_parser_class())

    model = sub.add_parser("model", help="model presets: info, init").add_subparsers(dest="model_cmd", required=True)
    info = model.add_parser("info", help="parameters, FLOPs per token and training memory of a preset")
    info.add_argument("preset", help="a preset name: neox-20b, pythia-70m ... pythia-12b, tiny, tiny-neox, tiny-seq")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (preset's by default)")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(func=cmd_model_info)
    init = model.add_parser("init", help="write a randomly initialised model as a Hugging Face directory")
    init.add_argument("--preset", required=True, help="the architecture (see `neoxray model info`)")
    init.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a hub id")
    init.add_argument("--out", required=True, help="the Hugging Face directory to write")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.add_argument("--dtype", choices=PRECISIONS, default="fp32", help="the stored dtype")
    init.set_defaults(func=cmd_model_init)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_cmd", required=True)
    train = tok.add_parser("train", help="train a GPT-NeoX-style byte-level BPE on text or Pile shards")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary (at least 258)")
    train.add_argument("--output", required=True, help="the folder to save the tokenizer in")
    train.set_defaults(func=cmd_tokenizer_train)

    prep = sub.add_parser("prepare", help="tokenize and pack Pile-format shards into a training dataset (Ray Data)")
    prep.add_argument(
        "--input",
        nargs="+",
        required=True,
        help=".jsonl/.jsonl.gz/.jsonl.zst files, directories or globs; local or s3://, gs://, ...",
    )
    prep.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a hub id")
    prep.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence (rows hold N+1)")
    prep.add_argument("--output", required=True, help="dataset directory (local or a URI)")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer actors (default: cluster CPUs - 1)")
    prep.add_argument("--text-key", default="text", help="JSON key of the document text")
    prep.add_argument(
        "--by-component",
        action="store_true",
        help="pack each pile_set_name separately, so that components can be mixed with weights",
    )
    prep.add_argument("--overwrite", action="store_true", help="rebuild a finished dataset")
    prep.add_argument("--quiet", action="store_true", help="no progress lines")
    prep.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    prep.set_defaults(func=cmd_prepare)

    def model_args(sp):
        sp.add_argument(
            "--model",
            required=True,
            help="exported Hugging Face directory, training checkpoint, or run directory (its newest)",
        )
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto, a GPU if any)")
        sp.add_argument(
            "--dtype", choices=DTYPE_CHOICES, default="auto", help="default: auto (bf16 on GPUs, fp32 on CPUs)"
        )
        sp.add_argument("--json", action="store_true", help="one JSON object")

    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    model_args(gen)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most")
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep the tokens of this probability mass"
    )
    gen.add_argument(
        "--seed", type=int, default=None, help="sampling seed: the same seed gives the same text (default: random)"
    )
    gen.add_argument("--stop", action="append", help="stop string, repeatable; in bash $'\\n\\n' is two newlines")
    gen.set_defaults(func=cmd_generate)

    sc = sub.add_parser("score", help="per-token log-probabilities of a text")
    model_args(sc)
    sc.add_argument("--text", required=True, help="the text to score")
    sc.set_defaults(func=cmd_score)

    tr = sub.add_parser("train", help="3D-parallel training on Ray Train (DeepSpeed pipeline + ZeRO-1, Megatron TP)")
    tr.add_argument("--config", default=None, help="run config YAML (overrides the defaults)")
    tr.add_argument("--run-dir", default=None, help="where checkpoints, metrics and TensorBoard logs go")
    tr.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    tr.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="restarts of the worker group after a fault (a killed worker, a lost node), from the newest checkpoint; "
        "user errors are never retried",
    )
    tr.add_argument(
        "--verbose", action="store_true", help="show Ray's, Ray Train's and DeepSpeed's own output on the console"
    )
    tr.add_argument(
        "--no-ray",
        action="store_true",
        help="run the engine without Ray: one process, or under torchrun (its world = dp x tp x pp)",
    )
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. parallel.tensor=2")
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help="merge a training checkpoint into a Hugging Face GPT-NeoX directory")
    ex.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (its newest)")
    ex.add_argument("--out", required=True, help="the Hugging Face directory to write")
    ex.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="stored dtype; auto: the training precision")
    ex.set_defaults(func=cmd_export)

    rp = sub.add_parser("report", help="an HTML page with plots of a training run (loss, lr, grad norm, throughput)")
    rp.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    rp.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    rp.set_defaults(func=cmd_report)

    pl = sub.add_parser("plan", help="which dp x tp x pp layouts of a preset fit N GPUs: memory and step time")
    pl.add_argument("preset", help="a preset name (see `neoxray model info`)")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs to train on (dp x tp x pp)")
    pl.add_argument(
        "--gpu-memory", type=float, required=True, metavar="GB", help="memory per GPU, GiB (40 for an A100 40GB)"
    )
    pl.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="tensor parallelism stays inside a node (default: all GPUs in one node)",
    )
    pl.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    pl.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    pl.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward on one replica")
    pl.add_argument("--precision", choices=PRECISIONS, default="bf16", help="training precision")
    pl.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 1],
        default=1,
        help="ZeRO stage (DeepSpeed's pipeline engine takes 0 or 1)",
    )
    pl.add_argument(
        "--activation-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: only where a layout needs it to fit",
    )
    pl.add_argument(
        "--peak-tflops", type=float, default=312.0, help="dense 16-bit peak TFLOP/s per GPU (312: A100, 989: H100)"
    )
    pl.add_argument("--mfu", type=float, default=0.40, help="fraction of the peak the layers reach")
    pl.add_argument("--json", action="store_true", help="one JSON object with the feasible and rejected layouts")
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API on Ray Serve")
    sv.add_argument(
        "--model",
        required=True,
        help="exported Hugging Face directory, training checkpoint, or run directory (its newest)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sv.add_argument("--replicas", type=int, default=1, help="model replicas, each with its own engine (default 1)")
    sv.add_argument("--num-gpus", type=float, default=0, help="GPUs per model replica (default 0)")
    sv.add_argument("--name", default=None, help="model id clients send (default: the directory name)")
    sv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: NEOXRAY_API_KEY, else "
        "none; an empty key is refused)",
    )
    sv.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    sv.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="default auto: bf16 on GPUs, fp32 on CPUs")
    sv.add_argument(
        "--max-ongoing-requests", type=int, default=64, help="requests a model replica takes at once (default 64)"
    )
    sv.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="requests queued for the model replicas beyond which the server answers 503 (default 256; -1: none)",
    )
    sv.add_argument(
        "--max-num-seqs", type=int, default=32, help="sequences decoded together per model replica (default 32)"
    )
    sv.add_argument(
        "--max-running-per-request",
        type=int,
        default=None,
        help="most sequences of one request in the batch at once (default: half of --max-num-seqs)",
    )
    sv.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="KV cache token budget per model replica (default: max-num-seqs x the context)",
    )
    sv.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="largest request body accepted; larger ones get 413 (default 8388608, 8 MiB)",
    )
    sv.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=None,
        help="most sequences (n x prompts) one completion request may ask for (default 64)",
    )
    sv.add_argument(
        "--max-embedding-inputs", type=int, default=None, help="most inputs of one embeddings request (default 128)"
    )
    sv.add_argument(
        "--max-embedding-tokens",
        type=int,
        default=None,
        help="most tokens of one embeddings request, all inputs together (default 65536)",
    )
    sv.add_argument("--verbose", action="store_true", help="show Ray's and Ray Serve's own output on the console")
    sv.add_argument("--no-ray", action="store_true", help="one engine under uvicorn in this process, without Ray")
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks on neoxray's inference engine (docs/evaluation.md)")
    ev.add_argument(
        "--model",
        required=True,
        help="exported Hugging Face directory, training checkpoint, or run directory (its newest)",
    )
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval task or group names (globs such as mmlu_* too)"
    )
    which.add_argument(
        "--suite",
        choices=["model-card", "leaderboard"],
        default=None,
        help="the GPT-NeoX-20B model card's tables, with the card's figures beside ours: model-card (zero-shot "
        "LAMBADA, SciQ, PIQA, TriviaQA, ARC-Challenge) or leaderboard (the Open LLM Leaderboard's seven)",
    )
    ev.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: each task's own)"
    )
    ev.add_argument("--limit", type=float, default=None, help="documents per task at most; below 1, that share of them")
    ev.add_argument(
        "--include-path",
        action="append",
        default=None,
        help="a folder of task YAMLs (local tasks, local data; they override built-in tasks of the same name), "
        "repeatable",
    )
    ev.add_argument("--batch-size", type=int, default=32, help="sequences in each engine's batch (its max_num_seqs)")
    ev.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engines, each with its own copy of the model; more than 1 (or --address) runs them on Ray",
    )
    ev.add_argument("--num-gpus", type=float, default=0, help="GPUs per Ray replica")
    ev.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="KV cache budget per engine in tokens (default: batch-size x (context + 1), at most the larger of "
        "8192 and 4 x (context + 1))",
    )
    ev.add_argument("--output", default=None, help="write lm-eval's results JSON to this file")
    ev.add_argument(
        "--log-samples",
        action="store_true",
        help="also write each task's per-sample records beside --output (<stem>_samples_<task>.jsonl)",
    )
    ev.add_argument("--json", action="store_true", help="print lm-eval's results JSON instead of the table")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto: a GPU if any)")
    ev.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on GPUs, fp32 on CPUs")
    ev.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (runs the engines on Ray; default with --replicas > 1: "
        "RAY_ADDRESS, else a local one)",
    )
    ev.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100000,
        help="bootstrap resamples for the stderr of perplexity-like metrics (lm-eval's default; 0: no stderrs)",
    )
    ev.add_argument("--verbose", action="store_true", help="show Ray's own output on the console")
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
        from neoxray.platform.ray_cluster import require_token_auth

        require_token_auth()  # before anything imports Ray: a cluster we start has token auth by our choice
    try:
        args.func(args)
    except NeoxrayError as e:
        print(f"neoxray: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("neoxray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
