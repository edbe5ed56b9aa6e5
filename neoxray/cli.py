"""`neoxray` command line: `main` parses the arguments (`neoxray.cli_parser`) and runs the subcommand's function
from `COMMANDS`, which hands them to one function of the package and prints what it returns (a table, a line, or
JSON). A `NeoxrayError`, from the arguments or the work, becomes one line on stderr and exit status 1; Ctrl-C
exits 130."""

from __future__ import annotations

import json
import os
import sys

from neoxray.cli_parser import SERVE_LIMITS, build_parser
from neoxray.errors import NeoxrayError


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
    from neoxray.model.new_model import write_new_model

    config, out = write_new_model(args.preset, args.tokenizer, args.out, seed=args.seed, dtype=_dtype(args.dtype))
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
        content=args.format,
        chat_template=args.chat_template,
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
                "format": m.get("content", "text"),
                **{k: m[k] for k in ("documents", "tokens", "rows", "dropped_tokens", "bad_rows", "seq_len")},
            }
        )
    elif not result.skipped:
        print(
            f"prepared {m['rows']:,} rows of {m['seq_len'] + 1} tokens ({m['documents']:,} documents, "
            f"{m['tokens']:,} tokens) in {result.output}"
        )


def _engine_options(args):
    from neoxray.platform.offline import OfflineOptions

    return OfflineOptions(
        device=args.device,
        dtype=_dtype(args.dtype),
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        lora=args.lora,
    )


def cmd_generate(args) -> None:
    from neoxray.model.decoding import SamplingParams
    from neoxray.platform.offline import generate_text

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    out = generate_text(args.model, _engine_options(args), args.prompt, params)
    if args.json:
        _print_json(out)
    else:
        print(args.prompt + out["text"])


def cmd_score(args) -> None:
    from neoxray.platform.offline import score_text

    ids, logprobs, tok = score_text(args.model, _engine_options(args), args.text)
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
        run_local(cfg, run_dir=args.run_dir, verbose=args.verbose, start_over=args.start_over)
    else:
        run_train(
            cfg,
            run_dir=args.run_dir,
            address=args.address,
            max_failures=args.max_failures,
            verbose=args.verbose,
            start_over=args.start_over,
        )


def cmd_export(args) -> None:
    from neoxray.platform.export import export

    dtype = _dtype(args.dtype)
    done = export(args.checkpoint, args.out, merge=args.merge, dtype=dtype, chat_template=args.chat_template)
    chat = f", chat template {done.chat_template}" if done.chat_template else ""
    print(f"exported {done.checkpoint} to {done.out} ({done.what}{chat})")


def cmd_report(args) -> None:
    from neoxray.platform.train.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")


def cmd_plan(args) -> None:
    from neoxray.model.config import get_preset

    if args.serve:
        from neoxray.platform.inference import memory

        if args.gpus is not None:
            raise NeoxrayError("--gpus plans training; with --serve give --tensor-parallel-size (GPUs per replica)")
        layout = memory.ServeLayout(
            get_preset(args.preset),
            int(args.gpu_memory * memory.GIB),
            args.tensor_parallel_size,
            None if args.quantization == "none" else args.quantization,
            dtype_bytes=4 if args.precision == "fp32" else 2,
            max_num_seqs=args.max_num_seqs,
            context=args.seq_len,
            kv_cache_tokens=args.kv_cache_tokens,
            memory_utilization=args.gpu_memory_utilization,
        )
        mem = memory.serve_memory(layout)
        print(
            json.dumps(mem.to_dict() | {"what_would_fit": memory.what_would_fit(layout)})
            if args.json
            else memory.format_serve_memory(mem)
        )
        return
    from neoxray.platform.train.plan import Assumptions, Cluster, Training, plan
    from neoxray.platform.train.plan_table import format_plan

    if args.gpus is None:
        raise NeoxrayError("plan needs --gpus (GPUs to train on), or --serve for a serving replica")
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
            lora_rank=args.lora_rank,
            lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
            lora_dropout=args.lora_dropout,
        ),
        Assumptions(peak_tflops=args.peak_tflops, mfu=args.mfu),
    )
    print(json.dumps(result.to_dict()) if args.json else format_plan(result))


def cmd_serve(args) -> None:
    from neoxray.platform.serve.args import ServeArgs
    from neoxray.platform.serve.run import run_serve

    serve_args = ServeArgs.from_flags(
        model=args.model,
        name=args.name,
        loras=args.lora,  # {NAME: DIR} from `--lora NAME=DIR` (cli_parser)
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        api_key=args.api_key,
        allowed_lora_path=args.allowed_lora_path,
        allow_unauthenticated_lora_updates=args.allow_unauthenticated_lora_updates,
        chat_template=args.chat_template,
        device=args.device,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        placement_strategy=args.placement_strategy,
        num_replicas=args.replicas,
        num_gpus=args.num_gpus,
        **{dest: getattr(args, dest) for dest in (flag[2:].replace("-", "_") for flag, _, _ in SERVE_LIMITS)},
    )
    run_serve(
        serve_args, host=args.host, port=args.port, address=args.address, no_ray=args.no_ray, verbose=args.verbose
    )


def cmd_eval(args) -> None:
    from neoxray.platform.eval.run import EvalArgs, run_eval

    run_eval(
        EvalArgs(
            model=args.model,
            lora=args.lora,
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
            tensor_parallel_size=args.tensor_parallel_size,
            quantization=args.quantization,
            address=args.address,
            bootstrap_iters=args.bootstrap_iters,
            verbose=args.verbose,
            apply_chat_template=args.apply_chat_template,
            chat_template=args.chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            system_instruction=args.system_instruction,
        )
    )


COMMANDS = {
    "model_info": cmd_model_info,
    "model_init": cmd_model_init,
    "tokenizer_train": cmd_tokenizer_train,
    "prepare": cmd_prepare,
    "generate": cmd_generate,
    "score": cmd_score,
    "train": cmd_train,
    "export": cmd_export,
    "report": cmd_report,
    "plan": cmd_plan,
    "serve": cmd_serve,
    "eval": cmd_eval,
}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
            from neoxray.ray_connection import prepare_local_cluster

            prepare_local_cluster()  # before anything imports Ray: a cluster we start is closed to the network
        COMMANDS[args.command](args)
    except NeoxrayError as e:
        print(f"neoxray: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("neoxray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
