"""`neoxray generate` and `neoxray score`: a plain model through `neoxray.model.generate`; a model split over
tensor-parallel workers or weight-only quantized through one inference engine (`neoxray.platform.inference`)
driven on the calling thread, as vLLM's offline `LLM` drives its engine. Both give the same tokens and
log-probabilities for the same weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams


@dataclass
class OfflineOptions:
    """How the model is held: `neoxray generate/score` flags."""

    device: str = "auto"
    dtype: torch.dtype | None = None
    tensor_parallel_size: int = 1
    quantization: str | None = None
    lora: str | None = None
    """A peft adapter directory (or URI): merged into a plain model; in an engine, loaded into its one adapter
    slot (sharded like its layers)."""

    @property
    def needs_engine(self) -> bool:
        return self.tensor_parallel_size > 1 or self.quantization is not None


def offline_engine(model: str, options: OfflineOptions, config=None):
    """(engine, the adapter name requests use or None): the model as `options` say, its adapter loaded into
    the engine's one slot. `config`: the engine's EngineConfig (default: one sequence at a time)."""
    import dataclasses

    from neoxray.model.peft_format import read_adapter_config, read_peft_adapter
    from neoxray.platform.inference.engine import InferenceEngine
    from neoxray.platform.inference.request import EngineConfig
    from neoxray.platform.model_cache import local_adapter

    config = config or EngineConfig(max_num_seqs=1)
    lora = None if options.lora is None else local_adapter(options.lora, "--lora")
    if lora is not None:
        rank = max(16, int(read_adapter_config(lora)["r"]))
        config = dataclasses.replace(config, max_loras=1, max_lora_rank=rank)
    engine = InferenceEngine.from_path(
        model,
        device=options.device,
        dtype=options.dtype,
        config=config,
        tensor_parallel_size=options.tensor_parallel_size,
        quantization=options.quantization,
    )
    if lora is None:
        return engine, None
    engine.add_lora("lora", read_peft_adapter(lora, engine.model_config, "lora"), str(options.lora))
    return engine, "lora"


def _ids(tok, text: str, what: str) -> list[int]:
    ids = tok.encode(text)
    if not ids:
        raise NeoxrayError(f"{what} encodes to no tokens")
    return ids


def generate_text(model: str, options: OfflineOptions, prompt: str, params: SamplingParams) -> dict:
    """The completion of `prompt`: {text, token_ids, finish_reason, prompt_tokens}."""
    if not options.needs_engine:
        from neoxray.model.generate import generate
        from neoxray.platform.model_loading import load_for_inference

        m, tok, _ = load_for_inference(model, device=options.device, dtype=options.dtype, lora=options.lora)
        ids = _ids(tok, prompt, "--prompt")
        out = generate(m, [ids], params, tokenizer=tok)[0]
        return {
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "prompt_tokens": len(ids),
        }
    from neoxray.platform.inference.request import Request

    engine, lora = offline_engine(model, options)
    try:
        ids = _ids(engine.tokenizer, prompt, "--prompt")
        req = Request(ids, max_tokens=params.max_new_tokens, sampling=params, lora=lora)
        out = engine.run_until_done([req])[0]
        return {
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "prompt_tokens": len(ids),
        }
    finally:
        engine.stop(timeout=5, drain=False)


def score_text(model: str, options: OfflineOptions, text: str):
    """(token ids of `text`, the log-probability of each given those before it (None for the first),
    tokenizer)."""
    if not options.needs_engine:
        from neoxray.model.generate import score
        from neoxray.platform.model_loading import load_for_inference

        m, tok, _ = load_for_inference(model, device=options.device, dtype=options.dtype, lora=options.lora)
        ids = tok.encode(text)
        return ids, score(m, ids), tok
    from neoxray.platform.inference.request import Request

    engine, lora = offline_engine(model, options)
    try:
        ids = _ids(engine.tokenizer, text, "--text")
        out = engine.run_until_done([Request(ids, max_tokens=0, prompt_logprobs=True, lora=lora)])[0]
        return ids, [e.logprob for e in out.prompt_logprobs], engine.tokenizer
    finally:
        engine.stop(timeout=5, drain=False)
