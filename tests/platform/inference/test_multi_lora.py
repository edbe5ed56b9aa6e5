"""Multi-LoRA in the inference engine, against peft itself: adapters written by peft (different ranks, target
subsets, rsLoRA) give, per adapter, the greedy tokens and prompt log-probabilities of peft's PeftModel; base and
three adapters in one engine run share forwards (rows of different adapters in one step) and each row is still
right; the prefix cache never shares KV blocks between adapters; slots are evicted least recently used first,
only when idle."""

from __future__ import annotations

import pytest

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams
from neoxray.model.hf import load_model_and_tokenizer
from neoxray.model.peft_format import read_peft_adapter
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import AdapterBusy, EngineConfig, InvalidRequest, Request, UnknownAdapter
from tests.support.peft_reference import PeftReference, write_peft_adapters

GREEDY = SamplingParams(greedy=True, stop_at_eod=False)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400, 500], list(range(20, 45))]


@pytest.fixture(scope="module")
def lora_setup(tiny_model_dir, tmp_path_factory):
    dirs = write_peft_adapters(tiny_model_dir, tmp_path_factory.mktemp("peft"))
    return tiny_model_dir, dirs, PeftReference(tiny_model_dir, dirs)


def read_adapter(eng: InferenceEngine, path, name: str | None = None):
    """A peft adapter directory read as every caller reads one, checked against the engine's model."""
    return read_peft_adapter(path, eng.model_config, name)


def lora_engine(model_dir, dirs, names=None, **kw) -> InferenceEngine:
    model, tok = load_model_and_tokenizer(model_dir)
    kw = {"max_loras": 4, "max_lora_rank": 16, "max_num_seqs": 32, **kw}
    eng = InferenceEngine(model, tok, EngineConfig(**kw))
    for name in names if names is not None else dirs:
        eng.add_lora(name, read_adapter(eng, dirs[name], name), str(dirs[name]))
    return eng


def test_each_adapter_alone_equals_peft(lora_setup):
    """Greedy tokens and echo log-probabilities per adapter (and the base) equal peft's PeftModel's, and every
    adapter changes the answer (so the adapter is really applied)."""
    model_dir, dirs, ref = lora_setup
    eng = lora_engine(model_dir, dirs)
    changed = set()
    for name in [None, *dirs]:
        for p in PROMPTS:
            got = eng.run_until_done([Request(p, max_tokens=8, sampling=GREEDY, lora=name)])[0].token_ids
            want = ref.greedy(name, p, 8)
            assert got == want, (name, p)
            if name is not None and want != ref.greedy(None, p, 8):
                changed.add(name)
            lp = eng.run_until_done([Request(p, max_tokens=0, logprobs=0, prompt_logprobs=True, lora=name)])[0]
            ours = [e.logprob for e in lp.prompt_logprobs[1:]]
            assert ours == pytest.approx(ref.prompt_logprobs(name, p), abs=2e-4), (name, p)
    assert changed == set(dirs), "an adapter that changes nothing proves nothing"
    assert eng.runner.mixed_forwards == 0  # one request at a time: no forward mixed adapters


def test_mixed_batch_of_base_and_three_adapters(lora_setup):
    """Base + 3 adapters x 4 prompts in one engine run: each row gets its own adapter's answer, and forwards
    held rows of different adapters (one decode step serves them together, not one batch per adapter)."""
    model_dir, dirs, ref = lora_setup
    eng = lora_engine(model_dir, dirs)
    names = [None, *dirs]
    reqs = [Request(p, max_tokens=10, sampling=GREEDY, lora=n) for p in PROMPTS for n in names]
    results = eng.run_until_done(reqs)
    for r, c in zip(reqs, results):
        assert c.token_ids == ref.greedy(r.lora, r.prompt_ids, 10), (r.lora, r.prompt_ids)
    # every request was admitted at once (32 rows): the decode steps each held all four adapters' rows
    assert eng.runner.mixed_forwards >= 9
    assert eng.stats()["lora_mixed_forwards"] == eng.runner.mixed_forwards
    assert eng.adapters.users == dict.fromkeys(dirs, 0)  # every request released its adapter


