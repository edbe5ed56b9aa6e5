"""One inference engine in this process, serving lm-eval's requests in bulk: the model side of `neoxray eval`.

The lm-eval backend (`neoxray.platform.eval.lm`) turns lm-eval's requests into token lists; this module runs them
on neoxray's continuous-batching `InferenceEngine` (the engine behind `neoxray serve`), many at a time:

- scoring (`score`): a window of context + continuation tokens is one echo request (`max_tokens=0`,
  `prompt_logprobs=True`, `logprobs=1`, `score_from` at the continuation); the continuation's log-likelihood is
  the sum of its prompt log-probabilities, and it is greedy when every one of its tokens is the top-1
  alternative at its position;
- generation (`generate`): prompt ids, a token budget and sampling parameters (stop strings, end of document).

Every request carries its full token list; the engine's prefix cache (`EngineConfig.prefix_caching`) shares the
KV cache blocks of a common prefix between requests, so the context of a multiple-choice question is computed
once for its several continuations (only the continuation is scored, so the context may come from the cache).
`submission_order` puts requests that share a context next to each other.

The scoring window. lm-eval scores a continuation within the last `max_length + 1` tokens of context +
continuation (the last token is only a target, never an input; the Hugging Face backend feeds
`tokens[-(max_length + 1):-1]`). The engine does the same for a scoring-only request (max_tokens 0 with prompt
log-probabilities): it feeds all but the last token, so such a prompt may be one token longer than the
context.

No Ray here: `neoxray.platform.eval.replicas` runs this same class inside Ray actors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams

CHUNK_BATCHES = 32
"""Requests handed to an engine at once, in batches (`max_num_seqs`): the engine runs each chunk to its end, so a
chunk of several batches keeps its batch full but for the last one; a bounded chunk keeps its queue short."""
Progress = Callable[[int], None] | None
"""Called with the number of requests that just finished (a progress bar's update), or None."""


@dataclass(frozen=True)
class ScoreItem:
    """Score the last `n_scored` tokens of `tokens` (a context + continuation window, at most max_length + 1
    tokens long), each given the tokens before it."""

    tokens: tuple[int, ...]
    n_scored: int

    @property
    def context(self) -> tuple[int, ...]:
        return self.tokens[: len(self.tokens) - self.n_scored]


@dataclass(frozen=True)
class GenItem:
    """Generate at most `max_tokens` tokens after `prompt` (whose length plus max_tokens fits the context)."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """What the lm-eval backend needs to know of the model behind an engine (plain data: it crosses Ray)."""

    name: str
    max_length: int
    """The model's context: the longest input of one forward."""
    eod_id: int
    tokenizer_json: str
    num_parameters: int
    dtype: str
    device: str


@dataclass(frozen=True)
class EngineOptions:
    """How each engine is built (`neoxray eval`'s flags; the same for every replica)."""

    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 32
    """Most sequences in the engine's batch at once (`--batch-size`)."""
    prefill_chunk: int | None = None
    """Most prompt tokens prefilled per engine step (None: `default_prefill_chunk`)."""
    kv_cache_tokens: int | None = None
    """KV cache budget in tokens (None: `default_kv_cache_tokens`)."""
    prefix_caching: bool = True
    """Share the KV cache blocks of common prompt prefixes between requests (the engine's prefix cache)."""
    lora: str | None = None
    """A peft LoRA adapter directory merged into the model's weights as it loads (`--lora`; split or quantized
    models: in the engine's one adapter slot); None: the base."""
    tensor_parallel_size: int = 1
    """Workers the engine's model is split over (local processes)."""
    quantization: str | None = None
    """Weight-only quantization of the model's linears."""


def default_prefill_chunk(window: int) -> int:
    """Evaluation wants throughput, not the first token soon: prefill at least one whole scoring window, and
    never fewer than 2048 prompt tokens, per engine step (bigger matrix products; serving's default is 512)."""
    return max(2048, window)


def default_kv_cache_tokens(max_num_seqs: int, window: int) -> int:
    """Room for max_num_seqs whole windows, but at most max(8192 tokens, 4 windows): evaluation requests are
    mostly much shorter than the context, a long one waits for room rather than being refused, and a smaller
    pool is reused warm (on CPUs, fresh memory costs page faults) and leaves a large model room on its GPU."""
    return min(max_num_seqs * window, max(8192, 4 * window))


def submission_order(items: Sequence[ScoreItem], group_by_context: bool) -> list[int]:
    """The order to hand scoring requests to an engine: grouped by context (requests that share a context, or
    any common prefix, next to each other, so that an engine with prefix reuse computes it once) or, without
    grouping, longest first (prefill chunks then pad little)."""
    if group_by_context:
        return sorted(range(len(items)), key=lambda i: items[i].tokens)
    return sorted(range(len(items)), key=lambda i: -len(items[i].tokens))


class EngineRunner:
    """A model loaded as `neoxray serve` loads it (`--model`: an exported Hugging Face directory, a training
    checkpoint, or a run directory's newest checkpoint; `options.lora`: a peft adapter merged into it) behind one
    InferenceEngine driven on the calling thread."""

    def __init__(self, model_path: str, options: EngineOptions = EngineOptions()):
        from neoxray.model.precision import to_dtype
        from neoxray.platform.inference.engine import InferenceEngine
        from neoxray.platform.inference.request import EngineConfig
        from neoxray.platform.model_loading import load_for_inference

        dtype = None if options.dtype == "auto" else to_dtype(options.dtype, "--dtype")
        split = options.tensor_parallel_size > 1 or options.quantization is not None
        if split:
            from neoxray.platform.model_loading import prepare_sharded

            _, model_config, tokenizer, name, _, _ = prepare_sharded(model_path, 1, options.device, dtype)
        else:
            model, tokenizer, name = load_for_inference(
                model_path, device=options.device, dtype=dtype, lora=options.lora
            )
            model_config = model.config
        self.tokenizer = tokenizer
        self.max_length = model_config.max_seq_len
        window = self.max_length + 1  # a scoring window: the context plus its last target token
        config = EngineConfig(
            max_num_seqs=options.max_num_seqs,
            kv_cache_tokens=options.kv_cache_tokens or default_kv_cache_tokens(options.max_num_seqs, window),
            prefill_chunk=options.prefill_chunk or default_prefill_chunk(window),
            prefix_caching=options.prefix_caching,
        )
        self.chunk = CHUNK_BATCHES * config.max_num_seqs
        """Requests handed to the engine at once (the rest wait here, not in its queue)."""
        config.max_waiting = max(config.max_waiting, self.chunk)
        self.lora = None
        """The adapter name requests use (an adapter in a slot: split or quantized models)."""
        if split:
            from neoxray.platform.offline import OfflineOptions, offline_engine

            split_options = OfflineOptions(
                options.device, dtype, options.tensor_parallel_size, options.quantization, options.lora
            )
            self.engine, self.lora = offline_engine(model_path, split_options, config)
        else:
            self.engine = InferenceEngine(model, tokenizer, config, model_name=name)
        self._info = ModelInfo(
            name=name,
            max_length=self.max_length,
            eod_id=tokenizer.eod_id,
            tokenizer_json=tokenizer.to_json(),
            num_parameters=model_config.num_parameters(),
            dtype=str(self.engine.dtype).removeprefix("torch."),
            device=str(self.engine.device) if not split else options.device,
        )

    def info(self) -> ModelInfo:
        return self._info

    # -- requests ---------------------------------------------------------------------------------------------
    def score(self, items: Sequence[ScoreItem], progress: Progress = None) -> list[tuple[float, bool]]:
        """(log-likelihood of the scored tokens, whether each is the most likely token at its position) per item."""
        from neoxray.platform.inference.request import Request

        for it in items:
            if not 0 < it.n_scored < len(it.tokens) or len(it.tokens) > self.max_length + 1:
                raise NeoxrayError(
                    f"cannot score {it.n_scored} of {len(it.tokens)} tokens with a {self.max_length}-token context"
                )
        greedy = SamplingParams(greedy=True, temperature=0.0)  # nothing is sampled; argmax is the cheap rule
        requests = [
            Request(
                list(it.tokens),
                max_tokens=0,
                sampling=greedy,
                logprobs=1,  # the top-1 alternative at each scored position: is the continuation greedy?
                prompt_logprobs=True,
                score_from=len(it.tokens) - it.n_scored,  # the context unscored: it may come from the prefix cache
                lora=self.lora,
            )
            for it in items
        ]
        results = []
        for it, done in zip(items, self._run(requests, progress)):
            scored = done.prompt_logprobs[-it.n_scored :]
            logprob = sum(e.logprob for e in scored)
            greedy = all(e.top and e.top[0][0] == e.token_id for e in scored)
            results.append((float(logprob), bool(greedy)))
        return results

    def generate(self, items: Sequence[GenItem], progress: Progress = None) -> list[list[int]]:
        """The generated token ids of each item (its stop string or end-of-document token included, as made)."""
        from neoxray.platform.inference.request import Request

        for it in items:
            if len(it.prompt) + it.max_tokens > self.max_length:
                raise NeoxrayError(
                    f"a {len(it.prompt)}-token prompt plus {it.max_tokens} new tokens exceeds the model's context "
                    f"of {self.max_length} tokens"
                )
        requests = [
            Request(list(it.prompt), max_tokens=it.max_tokens, sampling=it.sampling, lora=self.lora) for it in items
        ]
        return [done.token_ids for done in self._run(requests, progress)]

    def _run(self, requests: list, progress: Progress) -> list:
        """Serve `requests` on the engine (its `run_until_done`), `self.chunk` at a time, so that its queue never
        holds more than that; their Completions in order. `progress` hears of each chunk as it finishes."""
        completions: list = []
        for start in range(0, len(requests), self.chunk):
            chunk = requests[start : start + self.chunk]
            completions += self.engine.run_until_done(chunk)
            if progress is not None:
                progress(len(chunk))
        return completions
