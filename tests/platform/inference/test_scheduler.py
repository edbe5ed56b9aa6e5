"""The scheduler's plan and the paged KV cache's block manager, alone (no model, no tensors): what
`Scheduler.schedule()` asks the executor to run each step, and how blocks are reserved, shared and given back."""

from __future__ import annotations

from neoxray.model.decoding import SamplingParams
from neoxray.platform.inference.kv_cache import BlockManager
from neoxray.platform.inference.request import EngineConfig, Request
from neoxray.platform.inference.scheduler import Scheduler
from neoxray.platform.inference.sequence import SequenceState

GREEDY = SamplingParams(greedy=True, stop_at_eod=False)


def seq(prompt, max_tokens=4, **kw) -> SequenceState:
    return SequenceState.of(Request(list(prompt), max_tokens=max_tokens, sampling=GREEDY, **kw), lambda o: None, 0.0)


def scheduler(num_blocks=16, block_size=4, **kw) -> Scheduler:
    return Scheduler(EngineConfig(block_size=block_size, **kw), BlockManager(num_blocks, block_size))


def run(plan, sched: Scheduler, new_token: int = 1) -> None:
    """What the engine does with a plan: each forward's tokens enter the cache, sampled rows get a token."""
    for fwd in plan.forwards:
        sched.update(fwd)
        for s in fwd.sampled:
            s.tokens.append(new_token)


def test_a_step_plans_prompt_chunks_by_length_then_one_decode_forward():
    sched = scheduler(prefill_chunk=64)
    short, long_ = seq(range(3)), seq(range(20))
    sched.add(short)
    sched.add(long_)
    plan = sched.schedule()
    assert plan.admitted == [short, long_]
    # 3 and 20 tokens: more than twice apart, so two forwards (a short row is not padded to a long one)
    assert [f.batch.lengths for f in plan.forwards] == [[3], [20]]
    assert all(f.prefill and f.batch.sample == [0] for f in plan.forwards)  # both prompts complete: sample
    assert plan.forwards[1].batch.tokens[0] == list(range(20))
    assert plan.forwards[0].batch.block_tables[0] == short.blocks and len(long_.blocks) == 6  # 20 + 4 tokens
    run(plan, sched)
    plan = sched.schedule()  # both decode now, in one forward, each feeding its newest token at its position
    (dec,) = plan.forwards
    assert not dec.prefill and dec.batch.tokens == [[1], [1]] and dec.batch.starts == [3, 20]
    assert dec.batch.sample == [0, 1]


def test_prefill_chunks_keep_the_budget_and_decoding_rows_keep_running():
    sched = scheduler(num_blocks=32, prefill_chunk=8)
    first = seq(range(4))
    sched.add(first)
    run(sched.schedule(), sched)
    big = seq(range(100, 120))  # 20 prompt tokens: three steps of at most 8
    sched.add(big)
    seen = []
    for _ in range(3):
        plan = sched.schedule()
        pre = [f for f in plan.forwards if f.prefill]
        dec = [f for f in plan.forwards if not f.prefill]
        seen.append(sum(pre[0].batch.lengths))
        assert dec and dec[0].seqs == [first]  # the running request decodes every step meanwhile
        assert pre[0].batch.sample == ([0] if len(seen) == 3 else [])  # only the last chunk samples
        run(plan, sched)
    assert seen == [8, 8, 4] and big.computed == 20


def test_admission_stops_at_the_batch_rows_and_at_the_blocks():
    sched = scheduler(num_blocks=6, block_size=4, max_num_seqs=2)
    a, b, c = seq(range(4), max_tokens=4), seq(range(4), max_tokens=4), seq(range(4), max_tokens=4)
    for s in (a, b, c):
        sched.add(s)
    assert sched.schedule().admitted == [a, b]  # two rows
    sched.release(a)
    assert sched.cache.used == 2
    big = seq(range(30), max_tokens=10)  # 10 blocks: more than the pool, it waits; nobody overtakes it
    sched.waiting.insert(0, big)
    sched._by_id[big.req.request_id] = big
    assert sched.schedule().admitted == []


def test_scored_prompts_plan_their_log_probabilities_from_score_from():
    sched = scheduler(prefill_chunk=64)
    s = seq(range(10), max_tokens=0, prompt_logprobs=True, score_from=6)
    sched.add(s)
    (fwd,) = sched.schedule().forwards
    # a scoring-only request feeds all but its last token; positions 5.. predict the scored tokens 6..9
    assert fwd.batch.lengths == [9] and fwd.batch.score == [(0, 5)] and fwd.batch.sample == [0]


def test_blocks_are_shared_by_prefix_and_kept_while_idle_until_needed():
    m = BlockManager(num_blocks=4, block_size=2)
    names = m.names([1, 2, 3, 4], 2)
    assert names == m.names([1, 2, 3, 4, 9], 2) and names[0] == m.names([1, 2], 1)[0]
    assert m.names([1, 2], 1, salt=b"lora:a") != m.names([1, 2], 1)  # adapters never share
    first = m.allocate(2)
    for name, block in zip(names, first):
        m.publish(name, block)
    assert m.peek(names) == ([], True)  # published but not computed yet: worth waiting for
    for block in first:
        m.mark_computed(block)
    shared, waiting = m.peek(names)
    assert shared == first and not waiting
    m.hold(shared)
    assert m.refs[first[0]] == 2
    m.release(first)
    m.release(first)
    assert m.used == 0 and list(m.idle) == list(reversed(first))  # computed blocks stay cached
    assert m.allocate(2) is not None and m.allocate(2) is not None  # the pool takes the idle ones back, LRU
    assert m.peek(names) == ([], False) and m.allocate(1) is None
