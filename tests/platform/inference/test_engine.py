"""The inference engine alone (no Ray, no HTTP): continuous batching gives each request exactly what it gets
alone, log-probabilities equal a full forward, seeds reproduce, stop strings cut and stream cleanly, the KV
cache budget and aborts are honoured, a long prompt does not stall running requests, and concurrent requests
share engine steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neoxray.model.decoding import SamplingParams
from neoxray.model.generate import generate, score
from neoxray.model.hf import load_model_and_tokenizer
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import Completion, EngineConfig, InvalidRequest, Request

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400], [17], list(range(20, 45)), [7, 7, 7]]
GREEDY = SamplingParams(greedy=True, stop_at_eod=False)


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir)


def engine(model_tok, **kw) -> InferenceEngine:
    model, tok = model_tok
    return InferenceEngine(model, tok, EngineConfig(**kw))


def reference(model_tok, prompt, n):
    model, _ = model_tok
    return generate(model, [prompt], dataclasses.replace(GREEDY, max_new_tokens=n), eod_id=-1)[0].token_ids


def test_continuous_batching_equals_each_request_alone(model_tok):
    """Few batch rows, a small cache and small prefill chunks force queueing, chunked prompts and requests
    joining and leaving the batch; every request still decodes exactly as it does alone."""
    eng = engine(model_tok, max_num_seqs=3, kv_cache_tokens=96, block_size=8, prefill_chunk=6)
    reqs = [Request(p, max_tokens=12 + i, sampling=GREEDY) for i, p in enumerate(PROMPTS)]
    outs = {r.request_id: [] for r in reqs}
    for r in reqs[:2]:
        eng.add_request(r, outs[r.request_id].append)
    for _ in range(4):  # the first two are decoding when the others arrive
        eng.step()
    assert eng.stats()["running"] == 2
    for r in reqs[2:]:
        eng.add_request(r, outs[r.request_id].append)
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, eng.stats()["running"])
        assert eng.stats()["kv_blocks_used"] <= 12
    assert peak == 3
    for r in reqs:
        got = [t for o in outs[r.request_id] for t in o.token_ids]
        assert got == reference(model_tok, r.prompt_ids, r.max_tokens)
        assert outs[r.request_id][-1].finish_reason == "length"
    s = eng.stats()
    assert s["kv_blocks_used"] == 0 and s["running"] == 0 and s["requests_finished"] == len(reqs)


def test_concurrent_requests_share_engine_steps(model_tok):
    """32 requests that arrive together are decoded as one batch: one step prefills every prompt (they fit in
    one chunk) and gives each its first token, and every later step gives each a token, so 32 x 16 tokens take
    16 steps, not 512. Each still gets exactly what it gets alone."""
    # 32 batch rows, a 512-token prefill chunk, no prefix reuse (it would make the requests that share a prompt
    # wait one step for the first one's blocks); not started: the test drives the steps
    eng = engine(model_tok, prefix_caching=False)
    reqs = [Request(PROMPTS[i % len(PROMPTS)] + [i], max_tokens=16, sampling=GREEDY) for i in range(32)]
    assert sum(len(r.prompt_ids) for r in reqs) <= eng.config.prefill_chunk
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r, outs[r.request_id].append)
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, eng.stats()["running"])
    generated = eng.stats()["generated_tokens"]
    assert generated == 32 * 16 and peak == 32
    assert eng.steps == 16, f"{eng.steps} engine steps for {generated} tokens: requests were not batched"
    want = generate(
        model_tok[0], [r.prompt_ids for r in reqs], dataclasses.replace(GREEDY, max_new_tokens=16), eod_id=-1
    )
    for r, w in zip(reqs, want):
        assert [t for o in outs[r.request_id] for t in o.token_ids] == w.token_ids


def test_logprobs_and_prompt_logprobs_equal_a_full_forward(model_tok):
    model, _ = model_tok
    eng = engine(model_tok, prefill_chunk=4)
    reqs = [Request(p, max_tokens=6, sampling=GREEDY, logprobs=3, prompt_logprobs=True) for p in PROMPTS[:3]]
    for r, c in zip(reqs, eng.run_until_done(reqs)):
        want = score(model, r.prompt_ids + c.token_ids)
        got = [e.logprob for e in c.prompt_logprobs] + [e.logprob for e in c.logprobs]
        assert got[0] is None and len(got) == len(want)
        assert got[1:] == pytest.approx(want[1:], abs=1e-4)
        for e in c.logprobs:  # greedy: the chosen token is the most likely alternative
            assert len(e.top) == 3 and e.top[0][0] == e.token_id
            assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)


def test_token_text_spells_out_what_an_openai_completion_shows(model_tok):
    """With `token_text` the engine hands out each log-probability entry's token text (and its alternatives'),
    where it starts (the length of the text of the tokens before it: in the prompt's text for prompt entries, in
    the generated text, which leaves end-of-text out, for generated ones) and, on the first Output, the
    prompt's text, as decoding each of them would; without it, numbers only. The prompts hold characters split
    over several byte-level tokens, and end-of-text tokens."""
    _, tok = model_tok
    eng = engine(model_tok, prefill_chunk=5)
    prompts = [tok.encode("naïve café — 東京 😀 ok"), [tok.eod_id, *tok.encode("über"), tok.eod_id, 5, 6]]

    def request(prompt, token_text=True):
        return Request(prompt, max_tokens=8, sampling=GREEDY, logprobs=2, prompt_logprobs=True, token_text=token_text)

    for prompt in prompts:
        outs = []
        eng.add_request(request(prompt), outs.append)
        while eng.has_work():
            eng.step()
        c = Completion.of(outs, request(prompt))
        entries = c.prompt_logprobs + c.logprobs
        assert [e.text for e in entries] == [tok.decode([e.token_id]) for e in entries]
        assert [e.top_text for e in entries] == [[tok.decode([t]) for t, _ in e.top] for e in entries]
        assert [e.offset for e in c.prompt_logprobs] == [len(tok.decode(prompt[:i])) for i in range(len(prompt))]
        gen = c.token_ids
        assert [e.offset for e in c.logprobs] == [
            len(tok.decode([t for t in gen[:i] if t != tok.eod_id])) for i in range(len(gen))
        ]
        assert outs[0].prompt_text == tok.decode(prompt) and all(o.prompt_text is None for o in outs[1:])
    c = eng.run_until_done([request(prompts[0], token_text=False)])[0]
    assert all(e.text is None and e.offset is None and e.top_text is None for e in c.prompt_logprobs + c.logprobs)


def test_seed_reproduces_whatever_else_is_in_the_batch(model_tok):
    sampled = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, stop_at_eod=False)
    alone = engine(model_tok).run_until_done([Request(PROMPTS[0], max_tokens=16, sampling=sampled)])[0]
    others = [Request(p, max_tokens=10, sampling=dataclasses.replace(sampled, seed=i)) for i, p in enumerate(PROMPTS)]
    mixed = engine(model_tok, max_num_seqs=4).run_until_done(
        others[:3] + [Request(PROMPTS[0], max_tokens=16, sampling=sampled)] + others[3:]
    )[3]
    assert mixed.token_ids == alone.token_ids
    other_seed = engine(model_tok).run_until_done(
        [Request(PROMPTS[0], max_tokens=16, sampling=dataclasses.replace(sampled, seed=99))]
    )[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_cuts_the_text_and_streaming_never_leaks_it(model_tok):
    _, tok = model_tok
    free = engine(model_tok).run_until_done([Request(PROMPTS[4], max_tokens=20, sampling=GREEDY)])[0]
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    eng = engine(model_tok)
    outs = []
    req = Request(PROMPTS[4], max_tokens=20, sampling=dataclasses.replace(GREEDY, stop=(stop,)))
    eng.add_request(req, outs.append)
    while eng.has_work():
        eng.step()
    streamed = "".join(o.text for o in outs)
    assert streamed == text[: text.index(stop)]
    assert outs[-1].finish_reason == "stop"
    assert all(stop not in "".join(o.text for o in outs[: i + 1]) for i in range(len(outs)))


def test_end_of_document_stops_and_is_not_in_the_text(model_tok):
    model, tok = model_tok
    free = reference(model_tok, PROMPTS[0], 20)
    eod = free[4]
    eng = InferenceEngine(model, tok)
    eng.eod_id = eod
    c = eng.run_until_done([Request(PROMPTS[0], max_tokens=20, sampling=SamplingParams(greedy=True))])[0]
    assert c.token_ids == free[: free.index(eod) + 1] and c.finish_reason == "stop"
    assert c.text == tok.decode(free[: free.index(eod)])


def test_kv_budget_queues_requests_and_abort_frees_their_blocks(model_tok):
    eng = engine(model_tok, kv_cache_tokens=32, block_size=8)  # room for one request of 2 + 30 tokens
    a = Request([3, 4], max_tokens=30, sampling=GREEDY)
    b = Request([5, 6], max_tokens=30, sampling=GREEDY)
    outs = {a.request_id: [], b.request_id: []}
    eng.add_request(a, outs[a.request_id].append)
    eng.add_request(b, outs[b.request_id].append)
    for _ in range(3):
        eng.step()
    s = eng.stats()
    assert (s["running"], s["waiting"], s["kv_blocks_used"]) == (1, 1, 4)
    eng.abort(a.request_id)
    eng.step()
    assert outs[a.request_id][-1].finish_reason == "abort"
    while eng.has_work():
        eng.step()
    assert [t for o in outs[b.request_id] for t in o.token_ids] == reference(model_tok, [5, 6], 30)
    assert eng.stats()["kv_blocks_used"] == 0 and eng.stats()["requests_aborted"] == 1


def test_a_long_prompt_does_not_stall_running_requests(model_tok):
    eng = engine(model_tok, prefill_chunk=8)
    running = Request([3, 4], max_tokens=20, sampling=GREEDY)
    long = Request(list(range(100, 160)), max_tokens=2, sampling=GREEDY)  # 60 prompt tokens: 8 chunks
    got = []
    eng.add_request(running, got.append)
    eng.step()
    eng.add_request(long, lambda o: None)
    for _ in range(8):  # while the long prompt is prefilled chunk by chunk, the running request decodes on
        before = len(got)
        eng.step()
        assert len(got) == before + 1
    while eng.has_work():
        eng.step()
    assert [t for o in got for t in o.token_ids] == reference(model_tok, [3, 4], 20)


def test_requests_it_cannot_serve_are_refused_naming_the_field(model_tok):
    eng = engine(model_tok, kv_cache_tokens=32, block_size=8)
    cases = {
        "prompt": Request([], max_tokens=1),
        "max_tokens": Request([1, 2], max_tokens=63),  # beyond the cache (context is 64)
        "logprobs": Request([1, 2], max_tokens=1, logprobs=21),
    }
    for param, req in cases.items():
        with pytest.raises(InvalidRequest) as e:
            eng.add_request(req, lambda o: None)
        assert e.value.param == param
    with pytest.raises(InvalidRequest, match="context of 64"):
        engine(model_tok).add_request(Request([1] * 10, max_tokens=60), lambda o: None)
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        eng.add_request(Request([5000], max_tokens=1), lambda o: None)


def test_embeddings_are_normalised_mean_hidden_states(model_tok):
    model, _ = model_tok
    eng = InferenceEngine(*model_tok)
    v = eng.embed([PROMPTS[0], PROMPTS[1]])
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([PROMPTS[0]]))[0].mean(0)
    assert torch.allclose(torch.tensor(v[0]), torch.nn.functional.normalize(h, dim=0), atol=1e-5)
    assert len(v[1]) == model.config.d_model


def test_background_thread_serves_asyncio_callers_and_stops_gracefully(model_tok):
    import asyncio

    eng = InferenceEngine(*model_tok).start()

    async def main():
        reqs = [Request(p, max_tokens=8, sampling=GREEDY) for p in PROMPTS]
        return await asyncio.gather(*(eng.generate(r) for r in reqs))

    try:
        results = asyncio.run(main())
        for p, c in zip(PROMPTS, results):
            assert c.token_ids == reference(model_tok, p, 8)
    finally:
        eng.stop(timeout=60)  # a failure guard: nothing is left to drain, the thread ends at once
    assert not eng.alive


def test_prefix_reuse_computes_a_shared_context_once_and_changes_no_result(model_tok):
    """Four continuations of one 40-token context (multiple-choice scoring): with prefix reuse the context's
    two full blocks are computed once and shared; scores and tokens equal those without reuse; a request that
    needs the context's own scores (score_from 0) never takes it from the cache."""
    context = list(range(300, 340))
    choices = [[7, 8], [9], [10, 11, 12], [13]]

    def run(prefix_caching):
        eng = engine(model_tok, prefix_caching=prefix_caching, block_size=16)
        reqs = [
            Request(context + c, max_tokens=0, prompt_logprobs=True, logprobs=1, score_from=len(context))
            for c in choices
        ]
        reqs.append(Request(context + [14], max_tokens=5, sampling=GREEDY))  # generation shares it too
        reqs.append(Request(context + [15], max_tokens=0, prompt_logprobs=True))  # scores every token
        done = eng.run_until_done(reqs)
        return done, eng.stats()

    with_reuse, stats = run(True)
    without, plain = run(False)
    assert plain["prefix_cache_tokens"] == 0
    assert stats["prefix_cache_tokens"] == 4 * 32  # 3 more choices and the generation took 2 blocks each
    assert stats["prompt_tokens"] == plain["prompt_tokens"] - 4 * 32
    for a, b in zip(with_reuse, without):
        assert a.token_ids == b.token_ids
        assert [e.token_id for e in a.prompt_logprobs or []] == [e.token_id for e in b.prompt_logprobs or []]
        for x, y in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
            assert (x.logprob is None and y.logprob is None) or abs(x.logprob - y.logprob) < 1e-5
    first = with_reuse[0].prompt_logprobs
    assert [e.token_id for e in first] == choices[0]  # scored from the first continuation token on
    assert len(with_reuse[-1].prompt_logprobs) == len(context) + 1  # the whole prompt, the first without a score
    assert stats["kv_blocks_used"] == 0  # every block returned (shared ones cached for later, not held)
