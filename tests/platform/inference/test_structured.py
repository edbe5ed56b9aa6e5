"""Structured output in the inference engine (llguidance's masks in the batched sampler): a randomly initialised
model's text parses and validates against bounded JSON schemas over many seeds, is one of the choices, fully
matches the regex; any JSON object parses when it ends with 'stop' (at 'length' it is cut short, as OpenAI
documents); rows without a grammar decode exactly as they do alone beside rows with one, LoRA rows and base rows
mixed, over shared prompt prefixes; log-probabilities are those of the masked distribution; a spec llguidance
cannot compile is an InvalidRequest naming the API field, before anything is queued."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import jsonschema
import pytest
import torch

from neoxray.model.config import get_preset
from neoxray.model.decoding import SamplingParams, apply_token_bitmask
from neoxray.model.gptneox import build_model
from neoxray.model.lora_spec import LoRASpec, target_shape
from neoxray.model.tokenizer import Tokenizer
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import EngineConfig, InvalidRequest, Request, StructuredOutput

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}},
                "required": ["x", "ok"],
                "additionalProperties": False,
            },
        },
        "required": ["id", "tags", "point"],
        "additionalProperties": False,
    },
    "list": {"type": "array", "items": {"enum": ["red", "green", 7, None]}, "minItems": 1, "maxItems": 4},
    "code": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
            "level": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4},
        },
        "required": ["code", "level"],
        "additionalProperties": False,
    },
}
CHOICES = ["yes", "no", "maybe later"]
REGEX = r"[A-Z][a-z]{2,5}-[0-9]{1,3}"
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def model_tok(sample_tokenizer_dir):
    """A tiny random model whose logits are wider than the sample tokenizer's 1024 ids (64 padding rows), with a
    256-token context for whole documents; the output weights scaled up (peaked logits: no near-ties)."""
    tok = Tokenizer.load(sample_tokenizer_dir)
    model = build_model(get_preset("tiny", vocab_size=1088, max_seq_len=256), seed=0)
    with torch.no_grad():
        model.embed_out.weight.mul_(20.0)
    return model, tok


def engine(model_tok, **kw) -> InferenceEngine:
    model, tok = model_tok
    return InferenceEngine(model, tok, EngineConfig(**kw))


def sampled(seed: int) -> SamplingParams:
    """Seeded sampling, hot enough to undo the peaked logits; half of them never stop at end of document."""
    return SamplingParams(seed=seed, temperature=8.0, stop_at_eod=seed % 2 == 0)


def test_json_schemas_validate_over_many_seeds(model_tok):
    """4 schemas x 12 seeds, one batch: every document ends with 'stop' and validates (objects with required
    properties, enums, bounded integers, strings with maxLength or a pattern, arrays with maxItems, nesting),
    also for the half whose sampling would never stop at end of document; greedy too."""
    eng = engine(model_tok)
    reqs = [
        Request(PROMPT, max_tokens=160, sampling=sampled(seed), structured=StructuredOutput.json_schema(schema))
        for schema in SCHEMAS.values()
        for seed in range(12)
    ]
    reqs += [
        Request(PROMPT, max_tokens=160, sampling=SamplingParams(greedy=True, stop_at_eod=False), structured=spec)
        for spec in map(StructuredOutput.json_schema, SCHEMAS.values())
    ]
    texts = set()
    for r, c in zip(reqs, eng.run_until_done(reqs)):
        assert c.finish_reason == "stop", (c.text, r.structured.value)
        jsonschema.validate(json.loads(c.text), r.structured.value)
        texts.add(c.text)
    assert len(texts) > 2 * len(SCHEMAS), "seeds gave the same few documents: nothing was sampled"


def test_choice_and_regex(model_tok):
    eng = engine(model_tok)
    choice = [
        Request(PROMPT, max_tokens=20, sampling=sampled(s), structured=StructuredOutput.choice(CHOICES))
        for s in range(20)
    ]
    regex = [
        Request(PROMPT, max_tokens=20, sampling=sampled(s), structured=StructuredOutput.regex(REGEX)) for s in range(20)
    ]
    got_choice = eng.run_until_done(choice)
    got_regex = eng.run_until_done(regex)
    assert all(c.finish_reason == "stop" and c.text in CHOICES for c in got_choice), [c.text for c in got_choice]
    assert len({c.text for c in got_choice}) > 1
    assert all(c.finish_reason == "stop" and re.fullmatch(REGEX, c.text) for c in got_regex), [
        c.text for c in got_regex
    ]
    assert len({c.text for c in got_regex}) > 10


def test_json_object_parses_when_it_stops(model_tok):
    """Any JSON object: a random model may nest and go on until its token budget; what ends with 'stop' is a
    whole object, what ends with 'length' is an object cut short (OpenAI: finish_reason 'length' means partial
    JSON). Over 24 seeds both happen."""
    eng = engine(model_tok)
    reqs = [
        Request(PROMPT, max_tokens=48, sampling=sampled(s), structured=StructuredOutput.json_object())
        for s in range(24)
    ]
    reasons = set()
    for c in eng.run_until_done(reqs):
        reasons.add(c.finish_reason)
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 48
            with pytest.raises(json.JSONDecodeError):
                json.loads(c.text)
    assert reasons == {"stop", "length"}


def make_adapter(cfg, seed: int):
    from neoxray.model.lora import LoRAAdapter

    spec, g, tensors = LoRASpec(r=4, alpha=8), torch.Generator().manual_seed(seed), {}
    for layer in range(cfg.n_layers):
        for t in spec.targets:
            n_in, n_out = target_shape(cfg, t)
            path = f"layers.{layer}.{'attention' if t in ('query_key_value', 'dense') else 'mlp'}.{t}"
            tensors[f"{path}.lora_A"] = torch.randn(spec.r, n_in, generator=g) / n_in**0.5
            tensors[f"{path}.lora_B"] = torch.randn(n_out, spec.r, generator=g) * 0.5
    return LoRAAdapter(spec, tensors, {}, f"lora{seed}")


def test_mixed_batch_rows_decode_as_alone(model_tok):
    """Constrained and free rows, base and adapter rows, greedy and seeded, in one batch over a shared 40-token
    prompt (its blocks reused): every row gets exactly the tokens it gets alone, the free rows their unmasked
    text, the constrained ones valid text that differs from it (so the mask was applied, to its own row)."""
    model, tok = model_tok
    model = copy.deepcopy(model)  # adapter slots wrap the model's linears in place: not the other tests' model
    eng = InferenceEngine(model, tok, EngineConfig(max_loras=1, block_size=16))
    eng.add_lora("a", make_adapter(model.config, 1))
    prompt = list(range(40, 80))
    greedy = SamplingParams(greedy=True, stop_at_eod=False)
    reqs = []
    for lora in (None, "a"):
        for sampling in (greedy, SamplingParams(seed=3, stop_at_eod=False)):
            for spec in (None, StructuredOutput.choice(CHOICES), StructuredOutput.regex(REGEX)):
                reqs.append(Request(prompt, max_tokens=12, sampling=sampling, lora=lora, structured=spec))
    reqs.append(
        Request(prompt, max_tokens=80, sampling=greedy, structured=StructuredOutput.json_schema(SCHEMAS["person"]))
    )
    together = eng.run_until_done(reqs)
    assert eng.stats()["prefix_cache_tokens"] > 0 and eng.runner.mixed_forwards > 0
    free = {}
    for r, c in zip(reqs, together):
        alone = eng.run_until_done([dataclasses.replace(r, request_id=f"alone-{r.request_id}")])[0]
        assert c.token_ids == alone.token_ids, (r.lora, r.sampling.seed, r.structured)
        if r.structured is None:
            free[r.lora, r.sampling.seed] = c
            assert c.finish_reason == "length"
    for r, c in zip(reqs, together):
        if r.structured is not None:
            assert c.finish_reason == "stop"
            assert c.token_ids != free[r.lora, r.sampling.seed].token_ids[: len(c.token_ids)]
    assert together[-1].text and jsonschema.validate(json.loads(together[-1].text), SCHEMAS["person"]) is None
    assert {c.text for r, c in zip(reqs, together) if r.structured and r.structured.kind == "choice"} <= set(CHOICES)


def test_logprobs_are_those_of_the_masked_distribution(model_tok):
    """The chosen token and its alternatives come from what the grammar allows: with at most 5 tokens allowed at
    each step of a two-word choice, the top-5 alternatives hold all the probability."""
    eng = engine(model_tok)
    c = eng.run_until_done(
        [
            Request(
                PROMPT,
                max_tokens=8,
                sampling=SamplingParams(seed=0),
                logprobs=5,
                structured=StructuredOutput.choice(["yes", "no"]),
            )
        ]
    )[0]
    assert c.text in ("yes", "no") and c.logprobs
    for e in c.logprobs:
        assert e.logprob > float("-inf")
        assert sum(torch.tensor([lp for _, lp in e.top]).exp().tolist()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("spec", "param", "says"),
    [
        (StructuredOutput.json_schema({"type": "foo"}), "response_format", "Invalid type: foo"),
        (StructuredOutput.json_schema({"type": "array", "uniqueItems": True}), "response_format", "uniqueItems"),
        (StructuredOutput.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "response_format", "minimum"),
        (StructuredOutput.json_schema(["not", "a", "schema"]), "response_format", "must be an object"),
        (StructuredOutput.regex("(ab"), "structured_outputs", "unclosed group"),
        (StructuredOutput.choice([]), "structured_outputs", "non-empty list"),
        (StructuredOutput.grammar("start: undefined_rule"), "structured_outputs", "undefined_rule"),
        (StructuredOutput("xml"), "response_format", "unknown kind"),
    ],
)
def test_a_spec_that_cannot_be_compiled_is_refused_naming_the_field(model_tok, spec, param, says):
    eng = engine(model_tok)
    with pytest.raises(InvalidRequest) as e:
        eng.add_request(Request(PROMPT, structured=spec), lambda out: None)
    assert e.value.param == param and says in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(param)
    assert not eng.has_work()


def test_without_a_tokenizer_structured_output_is_refused(model_tok):
    model, _ = model_tok
    eng = InferenceEngine(model, None, EngineConfig())
    with pytest.raises(InvalidRequest, match="needs a tokenizer") as e:
        eng.check(Request(PROMPT, structured=StructuredOutput.json_object()))
    assert e.value.param == "response_format"


def test_token_bitmask_layout_and_fallback():
    """Bit j of word w allows token 32w + j (llguidance's layout, the sign bit included); rows not named are
    untouched; a row that allows nothing keeps the fallback token, so sampling from it stays defined."""
    logits = torch.zeros(3, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0], bitmask[0, 1], bitmask[0, 2] = 1 << 5, -(2**31), 1 << 3  # tokens 5, 63 and 67
    apply_token_bitmask(logits, [0, 2], bitmask, fallback=1)

    def allowed(row):
        return set(torch.isfinite(row).nonzero().flatten().tolist())

    assert allowed(logits[0]) == {5, 63, 67}
    assert torch.equal(logits[1], torch.zeros(70))
    assert allowed(logits[2]) == {1}
