"""The `neoxray eval` driver: tasks from lm-eval (its task definitions, prompts, few-shot sampling and metrics),
the model side from neoxray's inference engine (`neoxray.platform.eval.lm`), results as lm-eval writes them.

Order of work, cheapest check first: the arguments; the model path (when the engine runs in this process); the
task names (an unknown one lists the closest); the tasks' datasets; the model; the evaluation. With
`--replicas 1` and no `--address`, everything runs in this process without Ray; otherwise the engines are Ray
actors (`neoxray.platform.eval.replicas`). The console shows notes and the backend's progress bars; the bars of
datasets and lm-eval only with --verbose (`only_our_progress`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

from neoxray.errors import NeoxrayError


@dataclass
class EvalArgs:
    """`neoxray eval`'s arguments (see its --help)."""

    model: str
    tasks: list[str] = field(default_factory=list)
    suite: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    include_path: list[str] = field(default_factory=list)
    batch_size: int = 32
    replicas: int = 1
    num_gpus: float = 0
    kv_cache_tokens: int | None = None
    output: str | None = None
    log_samples: bool = False
    json: bool = False
    device: str = "auto"
    dtype: str = "auto"
    address: str | None = None
    bootstrap_iters: int = 100000
    verbose: bool = False
    """Ray's own output, and the progress bars of datasets and lm-eval (`only_our_progress`), on the console."""
    lora: str | None = None
    """A peft LoRA adapter directory for the model (`--lora`), merged into its weights as they load."""
    tensor_parallel_size: int = 1
    """Workers each engine's model is split over (`--tensor-parallel-size`; local processes of its node)."""
    quantization: str | None = None
    """Weight-only quantization of each engine's linears (`--quantization`)."""
    apply_chat_template: bool = False
    """Prompts rendered as conversations with the chat template (lm-eval's `apply_chat_template`)."""
    chat_template: str | None = None
    """The template for that (`--chat-template`: a file, a model directory or the template itself); None: the
    adapter's, else the model's."""
    fewshot_as_multiturn: bool | None = None
    """Few-shot examples as user/assistant turns (None: as `apply_chat_template`, as lm-eval's CLI has it)."""
    system_instruction: str | None = None
    """A system instruction before each prompt (lm-eval's `system_instruction`)."""

    def check(self) -> EvalArgs:
        if bool(self.tasks) == bool(self.suite):
            raise NeoxrayError("give either --tasks or --suite")
        if self.suite and self.num_fewshot is not None:
            raise NeoxrayError("--num-fewshot does not go with --suite: the suite sets each task's shots")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise NeoxrayError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise NeoxrayError(f"--limit must be > 0, got {self.limit:g}")
        for name in ("batch_size", "replicas"):
            if getattr(self, name) < 1:
                raise NeoxrayError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise NeoxrayError(f"--kv-cache-tokens must be >= 1, got {self.kv_cache_tokens}")
        if self.num_gpus < 0:
            raise NeoxrayError(f"--num-gpus must be >= 0, got {self.num_gpus:g}")
        if self.bootstrap_iters < 0:
            raise NeoxrayError(f"--bootstrap-iters must be >= 0, got {self.bootstrap_iters}")
        if self.log_samples and not self.output:
            raise NeoxrayError("--log-samples writes beside the results file: give --output too")
        if self.chat_template is not None and not self.apply_chat_template:
            raise NeoxrayError("--chat-template is the template of --apply-chat-template: give that too")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise NeoxrayError("--fewshot-as-multiturn makes few-shot examples chat turns: give --apply-chat-template")
        if self.fewshot_as_multiturn is None:
            self.fewshot_as_multiturn = self.apply_chat_template
        return self

    @property
    def uses_ray(self) -> bool:
        return self.replicas > 1 or bool(self.address)

    @property
    def lm_limit(self) -> int | float | None:
        """lm-eval's `limit`: a count of documents per task, or a share of them below 1."""
        if self.limit is None or self.limit < 1:
            return self.limit
        return int(self.limit)

    def model_args(self) -> dict:
        """The backend's arguments (recorded as the results' `config.model_args`)."""
        args = dict(pretrained=self.model, device=self.device, dtype=self.dtype, batch_size=self.batch_size)
        if self.lora:
            args["lora"] = self.lora
        if self.kv_cache_tokens is not None:
            args["kv_cache_tokens"] = self.kv_cache_tokens
        if self.tensor_parallel_size != 1:
            args["tensor_parallel_size"] = self.tensor_parallel_size
        if self.quantization:
            args["quantization"] = self.quantization
        if self.uses_ray:
            args.update(replicas=self.replicas, num_gpus=self.num_gpus, address=self.address, verbose=self.verbose)
        return args


