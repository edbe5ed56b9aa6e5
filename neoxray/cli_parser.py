"""The `neoxray` command line's arguments. `build_parser` assembles one small builder per subcommand; each adds its
subparser's flags and names its command (`set_defaults(command=...)`), which `neoxray.cli` maps to the one
function that runs it. Flags several subcommands share (`--model`, `--address`) are written once. A subcommand that
takes dotted `KEY=VALUE` overrides (`train`) takes them anywhere on the line, before and after its options."""

from __future__ import annotations

import argparse

from neoxray.errors import NeoxrayError
from neoxray.model.lora_spec import TARGETS
from neoxray.model.precision import DTYPE_CHOICES, PRECISIONS

MODEL_HELP = "exported Hugging Face directory, training checkpoint, or run directory (its newest)"
SERVE_LIMITS = (  # `serve`'s integer limits, (flag, default, help); each sets the ServeArgs field of its name
    ("--max-ongoing-requests", 64, "requests a model replica takes at once (default 64)"),
    (
        "--max-queued-requests",
        256,
        "requests queued for the model replicas beyond which the server answers 503 (default 256; -1: none)",
    ),
    ("--max-num-seqs", 32, "sequences decoded together per model replica (default 32)"),
    (
        "--max-running-per-request",
        None,
        "most sequences of one request in the batch at once (default: half of --max-num-seqs)",
    ),
    ("--kv-cache-tokens", None, "KV cache token budget per model replica (default: max-num-seqs x the context)"),
    ("--max-request-bytes", None, "largest request body accepted; larger ones get 413 (default 8388608, 8 MiB)"),
    ("--max-seqs-per-request", None, "most sequences (n x prompts) one completion request may ask for (default 64)"),
    ("--max-embedding-inputs", None, "most inputs of one embeddings request (default 128)"),
    ("--max-embedding-tokens", None, "most tokens of one embeddings request, all inputs together (default 65536)"),
)


