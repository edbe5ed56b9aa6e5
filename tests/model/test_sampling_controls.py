"""The sampling controls OpenAI's and vLLM's clients send (logit_bias, presence, frequency and repetition
penalties): the batched computation equals independent references row by row (transformers' logits processors,
OpenAI's formula written out), and through the engine they force and ban tokens, break a greedy loop, leave the
other requests of a batch untouched, report the model's own log-probabilities, and refuse values out of range
with one line naming the field."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams, TokenHistory, apply_controls
from neoxray.model.generate import generate, score
from neoxray.model.hf import load_model_and_tokenizer
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import EngineConfig, InvalidRequest, Request

GREEDY = SamplingParams(greedy=True, stop_at_eod=False)
LOOP_PROMPT = [5, 6, 7, 8, 9, 10, 11]  # the tiny model's greedy continuation falls into a loop of three tokens


def reference_row(raw: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """One row's processed logits by independent means: transformers' processors for the bias and the repetition
    penalty, OpenAI's presence/frequency formula token by token over the generated tokens."""
    ids = torch.tensor([prompt + generated])
    x = raw[None].clone()
    if p.logit_bias:
        x = SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()])(ids, x)
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    for t in set(generated):
        x[0, t] -= p.presence_penalty + p.frequency_penalty * generated.count(t)
    return x[0]


