"""The lm-evaluation-harness backend `neoxray`: lm-eval's requests on neoxray's continuous-batching engine.

    import neoxray.platform.eval  # registers the backend
    import lm_eval
    results = lm_eval.simple_evaluate(model="neoxray", model_args="pretrained=DIR", tasks=["lambada_openai"])

`NeoxrayLM` subclasses lm-eval's `TemplateLM`, as lm-eval's Hugging Face and vLLM backends do, so splitting a
request into context and continuation tokens (trailing spaces moved to the continuation, an empty context
replaced by the end-of-text token) is lm-eval's own code. What this class adds follows lm-eval's `hf` backend
rule for rule, so that both give the same numbers on the same checkpoint:

- `loglikelihood`: the window is the last `max_length + 1` tokens of context + continuation (left truncation;
  the last token is only a target), and the continuation's tokens are scored within it;
- `loglikelihood_rolling`: lm-eval's own rolling windows (`get_rolling_token_windows`, `make_disjoint_window`)
  with the end-of-text token as prefix, each scored as above, summed per document;
- `generate_until`: lm-eval's generation kwargs (`normalize_gen_kwargs`; `until` plus the end-of-text string,
  `max_gen_toks`, default 256); the context left-truncated to `max_length - max_gen_toks` tokens; greedy unless
  the task samples; the text decoded without special tokens and cut at the first stop string
  (`postprocess_generated_text`).

With lm-eval's `apply_chat_template`, each prompt is a conversation rendered by `apply_chat_template` as the
`hf` backend renders it (transformers' `apply_chat_template`: the generation prompt, or the last message continued
when there is none; a template that refuses a system message gets the conversation without it), with the
model's chat template (`neoxray.platform.model_loading.model_chat_template`) or the one given.

The requests of one call go to the engine(s) together: one engine in this process (`replicas=1`, no
`address`), or `replicas` engine actors on Ray (`neoxray.platform.eval.replicas`).
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from neoxray.errors import NeoxrayError
from neoxray.model.chat_template import ChatTemplate
from neoxray.model.decoding import SamplingParams
from neoxray.platform.eval.runner import EngineOptions, GenItem, ScoreItem

DEFAULT_BATCH = 32
"""Sequences in each engine's batch when lm-eval gives no batch size (or "auto")."""
SAMPLING_KWARGS = ("do_sample", "temperature", "top_p", "top_k", "seed")
"""Generation kwargs a task may set besides `until` and `max_gen_toks`."""
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
"""Marks where the last message's content ends in its rendering (transformers' `continue_final_message`)."""