class _Help(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless there is none to show or the text already gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser. With `intermixed=True` its positionals may stand anywhere among its options
    (argparse's intermixed parsing), so `--run-dir D` between two `KEY=VALUE` overrides leaves both overrides."""

    def __init__(self, *args, intermixed: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # the subparsers action calls this; the intermixed parse itself calls it again (before Python 3.13)
        if not self.intermixed or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _NamedDirs(argparse.Action):
    """`--lora NAME=DIR`, repeatable, collected as {NAME: DIR}. A malformed or repeated one is a `NeoxrayError`
    (the CLI's one line), not argparse's usage message."""

    def __call__(self, parser, namespace, value, option_string=None):
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise NeoxrayError(
                f"{option_string} {value!r}: give NAME=DIR (the model name clients send, the adapter's directory)"
            )
        named = dict(getattr(namespace, self.dest, None) or {})
        if name in named:
            raise NeoxrayError(f"{option_string} {value!r}: the name {name!r} is given twice")
        named[name] = path
        setattr(namespace, self.dest, named)


def build_parser() -> argparse.ArgumentParser:
    from neoxray import __version__

    p = argparse.ArgumentParser(prog="neoxray", description="GPT-NeoX-family models on Ray.", formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"neoxray {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for build in (_model, _tokenizer, _prepare, _generate, _score, _train, _export, _report, _plan, _serve, _eval):
        build(sub)
    return p


# ------------------------------------------------------------------------------------------ shared flags
def _model_flag(sp) -> None:
    sp.add_argument("--model", required=True, help=MODEL_HELP)


def _address_flag(sp) -> None:
    sp.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")


def _inference_flags(sp) -> None:
    """`generate` and `score`: the model, an adapter, where and how it runs, JSON output."""
    _model_flag(sp)
    sp.add_argument(
        "--lora",
        default=None,
        metavar="DIR",
        help="a peft LoRA adapter directory of this base (ours or from the hub), applied to the model",
    )
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto, a GPU if any)")
    sp.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="default: auto (bf16 on GPUs, fp32 on CPUs)")
    _parallel_flags(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object")


def _parallel_flags(sp) -> None:
    """`generate`, `score`, `serve`, `eval`: how one engine's model is split and stored (vLLM's flag names)."""
    sp.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="workers one engine's model is split over, Megatron's way (heads, MLP, vocabulary); each reads only "
        "its shard (default 1)",
    )
    sp.add_argument(
        "--quantization",
        default=None,
        metavar="SCHEME",
        help="weight-only quantization of the linears through torchao: int8_weight_only or int4_weight_only "
        "(int4: CUDA GPUs); default: none",
    )


# ------------------------------------------------------------------------------------------ subcommands
def _model(sub) -> None:
    model = sub.add_parser("model", help="model presets: info, init").add_subparsers(dest="model_cmd", required=True)
    info = model.add_parser("info", help="parameters, FLOPs per token and training memory of a preset")
    info.add_argument("preset", help="a preset name: neox-20b, pythia-70m ... pythia-12b, tiny, tiny-neox, tiny-seq")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (preset's by default)")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(command="model_info")
    init = model.add_parser("init", help="write a randomly initialised model as a Hugging Face directory")
    init.add_argument("--preset", required=True, help="the architecture (see `neoxray model info`)")
    init.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a hub id")
    init.add_argument("--out", required=True, help="the Hugging Face directory to write")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.add_argument("--dtype", choices=PRECISIONS, default="fp32", help="the stored dtype")
    init.set_defaults(command="model_init")


def _tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_cmd", required=True)
    train = tok.add_parser("train", help="train a GPT-NeoX-style byte-level BPE on text or Pile shards")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary (at least 258)")
    train.add_argument("--output", required=True, help="the folder to save the tokenizer in")
    train.set_defaults(command="tokenizer_train")


def _prepare(sub) -> None:
    prep = sub.add_parser(
        "prepare",
        help="tokenize and pack Pile-format, prompt-completion or chat shards into a training dataset (Ray Data)",
    )
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
    prep.add_argument(
        "--format",
        default="text",
        metavar="{text,prompt-completion,chat}",
        help="input rows: text (Pile: a text key; every token trained), prompt-completion (prompt and completion "
        "keys; a loss mask trains only the completion and its end of document) or chat (a messages list, rendered "
        "with the chat template; a loss mask trains only the assistant turns) (default: text)",
    )
    prep.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_STRING",
        help="--format chat: the chat template (a Jinja file, a model directory, or the template itself) "
        "(default: the --tokenizer directory's, else neoxray's default)",
    )
    prep.add_argument("--text-key", default="text", help="JSON key of the document text (--format text)")
    prep.add_argument(
        "--by-component",
        action="store_true",
        help="pack each pile_set_name separately, so that components can be mixed with weights",
    )
    prep.add_argument("--overwrite", action="store_true", help="rebuild a finished dataset")
    prep.add_argument("--quiet", action="store_true", help="no progress lines")
    prep.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    prep.set_defaults(command="prepare")


def _generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    _inference_flags(gen)
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
    gen.set_defaults(command="generate")


def _score(sub) -> None:
    sc = sub.add_parser("score", help="per-token log-probabilities of a text")
    _inference_flags(sc)
    sc.add_argument("--text", required=True, help="the text to score")
    sc.set_defaults(command="score")


def _train(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="3D-parallel training on Ray Train (DeepSpeed pipeline + ZeRO-1, Megatron TP)",
        intermixed=True,  # KEY=VALUE overrides before, between and after the options
    )
    tr.add_argument("--config", default=None, help="run config YAML (overrides the defaults)")
    tr.add_argument("--run-dir", default=None, help="where checkpoints, metrics and TensorBoard logs go")
    _address_flag(tr)
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
    tr.add_argument(
        "--start-over",
        action="store_true",
        help="train from step 0 although the run directory holds checkpoints: they (and metrics.jsonl) are set "
        "aside under before-start-over-... (damaged ones as damaged-..., folders without meta.json as "
        "incomplete-...), never deleted",
    )
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. parallel.tensor=2")
    tr.set_defaults(command="train")


def _export(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="merge a training checkpoint into a Hugging Face GPT-NeoX directory (a LoRA run's: a peft adapter)",
    )
    ex.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (its newest)")
    ex.add_argument(
        "--out", required=True, help="the Hugging Face directory to write (a LoRA run: a peft adapter directory)"
    )
    ex.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: write the base with the adapter folded in as a full Hugging Face model, not the adapter",
    )
    ex.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="stored dtype; auto: the training precision")
    ex.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_STRING",
        help="the chat template to write into tokenizer_config.json: a file, a model directory or the template "
        "itself (default: the one the run trained with, if it trained on conversations)",
    )
    ex.set_defaults(command="export")