def test_a_batch_of_different_settings_equals_the_references_row_by_row():
    V = 32
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(6, V, generator=g) * 3  # positive and negative logits
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.7),
        SamplingParams(logit_bias={3: 5.0, 7: -100.0}),
        SamplingParams(
            logit_bias={1: 2.5, 4: -3.0}, repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=1.5
        ),
        SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=2.0),
    ]
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 4, 6, 3, 7, 2)]
    generated = [torch.randint(0, V // 4, (n,), generator=g).tolist() for n in (9, 8, 12, 0, 10, 11)]  # repeats
    histories = []
    for p, prompt, gen in zip(params, prompts, generated):
        h = TokenHistory(prompt, V, "cpu") if p.uses_penalties else None
        for t in gen:
            if h is not None:
                h.append(t)
        histories.append(h)
    got = apply_controls(raw, params, histories)
    assert torch.equal(got[0], raw[0])  # the row without controls is untouched
    for i in range(1, len(params)):
        want = reference_row(raw[i], params[i], prompts[i], generated[i])
        assert not torch.equal(want, raw[i])
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)
    # no row with a control: no work, the very same tensor
    assert apply_controls(raw, [SamplingParams(), GREEDY] * 3, [None] * 6) is raw


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def eng(model_tok):
    """One engine for the module's tests (each test's requests finish before the next test's start)."""
    model, tok = model_tok
    return InferenceEngine(model, tok, EngineConfig(max_num_seqs=8))


def run(eng, reqs: list[Request]) -> list[list[int]]:
    return [c.token_ids for c in eng.run_until_done(reqs)]


def greedy(n=20, **controls) -> SamplingParams:
    return dataclasses.replace(GREEDY, max_new_tokens=n, **controls)


def most_repeats(ids: list[int]) -> int:
    return max(ids.count(t) for t in set(ids))


def test_a_large_logit_bias_forces_a_token_and_a_negative_one_bans_it(eng):
    base, forced, banned = run(
        eng,
        [
            Request(LOOP_PROMPT, max_tokens=12, sampling=greedy()),
            Request(LOOP_PROMPT, max_tokens=12, sampling=greedy(logit_bias={123: 100.0})),
            Request(LOOP_PROMPT, max_tokens=12, sampling=greedy(logit_bias=dict.fromkeys((598, 538, 217), -100.0))),
        ],
    )
    assert {598, 538, 217} <= set(base) and 123 not in base
    assert forced == [123] * 12
    assert not {598, 538, 217} & set(banned)


def test_penalties_break_a_greedy_loop_in_the_engine_and_in_generate(model_tok, eng):
    model, _ = model_tok
    controls = [{"repetition_penalty": 1.5}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}]
    reqs = [Request(LOOP_PROMPT, max_tokens=20, sampling=greedy(**c)) for c in [{}] + controls]
    got = run(eng, reqs)
    base = got[0]
    assert most_repeats(base) >= 4
    for c, ids in zip(controls, got[1:]):
        assert most_repeats(ids) < most_repeats(base), c
    # `neoxray generate` follows the same rules, each row of its batch with its own
    alone = generate(model, [LOOP_PROMPT] * 4, [greedy(**c) for c in [{}] + controls], eod_id=-1)
    assert [g.token_ids for g in alone] == got


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(model_tok, eng):
    """Penalised and plain requests share decode batches (one with the same prompt as a plain one); each gets
    exactly its tokens when alone. The forced token's log-probability is the model's own, before the bias."""
    reqs = [
        Request(LOOP_PROMPT, max_tokens=12, sampling=greedy()),
        Request(LOOP_PROMPT, max_tokens=12, sampling=greedy(repetition_penalty=1.5, frequency_penalty=0.5)),
        Request([17], max_tokens=12, sampling=greedy()),
        Request([3, 4], max_tokens=12, sampling=greedy(presence_penalty=2.0)),
        Request([7, 7, 7], max_tokens=8, sampling=greedy(logit_bias={123: 100.0}), logprobs=0),
    ]
    model, _ = model_tok
    together = eng.run_until_done(reqs)
    for i in (0, 1, 2):
        alone = eng.run_until_done([dataclasses.replace(reqs[i], request_id=f"alone-{i}")])[0]
        assert together[i].token_ids == alone.token_ids
    assert together[1].token_ids != together[0].token_ids

    forced = together[4]
    assert forced.token_ids == [123] * 8
    model_own = score(model, [7, 7, 7] + forced.token_ids)[3:]
    got = [e.logprob for e in forced.logprobs]
    assert got == pytest.approx(model_own, abs=1e-3)
    assert got[0] < -1.0  # not the biased distribution, where 123 has probability ~1


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("presence_penalty", SamplingParams(presence_penalty=2.5)),
        ("frequency_penalty", SamplingParams(frequency_penalty=-2.01)),
        ("frequency_penalty", SamplingParams(frequency_penalty=math.nan)),
        ("repetition_penalty", SamplingParams(repetition_penalty=0.0)),
        ("repetition_penalty", SamplingParams(repetition_penalty=math.inf)),
        ("logit_bias", SamplingParams(logit_bias={5: 100.5})),
        ("logit_bias", SamplingParams(logit_bias={-1: 1.0})),
        ("logit_bias", SamplingParams(logit_bias={5000: 1.0})),  # outside the tiny model's vocabulary
    ],
)
def test_out_of_range_values_are_refused_with_one_line_naming_the_field(model_tok, eng, field, params):
    model, _ = model_tok
    with pytest.raises(InvalidRequest) as e:
        eng.add_request(Request([3, 4], max_tokens=2, sampling=params), lambda o: None)
    assert e.value.param == field and field in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NeoxrayError, match=field):
        generate(model, [[3, 4]], dataclasses.replace(params, max_new_tokens=2), eod_id=-1)


def test_the_bounds_themselves_are_accepted():
    SamplingParams(
        presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3, logit_bias={0: -100}
    ).validate()
    SamplingParams(presence_penalty=2.0, frequency_penalty=-2.0, logit_bias={5: 100.0}).validate()


def test_stop_token_ids_end_a_sequence_whatever_stop_at_eod_says_and_leave_no_text():
    from neoxray.model.decoding import IncrementalDetokenizer, SamplingParams, StopChecker

    for at_eod in (True, False):
        check = StopChecker(SamplingParams(stop_token_ids=(7,), stop_at_eod=at_eod), eod_id=0, budget=10)
        assert check.after_token(3, 1) is None and check.after_token(7, 2) == "stop"
        assert (check.after_token(0, 3) == "stop") is at_eod

    class Letters:  # a tokenizer of one letter per id
        def decode(self, ids):
            return "".join(chr(ord("a") + i) for i in ids)

    assert IncrementalDetokenizer(Letters(), 0, (7,)).text([1, 2, 7]) == "bc"
    assert IncrementalDetokenizer(Letters(), 0).text([1, 2, 7]) == "bch"
    with pytest.raises(Exception, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(-1,)).validate()