def _int(name: str, value, minimum: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise NeoxrayError(f"neoxray backend: {name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise NeoxrayError(f"neoxray backend: {name} must be >= {minimum}, got {n}")
    return n


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise NeoxrayError(f"neoxray backend: {name} must be true or false, got {value!r}")


@register_model("neoxray")
class NeoxrayLM(TemplateLM):
    """lm-eval's model interface over neoxray's inference engine.

    Arguments (lm-eval's `model_args`, e.g. `pretrained=DIR,replicas=2`):
        pretrained: what `neoxray serve --model` takes: an exported Hugging Face directory, a training
            checkpoint, or a run directory (its newest checkpoint).
        device, dtype: as for `neoxray serve` (auto: a GPU if any; bf16 on GPUs, fp32 on CPUs).
        batch_size: sequences in each engine's batch (the engine's max_num_seqs; "auto" or none: 32).
        replicas: engines; more than one (or an `address`) runs them as Ray actors.
        num_gpus: GPUs per Ray replica.
        address: the Ray cluster to use (default: RAY_ADDRESS, else a local one; only with Ray).
        group_by_context: hand requests to the engines sorted by their tokens, so that the continuations of one
            context (and any shared prefix) are next to each other, where the engine's prefix cache reuses them.
        max_gen_toks: new tokens per generation when a task sets none (lm-eval's default, 256).
        prefill_chunk, kv_cache_tokens, prefix_caching: the engine's settings (None: its defaults; the prefix
            cache is on).
        verbose: Ray's own output on the console.
        lora: a peft LoRA adapter directory for `pretrained` (`neoxray eval --lora`), merged into the weights as
            each engine loads them (with Ray: a path on the replicas' machines).
        tensor_parallel_size: workers each engine's model is split over (local processes of its node).
        quantization: int8_weight_only or int4_weight_only: each engine's linears, weight-only (torchao).
        chat_template: the template lm-eval's `apply_chat_template` renders with: a `ChatTemplate`, or a template
            file, model directory or the template itself; None: the adapter's, else the model's (read on first
            use; a model without one is a NeoxrayError).
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str | None = None,
        replicas: int = 1,
        num_gpus: float = 0,
        address: str | None = None,
        group_by_context: bool = True,
        max_gen_toks: int = 256,
        prefill_chunk: int | None = None,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = True,
        verbose: bool = False,
        lora: str | None = None,
        tensor_parallel_size: int = 1,
        quantization: str | None = None,
        chat_template: ChatTemplate | str | None = None,
    ):
        super().__init__()
        self._pretrained, self._chat = str(pretrained), chat_template
        batch = DEFAULT_BATCH if batch_size in (None, "", "auto") else _int("batch_size", batch_size, 1)
        options = EngineOptions(
            device=str(device or "auto"),
            dtype=str(dtype or "auto"),
            max_num_seqs=batch,
            prefill_chunk=None if prefill_chunk is None else _int("prefill_chunk", prefill_chunk, 1),
            kv_cache_tokens=None if kv_cache_tokens is None else _int("kv_cache_tokens", kv_cache_tokens, 1),
            prefix_caching=_bool("prefix_caching", prefix_caching),
            lora=str(lora) if lora not in (None, "") else None,
            tensor_parallel_size=_int("tensor_parallel_size", tensor_parallel_size, 1),
            quantization=str(quantization) if quantization not in (None, "") else None,
        )
        self.replicas = _int("replicas", replicas, 1)
        self.group_by_context = _bool("group_by_context", group_by_context)
        self._max_gen_toks = _int("max_gen_toks", max_gen_toks, 1)
        self.batch_size = batch
        self._options = options
        if self.replicas == 1 and not address:
            from neoxray.platform.eval.runner import EngineRunner

            self._runner = EngineRunner(str(pretrained), options)
        else:
            from neoxray.platform.eval.replicas import RayEngines

            self._runner = RayEngines(
                str(pretrained),
                options,
                replicas=self.replicas,
                num_gpus=float(num_gpus),
                address=address or None,
                verbose=_bool("verbose", verbose),
            )
        self.info = self._runner.info()
        self._tok = self._runner.tokenizer

    def close(self) -> None:
        """Let the engines go (Ray actors are ended; an in-process engine is freed with this object)."""
        close = getattr(self._runner, "close", None)
        if close is not None:
            close()

    # -- what lm-eval asks of a model -----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.info.eod_id

    @property
    def max_length(self) -> int:
        return self.info.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> str:
        return self.info.device

    @property
    def tokenizer_name(self) -> str:
        return self.info.name

    def get_model_info(self) -> dict:
        """Recorded in the results' `config` (as lm-eval's own backends record theirs)."""
        return {
            "model_name": self.info.name,
            "model_num_parameters": self.info.num_parameters,
            "model_dtype": self.info.dtype,
            "max_length": self.info.max_length,
            "replicas": self.replicas,
            "lora": self._options.lora,
            **({"chat_template": self._chat.source} if isinstance(self._chat, ChatTemplate) else {}),
        }

    # -- conversations (lm-eval's apply_chat_template) ------------------------------------------------------------
    def template(self) -> ChatTemplate:
        """The chat template prompts are rendered with (resolved once; see the class's `chat_template`)."""
        if not isinstance(self._chat, ChatTemplate):
            self._chat = eval_chat_template(self._chat, self._pretrained, self._options.lora)
        return self._chat

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template().text

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation's prompt text, as lm-eval's `hf` backend renders it."""
        template = self.template()
        try:
            return render_chat(template, chat_history, add_generation_prompt)
        except NeoxrayError:
            if not any(m.get("role") == "system" for m in chat_history):
                raise
            return render_chat(template, [m for m in chat_history if m.get("role") != "system"], add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self._tok.encode(string)  # GPT-NeoX tokenizers add no special tokens either way

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- log-likelihoods ----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log-likelihood of the
        continuation, whether greedy decoding would produce it), in order."""
        n = self.max_length
        items = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise NeoxrayError("neoxray backend: a loglikelihood request has an empty context or continuation")
            if len(continuation_enc) > n:
                raise NeoxrayError(
                    f"a continuation of {len(continuation_enc)} tokens is longer than the model's context ({n})"
                )
            window = (list(context_enc) + list(continuation_enc))[-(n + 1) :]  # left truncation
            items.append(ScoreItem(tuple(window), len(continuation_enc)))
        results = self._score(items, "loglikelihood", disable_tqdm)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _score(self, items: list[ScoreItem], what: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        from neoxray.platform.eval.runner import submission_order

        order = submission_order(items, self.group_by_context)
        with tqdm(total=len(items), desc=f"neoxray {what}", disable=disable_tqdm) as bar:
            scored = self._runner.score([items[i] for i in order], progress=bar.update)
        results: list = [None] * len(items)
        for i, answer in zip(order, scored):
            results[i] = answer
        return results

    # -- generation ------------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        items, stops = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise NeoxrayError(
                    f"task {req.task_name}: max_gen_toks ({max_gen_toks}) must be less than the model's context "
                    f"({self.max_length} tokens)"
                )
            prompt = self.tok_encode(context)[-max_ctx_len:]  # left truncation, room left for max_gen_toks
            if not prompt:
                prompt = [self.prefix_token_id]
            items.append(GenItem(tuple(prompt), max_gen_toks, _sampling(kwargs, until, eos, i, req.task_name)))
            stops.append(until)
        order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt))
        with tqdm(total=len(items), desc="neoxray generate_until", disable=disable_tqdm) as bar:
            made = self._runner.generate([items[i] for i in order], progress=bar.update)
        texts: list = [None] * len(items)
        for i, token_ids in zip(order, made):
            texts[i] = postprocess_generated_text(self.tok_decode(token_ids), stops[i], None)
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts


def eval_chat_template(spec: str | None, model: str, lora: str | None = None) -> ChatTemplate:
    """The template prompts are rendered with: `spec` (`--chat-template`: a file, a model directory or the
    template itself), else the adapter's, else the model's (their files read here, without the weights); a model
    without one is refused in one line."""
    from neoxray.model.chat_template import resolve_chat_template
    from neoxray.platform.model_loading import model_chat_template

    if spec is not None:
        return resolve_chat_template(spec)
    found = model_chat_template(model, lora)
    if found is None:
        what = f"{model} (and the adapter {lora})" if lora else model
        raise NeoxrayError(f"{what} has no chat template; pass --chat-template")
    return found


def render_chat(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool) -> str:
    """`template`'s rendering of `messages`: with the generation prompt, or else cut where the last message's
    content ends (transformers' `continue_final_message`, which lm-eval's `hf` backend asks for then)."""
    if add_generation_prompt:
        return template.render(messages, True)
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or "content" not in template.text:
        raise NeoxrayError(f"chat template {template.source}: cannot continue the last message of {messages!r:.80}")
    text = template.render([*messages[:-1], {**messages[-1], "content": final + CONTINUE_TAG}], False)
    tag = CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise NeoxrayError(f"chat template {template.source} drops part of the last message, so it cannot be continued")
    at = text.rindex(tag)
    return text[:at] if text[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()


def _sampling(kwargs: dict, until: list[str], eos: str, index: int, task: str | None) -> SamplingParams:
    """SamplingParams from lm-eval's normalised generation kwargs (less until and max_gen_toks): greedy unless
    the task samples; the stop strings are `until` (the end-of-text token is the engine's own stop rule)."""
    unknown = sorted(k for k in kwargs if k not in SAMPLING_KWARGS)
    if unknown:
        raise NeoxrayError(
            f"task {task}: generation option(s) {', '.join(unknown)} are not supported by the neoxray backend "
            f"(it takes until, max_gen_toks, {', '.join(SAMPLING_KWARGS)})"
        )
    stop = tuple(s for s in until if s and s != eos)
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample") or temperature == 0.0:
        return SamplingParams(greedy=True, temperature=0.0, stop=stop)
    seed = kwargs.get("seed")
    return SamplingParams(
        temperature=temperature,
        top_p=float(kwargs.get("top_p") or 1.0),
        top_k=int(kwargs.get("top_k") or 0),
        seed=int(seed) + index if seed is not None else 1234 + index,  # a fixed draw per request, any replica
        stop=stop,
    )