def _report(sub) -> None:
    rp = sub.add_parser("report", help="an HTML page with plots of a training run (loss, lr, grad norm, throughput)")
    rp.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    rp.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    rp.set_defaults(command="report")


def _plan(sub) -> None:
    pl = sub.add_parser(
        "plan",
        help="which dp x tp x pp layouts of a preset fit N GPUs: memory and step time; with --serve, whether a "
        "serving replica fits",
    )
    pl.add_argument("preset", help="a preset name (see `neoxray model info`)")
    pl.add_argument("--gpus", type=int, default=None, help="GPUs to train on (dp x tp x pp); required without --serve")
    pl.add_argument(
        "--gpu-memory", type=float, required=True, metavar="GB", help="memory per GPU, GiB (40 for an A100 40GB)"
    )
    pl.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="tensor parallelism stays inside a node (default: all GPUs in one node)",
    )
    pl.add_argument(
        "--seq-len", "--context", type=int, default=None, help="tokens per sequence (default: the preset's)"
    )
    pl.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    pl.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward on one replica")
    pl.add_argument(
        "--precision", choices=PRECISIONS, default="bf16", help="training precision; with --serve, the weights' dtype"
    )
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
    _plan_lora(pl)
    _plan_serve(pl)
    pl.add_argument("--json", action="store_true", help="one JSON object with the feasible and rejected layouts")
    pl.set_defaults(command="plan")


def _plan_serve(pl) -> None:
    """`plan --serve`: one serving replica instead of a training job (neoxray.platform.inference.memory)."""
    pl.add_argument(
        "--serve",
        action="store_true",
        help="plan a serving replica: do the weights, KV cache and activations fit --gpu-memory, and how many "
        "sequences of --context tokens",
    )
    pl.add_argument("--tensor-parallel-size", type=int, default=1, metavar="T", help="with --serve: GPUs per replica")
    pl.add_argument(
        "--quantization",
        default="none",
        metavar="Q",
        help="with --serve: none, int8_weight_only or int4_weight_only (the linears' weights)",
    )
    pl.add_argument("--max-num-seqs", type=int, default=32, help="with --serve: sequences decoded together")
    pl.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="with --serve: KV cache token budget (default: max-num-seqs x the context)",
    )
    pl.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        metavar="F",
        help="with --serve: share of --gpu-memory a replica may use, as vLLM's",
    )


def _plan_lora(pl) -> None:
    pl.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="LoRA fine-tuning with adapters of rank R on a frozen base (0: full training)",
    )
    pl.add_argument(
        "--lora-targets",
        default=",".join(TARGETS),
        metavar="M1,M2",
        help="the linears that get adapters (with --lora-rank)",
    )
    pl.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="LoRA dropout (with --lora-rank)")