def run_eval(args: EvalArgs) -> dict:
    """Evaluate, write `--output` (and the samples), print the table or the JSON; returns lm-eval's results."""
    import lm_eval

    import neoxray.platform.eval  # noqa: F401 (registers the backend under its name)
    from neoxray.platform.eval.lm import NeoxrayLM, eval_chat_template
    from neoxray.platform.eval.results import card_table, results_table, to_json, write_atomic, write_samples
    from neoxray.platform.eval.suites import get_suite
    from neoxray.platform.eval.tasks import load_tasks, resolve_names, task_manager

    args.check()
    suite = get_suite(args.suite) if args.suite else None
    if not args.uses_ray:  # the model's files are here: a wrong path fails now, not after the datasets load
        from neoxray.platform.model_loading import resolve_model_path

        kind, path = resolve_model_path(args.model)
        if args.lora:  # and the adapter against the model's config: a wrong one fails now too
            from neoxray.model.peft_format import read_peft_adapter
            from neoxray.platform.model_cache import local_adapter
            from neoxray.platform.model_loading import model_config_of

            read_peft_adapter(local_adapter(args.lora), model_config_of(kind, path))
    # read here, before anything loads (also when the engines run on Ray)
    template = eval_chat_template(args.chat_template, args.model, args.lora) if args.apply_chat_template else None
    names = [t.task for t in suite.tasks] if suite else list(args.tasks)
    tm = task_manager(names, args.include_path)
    names = resolve_names(tm, names)
    _log(f"loading {len(names)} task(s): {', '.join(names)}")
    shots = {t.task: t.num_fewshot for t in suite.tasks} if suite else None
    with only_our_progress(args.verbose):
        task_objs = load_tasks(tm, names, shots)
    _log(
        f"loading the model {args.model}"
        + (f" with the LoRA adapter {args.lora}" if args.lora else "")
        + (f" on {args.replicas} Ray replica(s)" if args.uses_ray else "")
    )
    model_args = args.model_args()
    lm = NeoxrayLM(**model_args, chat_template=template)
    try:
        # lm-eval prints notes: stdout carries only results
        with contextlib.redirect_stdout(sys.stderr), only_our_progress(args.verbose):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_objs,
                num_fewshot=args.num_fewshot,
                limit=args.lm_limit,
                log_samples=args.log_samples,
                bootstrap_iters=args.bootstrap_iters,
                task_manager=tm,
                apply_chat_template=args.apply_chat_template,
                fewshot_as_multiturn=args.fewshot_as_multiturn,
                system_instruction=args.system_instruction,
            )
    finally:
        lm.close()
    results["config"].update(
        model="neoxray",
        model_args=",".join(f"{k}={v}" for k, v in model_args.items() if v is not None),
        batch_size=args.batch_size,
        device=lm.device,
    )
    samples = results.pop("samples", None)
    if args.output:
        write_atomic(args.output, to_json(results))
        if args.log_samples and samples:
            write_samples(args.output, samples)
        _log(f"wrote {args.output}")
    if args.json:
        print(to_json(results))
    else:
        shots_text = "per suite" if suite else args.num_fewshot
        lora_text = f" + LoRA {args.lora}" if args.lora else ""
        lora_text += f", chat template {template.source}" if template is not None else ""
        print(
            f"neoxray ({args.model}{lora_text}), limit: {args.lm_limit}, num_fewshot: {shots_text}, "
            f"batch_size: {args.batch_size}" + (f", replicas: {args.replicas}" if args.uses_ray else "")
        )
        print(results_table(results))
        if suite:
            print(card_table(results, suite))
    return results


LM_EVAL_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model")
"""lm-eval's modules that draw progress bars of their own (building each task's requests; tokenizing them) with
the `tqdm` they import, which has no switch of its own."""


@contextlib.contextmanager
def only_our_progress(verbose: bool):
    """One progress display, the backend's own bar per lm-eval call (`neoxray loglikelihood`, ...): unless
    `verbose`, the bars of the libraries underneath are off while this lasts, datasets' (reading each task's data)
    through datasets' own switch, lm-eval's by handing its modules a `tqdm` that draws nothing."""
    if verbose:
        yield
        return
    import importlib

    import datasets
    from tqdm import tqdm

    def silent(*args, **kwargs):  # whatever `disable` the caller passes
        return tqdm(*args, **{**kwargs, "disable": True})

    modules = [m for m in map(importlib.import_module, LM_EVAL_BAR_MODULES) if hasattr(m, "tqdm")]
    saved = [m.tqdm for m in modules]
    datasets_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    for m in modules:
        m.tqdm = silent
    try:
        yield
    finally:
        for m, bar in zip(modules, saved):
            m.tqdm = bar
        if datasets_bars:
            datasets.enable_progress_bars()


def _log(msg: str) -> None:
    print(f"[neoxray] {msg}", file=sys.stderr, flush=True)
