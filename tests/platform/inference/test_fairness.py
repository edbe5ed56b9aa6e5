"""Fair scheduling across requests, on the engine alone (stepped by hand, no Ray, no HTTP): one request of many
sequences (a group) cannot take the whole batch or make a later small request wait for it, its prompts do not
hold back another request's prefill, requests that are each alone are still served first come first served,
and every sequence still decodes exactly as it does alone."""

from __future__ import annotations

import dataclasses

import pytest

from neoxray.model.decoding import SamplingParams
from neoxray.model.generate import generate
from neoxray.model.hf import load_model_and_tokenizer
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import EngineConfig, Request

GREEDY = SamplingParams(greedy=True, stop_at_eod=False)


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir)


def reference(model_tok, prompt, n):
    return generate(model_tok[0], [prompt], dataclasses.replace(GREEDY, max_new_tokens=n), eod_id=-1)[0].token_ids


def run(engine: InferenceEngine, reqs: list[Request]) -> tuple[dict, list[str]]:
    """Serve `reqs` (queued in this order) by stepping the engine; -> each request's outputs and the order in
    which requests finished."""
    outs = {r.request_id: [] for r in reqs}
    finished = []

    def sink(r):
        def take(o):
            outs[r.request_id].append(o)
            if o.finish_reason:
                finished.append(r.request_id)

        return take

    engine.add_requests([(r, sink(r)) for r in reqs])
    while engine.has_work():
        engine.step()
    return outs, finished


def test_a_flood_request_leaves_rows_for_a_later_small_one(model_tok):
    eng = InferenceEngine(*model_tok, EngineConfig(max_num_seqs=4, max_running_per_group=2))
    flood = [Request([3 + i, 4], max_tokens=30, sampling=GREEDY, group="flood") for i in range(8)]
    small = Request([9, 10], max_tokens=4, sampling=GREEDY)
    peak = {"flood": 0}
    step = eng.step

    def watched_step():
        step()
        running = sum(1 for s in eng.scheduler.running if s.req.group == "flood")
        peak["flood"] = max(peak["flood"], running)

    eng.step = watched_step
    outs, finished = run(eng, [*flood, small])
    assert finished[0] == small.request_id  # admitted beside the flood at once, not after its first wave
    assert peak["flood"] == 2  # the group's cap: the other rows stay for other requests
    for r in [*flood, small]:
        assert [t for o in outs[r.request_id] for t in o.token_ids] == reference(model_tok, r.prompt_ids, r.max_tokens)


def test_the_next_row_goes_to_the_group_with_the_fewest_running(model_tok):
    eng = InferenceEngine(*model_tok, EngineConfig(max_num_seqs=3))  # no cap: fairness alone
    a = [Request([5, 6], max_tokens=8, sampling=GREEDY, group="a") for _ in range(4)]
    b = [Request([7, 8], max_tokens=8, sampling=GREEDY, group="b") for _ in range(2)]
    for r in a + b:
        eng.add_request(r, lambda o: None)
    eng.step()
    groups = [s.req.group for s in eng.scheduler.running]
    assert groups == ["a", "b", "a"], groups  # a, then b (none running), then a (a and b tie: a came first)


def test_requests_that_are_each_alone_keep_first_come_first_served(model_tok):
    eng = InferenceEngine(*model_tok, EngineConfig(max_num_seqs=2, max_running_per_group=1))
    reqs = [Request([5 + i], max_tokens=3 + i, sampling=GREEDY) for i in range(6)]
    admitted = []
    admit = eng.scheduler.admit

    def watched_admit():
        new = admit()
        admitted.extend(s.req.request_id for s in new)
        return new

    eng.scheduler.admit = watched_admit
    outs, _ = run(eng, reqs)
    assert admitted == [r.request_id for r in reqs]
    for r in reqs:
        assert [t for o in outs[r.request_id] for t in o.token_ids] == reference(model_tok, r.prompt_ids, r.max_tokens)


def test_a_groups_prompts_do_not_hold_back_another_groups_prefill(model_tok):
    """Chunks of 8 tokens; a request of two 20-token prompts arrives just before one with a 3-token prompt. Each
    group's first prompt goes before any group's second: the small one has its first token on the third step
    (after the first prompt's 20 tokens), not on the sixth (after all 40)."""
    eng = InferenceEngine(*model_tok, EngineConfig(prefill_chunk=8))
    big = [Request(list(range(100 + 20 * i, 120 + 20 * i)), max_tokens=4, sampling=GREEDY, group="big") for i in (0, 1)]
    small = Request([3, 4, 5], max_tokens=4, sampling=GREEDY)
    first_token_step = {}

    def sink(r):
        return lambda o: first_token_step.setdefault(r.request_id, eng.steps + 1) if o.token_ids else None

    eng.add_requests([(r, sink(r)) for r in [*big, small]])
    while eng.has_work():
        eng.step()
    assert first_token_step[small.request_id] == 3, first_token_step
    assert first_token_step[big[0].request_id] == 3 and first_token_step[big[1].request_id] == 6