def _serve(sub) -> None:
    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API on Ray Serve")
    _model_flag(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sv.add_argument("--replicas", type=int, default=1, help="model replicas, each with its own engine (default 1)")
    sv.add_argument(
        "--num-gpus",
        type=float,
        default=0,
        help="GPUs per model replica, or per worker of a tensor-parallel one (default 0)",
    )
    sv.add_argument("--name", default=None, help="model id clients send (default: the directory name)")
    _serve_loras(sv)
    sv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: NEOXRAY_API_KEY, else "
        "none; an empty key is refused)",
    )
    sv.add_argument(
        "--allowed-lora-path",
        default=None,
        metavar="DIR",
        help="runtime adapter loads (POST /v1/load_lora_adapter) read only under DIR (default: none, loads refused)",
    )
    sv.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_STRING",
        help="the template of /v1/chat/completions for every model: a Jinja file, a model directory, the template "
        "itself, or 'default' (neoxray's plain turns); default: each model's own (400 for a model with none)",
    )
    sv.add_argument(
        "--allow-unauthenticated-lora-updates",
        action="store_true",
        help="leave the runtime adapter routes open without --api-key (default: off, they answer 403 without a key)",
    )
    _address_flag(sv)
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    sv.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="default auto: bf16 on GPUs, fp32 on CPUs")
    _parallel_flags(sv)
    sv.add_argument(
        "--placement-strategy",
        choices=["PACK", "STRICT_PACK"],
        default="PACK",
        help="how a tensor-parallel replica's workers are placed: PACK (few nodes) or STRICT_PACK (one node)",
    )
    for flag, default, text in SERVE_LIMITS:
        sv.add_argument(flag, type=int, default=default, help=text)
    sv.add_argument("--verbose", action="store_true", help="show Ray's and Ray Serve's own output on the console")
    sv.add_argument("--no-ray", action="store_true", help="one engine under uvicorn in this process, without Ray")
    sv.set_defaults(command="serve")


def _serve_loras(sv) -> None:
    sv.add_argument(
        "--lora",
        action=_NamedDirs,
        default=None,
        metavar="NAME=DIR",
        help="a peft LoRA adapter of the base served as model NAME (repeatable); requests choose it by `model`",
    )
    sv.add_argument(
        "--max-loras",
        type=int,
        default=None,
        metavar="K",
        help="adapters loaded at once; past it the least recently used idle one is unloaded (default: --lora count)",
    )
    sv.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        metavar="R",
        help="the largest adapter rank (default: max(16, --lora's))",
    )


def _eval(sub) -> None:
    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks on neoxray's inference engine (docs/evaluation.md)")
    _model_flag(ev)
    ev.add_argument(
        "--lora", default=None, metavar="DIR", help="a peft LoRA adapter directory of this base, applied to the model"
    )
    _eval_tasks(ev)
    _eval_chat(ev)
    _eval_engines(ev)
    ev.add_argument("--output", default=None, help="write lm-eval's results JSON to this file")
    ev.add_argument(
        "--log-samples",
        action="store_true",
        help="also write each task's per-sample records beside --output (<stem>_samples_<task>.jsonl)",
    )
    ev.add_argument("--json", action="store_true", help="print lm-eval's results JSON instead of the table")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto: a GPU if any)")
    ev.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on GPUs, fp32 on CPUs")
    _parallel_flags(ev)
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
    ev.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output and the progress bars of datasets and lm-eval on the console",
    )
    ev.set_defaults(command="eval")


def _eval_tasks(ev) -> None:
    """What runs: tasks or a suite, shots, a limit, local task folders."""
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


def _eval_chat(ev) -> None:
    """Prompts as conversations (lm-eval's chat-template options)."""
    ev.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="render each prompt with the model's chat template (its tokenizer_config.json's, or the one its "
        "training run recorded), or --chat-template's",
    )
    ev.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_STRING",
        help="with --apply-chat-template: this template (a file, a model directory or the template itself)",
    )
    ev.add_argument(
        "--fewshot-as-multiturn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="few-shot examples as user/assistant turns (default: on with --apply-chat-template)",
    )
    ev.add_argument(
        "--system-instruction", default=None, metavar="TEXT", help="a system instruction before each prompt"
    )


def _eval_engines(ev) -> None:
    """How it runs: engines, their batch, GPUs and KV cache."""
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