def test_prefix_cache_is_never_shared_across_adapters(lora_setup):
    model_dir, dirs, ref = lora_setup
    eng = lora_engine(model_dir, dirs, block_size=8)
    prompt = list(range(50, 90))  # 5 full blocks

    def run(name):
        before = eng.counters["prefix_cache_tokens"]
        out = eng.run_until_done([Request(prompt, max_tokens=4, sampling=GREEDY, lora=name)])[0].token_ids
        assert out == ref.greedy(name, prompt, 4), name
        return eng.counters["prefix_cache_tokens"] - before

    assert run("alpha") == 0
    assert run("beta") == 0 and run(None) == 0 and run("gamma") == 0  # same tokens, other adapters: no reuse
    assert run("alpha") == 32 and run(None) == 32  # the same adapter again: its blocks are reused
    # a name reloaded with other weights is another adapter: its old blocks are not reused
    eng.remove_lora("alpha")
    eng.add_lora("alpha", read_adapter(eng, dirs["gamma"], "alpha"))
    before = eng.counters["prefix_cache_tokens"]
    out = eng.run_until_done([Request(prompt, max_tokens=4, sampling=GREEDY, lora="alpha")])[0].token_ids
    assert out == ref.greedy("gamma", prompt, 4)
    assert eng.counters["prefix_cache_tokens"] == before


def test_slots_evict_the_least_recently_used_idle_adapter(lora_setup):
    model_dir, dirs, _ = lora_setup
    eng = lora_engine(model_dir, dirs, names=["alpha", "beta"], max_loras=2)
    eng.run_until_done([Request([1, 2, 3], max_tokens=1, sampling=GREEDY, lora="alpha")])  # beta is now the LRU
    assert eng.add_lora("gamma", read_adapter(eng, dirs["gamma"], "gamma")) == ["beta"]
    assert sorted(d["name"] for d in eng.loras()) == ["alpha", "gamma"]
    with pytest.raises(UnknownAdapter):
        eng.add_request(Request([1, 2], max_tokens=1, lora="beta"), lambda out: None)
    # both slots busy (a request of each running): no room, and neither can be unloaded
    outs = []
    for n in ("alpha", "gamma"):
        eng.add_request(Request([1, 2, 3], max_tokens=20, sampling=GREEDY, lora=n), outs.append)
    eng.step()
    with pytest.raises(AdapterBusy, match="slots"):
        eng.add_lora("beta", read_adapter(eng, dirs["beta"], "beta"))
    with pytest.raises(AdapterBusy, match="running or waiting"):
        eng.remove_lora("alpha")
    while eng.has_work():
        eng.step()
    eng.remove_lora("alpha")
    assert eng.add_lora("beta", read_adapter(eng, dirs["beta"], "beta")) == []


def test_bad_adapters_are_refused_naming_the_problem(lora_setup, tmp_path):
    model_dir, dirs, _ = lora_setup
    eng = lora_engine(model_dir, dirs, names=[], max_loras=2, max_lora_rank=8)
    with pytest.raises(NeoxrayError, match="not found"):  # over HTTP: a 400 naming lora_path (test_lora_serving)
        read_adapter(eng, tmp_path / "missing")
    with pytest.raises(InvalidRequest, match="max_lora_rank 8"):
        eng.add_lora("gamma", read_adapter(eng, dirs["gamma"], "gamma"))  # rank 16
    eng.add_lora("alpha", read_adapter(eng, dirs["alpha"]))
    with pytest.raises(InvalidRequest, match="already loaded"):
        eng.add_lora("alpha", read_adapter(eng, dirs["alpha"]))
    with pytest.raises(UnknownAdapter):
        eng.remove_lora("nope")
    plain = InferenceEngine(*load_model_and_tokenizer(model_dir), EngineConfig())
    with pytest.raises(InvalidRequest, match="max_loras"):
        plain.add_lora("alpha", read_adapter(plain, dirs["alpha"]))
