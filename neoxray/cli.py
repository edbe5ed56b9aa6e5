"""`neoxray` command line: each subcommand parses its arguments and calls one function. No logic here."""

from __future__ import annotations

import argparse
import json
import sys

from neoxray.errors import NeoxrayError


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str):
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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
    from neoxray.model.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.output)
    print(f"trained a byte-level BPE with {tok.vocab_size} tokens; saved to {args.output}")


def _load(args):
    from neoxray.model.hf import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model, device=_device(args.device), dtype=_dtype(args.dtype))


def cmd_generate(args) -> None:
    from neoxray.model.generate import SamplingParams, generate

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
        _print_json({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                     "prompt_tokens": len(ids)})
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


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neoxray", description="GPT-NeoX-family models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model presets: info, init").add_subparsers(dest="model_cmd", required=True)
    info = model.add_parser("info", help="parameters, FLOPs per token and training memory of a preset")
    info.add_argument("preset")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (preset's by default)")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(func=cmd_model_info)
    init = model.add_parser("init", help="write a randomly initialised model as a Hugging Face directory")
    init.add_argument("--preset", required=True)
    init.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a hub id")
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    init.set_defaults(func=cmd_model_init)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_cmd", required=True)
    train = tok.add_parser("train", help="train a GPT-NeoX-style byte-level BPE on text or Pile shards")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True)
    train.set_defaults(func=cmd_tokenizer_train)

    def model_args(sp):
        sp.add_argument("--model", required=True, help="Hugging Face GPT-NeoX directory")
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        sp.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
        sp.add_argument("--json", action="store_true", help="one JSON object")

    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=cmd_generate)

    sc = sub.add_parser("score", help="per-token log-probabilities of a text")
    model_args(sc)
    sc.add_argument("--text", required=True)
    sc.set_defaults(func=cmd_score)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
