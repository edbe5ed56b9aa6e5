"""KV-cache decoding and scoring against transformers, sampling controls, limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams, sample_next
from neoxray.model.generate import generate, score
from neoxray.model.hf import load_model_and_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400], [17]]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    ref = GPTNeoXForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tok, ref


def hf_greedy(ref, prompt, n, eod=None):
    out = ref.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eod if eod is not None else -1,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_token_for_token(models):
    model, tok, ref = models
    greedy = SamplingParams(max_new_tokens=24, greedy=True, stop_at_eod=False)
    batched = generate(model, PROMPTS, greedy, eod_id=-1)
    for prompt, got in zip(PROMPTS, batched):
        assert got.token_ids == hf_greedy(ref, prompt, 24)
        assert got.finish_reason == "length"
    # each prompt alone decodes exactly as it does in the left-padded batch
    for prompt, got in zip(PROMPTS, batched):
        assert generate(model, [prompt], greedy, eod_id=-1)[0].token_ids == got.token_ids


def test_incremental_logits_equal_full_forward(models):
    """Prefill + one-token steps through the cache give the same next-token distribution as re-running."""
    model, _, _ = models
    out = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=10, greedy=True, stop_at_eod=False), eod_id=-1)
    seq = PROMPTS[0] + out[0].token_ids
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]
    assert full[len(PROMPTS[0]) - 1 : -1].argmax(-1).tolist() == out[0].token_ids


def test_stops_at_end_of_document(models):
    model, _, ref = models
    free = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=24, greedy=True, stop_at_eod=False), eod_id=-1)
    eod = free[0].token_ids[5]  # pretend the 6th greedy token is the end-of-document token
    first = free[0].token_ids.index(eod)
    got = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=24, greedy=True), eod_id=eod)[0]
    assert got.token_ids == free[0].token_ids[: first + 1] and got.finish_reason == "stop"
    assert got.token_ids == hf_greedy(ref, PROMPTS[0], 24, eod=eod)


def test_stop_strings_cut_the_text(models):
    model, tok, _ = models
    free = generate(
        model, [PROMPTS[1]], SamplingParams(max_new_tokens=30, greedy=True, stop_at_eod=False), tokenizer=tok
    )[0]
    assert len(free.text) > 6
    stop = free.text[4:6]
    got = generate(
        model,
        [PROMPTS[1]],
        SamplingParams(max_new_tokens=30, greedy=True, stop=[stop], stop_at_eod=False),
        tokenizer=tok,
    )[0]
    assert got.finish_reason == "stop" and got.text == free.text[: free.text.index(stop)]
    assert stop not in got.text


def test_seeded_sampling_is_reproducible_and_batch_independent(models):
    model, tok, _ = models
    p = SamplingParams(max_new_tokens=16, temperature=1.5, top_k=40, top_p=0.95, seed=11, stop_at_eod=False)
    alone = generate(model, [PROMPTS[2]], p, eod_id=-1)[0].token_ids
    again = generate(model, [PROMPTS[2]], p, eod_id=-1)[0].token_ids
    in_batch = generate(model, [PROMPTS[0], PROMPTS[2]], [SamplingParams(max_new_tokens=5, seed=1), p], eod_id=-1)[1]
    assert alone == again == in_batch.token_ids
    others = {
        tuple(
            generate(
                model,
                [PROMPTS[2]],
                SamplingParams(max_new_tokens=16, temperature=1.5, seed=s, stop_at_eod=False),
                eod_id=-1,
            )[0].token_ids
        )
        for s in range(5)
    }
    assert len(others) > 1, "different seeds should give different samples at temperature 1.5"


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(1)]
    draws = lambda p: {sample_next(logits, [p], [torch.Generator().manual_seed(s)])[0].item() for s in range(200)}
    assert draws(SamplingParams(top_k=1)) == {0}
    assert draws(SamplingParams(top_k=2)) == {0, 1}
    assert draws(SamplingParams(top_p=0.5)) == {0}
    assert draws(SamplingParams(top_p=0.79)) == {0, 1}
    assert draws(SamplingParams(top_p=0.81)) == {0, 1, 2}
    assert draws(SamplingParams()) == {0, 1, 2, 3}
    assert sample_next(logits, [SamplingParams(temperature=0.0)], gens())[0].item() == 0


def test_context_limits(models):
    model, _, _ = models
    ctx = model.config.max_seq_len
    with pytest.raises(NeoxrayError, match="context"):
        generate(model, [[1] * ctx], SamplingParams(max_new_tokens=1), eod_id=-1)
    with pytest.raises(NeoxrayError, match="empty"):
        generate(model, [[]], SamplingParams(), eod_id=-1)
    out = generate(
        model, [[1] * (ctx - 3)], SamplingParams(max_new_tokens=50, greedy=True, stop_at_eod=False), eod_id=-1
    )[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    with pytest.raises(NeoxrayError, match="top_p"):
        generate(model, [[1]], SamplingParams(top_p=0.0), eod_id=-1)


def test_score_matches_transformers(models):
    model, tok, ref = models
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    got = score(model, ids)
    with torch.no_grad():
        lp = F.log_softmax(ref(torch.tensor([ids])).logits[0, :-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got[0] is None and len(got) == len(ids)
    torch.testing.assert_close(torch.tensor(got[1:]), lp, rtol=1e-4, atol=1e-4)
