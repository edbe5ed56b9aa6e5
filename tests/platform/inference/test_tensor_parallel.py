"""Tensor-parallel engines (two local worker processes over gloo, as on a CPU node): the same greedy tokens,
echo log-probabilities within 1e-4, embeddings and multi-LoRA answers as the one-process engine, with each
worker holding half the weights and the KV cache of its heads; layouts that cannot work are refused before any
weight is read; a worker that dies fails its requests and the engine."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams
from neoxray.model.peft_format import read_peft_adapter
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import EngineConfig, EngineDead, Request, StructuredOutput
from tests.support.peft_reference import write_peft_adapters

GREEDY = SamplingParams(greedy=True, stop_at_eod=False)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400, 500], list(range(20, 45)), [7, 7, 7]]
CONFIG = dict(max_num_seqs=4, kv_cache_tokens=256, block_size=8, prefill_chunk=16, max_loras=2, max_lora_rank=16)


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory):
    """The same model as one process and as two tensor-parallel workers, each with two peft adapters."""
    dirs = dict(list(write_peft_adapters(tiny_model_dir, tmp_path_factory.mktemp("peft")).items())[:2])
    one = InferenceEngine.from_path(tiny_model_dir, device="cpu", config=EngineConfig(**CONFIG))
    two = InferenceEngine.from_path(tiny_model_dir, device="cpu", config=EngineConfig(**CONFIG), tensor_parallel_size=2)
    for eng in (one, two):
        for name, d in dirs.items():
            eng.add_lora(name, read_peft_adapter(d, eng.model_config, name), str(d))
    yield one, two, list(dirs)
    one.stop(timeout=5)
    two.stop(timeout=5)


def requests_for(lora=None):
    gen = [Request(p, max_tokens=10, sampling=GREEDY, lora=lora) for p in PROMPTS]
    echo = [Request(p, max_tokens=0, prompt_logprobs=True, lora=lora) for p in PROMPTS if len(p) > 1]
    return gen + echo


def test_two_workers_answer_as_one_process(engines):
    """Continuous batching over both workers (a small batch and chunked prompts), base and adapters: greedy
    tokens identical, prompt log-probabilities within 1e-4; every worker holds half the sharded weights and
    half the KV cache."""
    one, two, names = engines
    for lora in [None, *names]:
        a, b = one.run_until_done(requests_for(lora)), two.run_until_done(requests_for(lora))
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids, lora
            lp_x = [e.logprob for e in x.prompt_logprobs or [] if e.logprob is not None]
            lp_y = [e.logprob for e in y.prompt_logprobs or [] if e.logprob is not None]
            assert len(lp_x) == len(lp_y) and torch.allclose(torch.tensor(lp_x), torch.tensor(lp_y), atol=1e-4)
    # structured output: the grammar masks the gathered logits in the engine's process, whatever the workers
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
    }

    def constrained():
        spec = StructuredOutput.json_schema(schema)
        reqs = [Request(p, max_tokens=24, sampling=GREEDY, lora=names[0], structured=spec) for p in PROMPTS[:3]]
        return reqs + [Request(PROMPTS[3], max_tokens=8, sampling=GREEDY, structured=StructuredOutput.choice("ab"))]

    a, b = one.run_until_done(constrained()), two.run_until_done(constrained())
    assert [x.token_ids for x in a] == [y.token_ids for y in b] and {x.finish_reason for x in a} == {"stop"}
    assert all(0 <= json.loads(x.text)["n"] <= 99 for x in a[:3]) and a[3].text in ("a", "b")
    base = [c.token_ids for c in one.run_until_done(requests_for(None)[:5])]
    assert base != [c.token_ids for c in two.run_until_done(requests_for(names[0])[:5])]  # the adapter is applied
    d1, d2 = one.describe(), two.describe()
    assert d2["tensor_parallel_size"] == 2
    # layer norms and row-parallel biases are replicated: a little more than half
    assert 0.5 * d1["weight_bytes_per_worker"] < d2["weight_bytes_per_worker"] < 0.56 * d1["weight_bytes_per_worker"]
    assert d2["kv_cache_bytes_per_worker"] * 2 == d1["kv_cache_bytes_per_worker"]
    e1 = one.embed([[5, 6, 7], [9, 10]], lora=names[1])
    e2 = two.embed([[5, 6, 7], [9, 10]], lora=names[1])
    assert torch.allclose(torch.tensor(e1), torch.tensor(e2), atol=1e-5)


def test_a_layout_that_cannot_work_is_one_line_before_any_weight(tiny_model_dir, monkeypatch):
    """Heads that do not divide, and more GPU workers than GPUs: refused with one line, no worker started."""
    import neoxray.platform.model_loading as loading

    monkeypatch.setattr(loading, "load_shard", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(NeoxrayError, match=r"--tensor-parallel-size 3: the model's \d+ attention heads"):
        InferenceEngine.from_path(tiny_model_dir, device="cpu", tensor_parallel_size=3)
    if not torch.cuda.is_available():
        with pytest.raises(NeoxrayError, match="--tensor-parallel-size 2: this machine has 0 GPU"):
            InferenceEngine.from_path(tiny_model_dir, device="cuda", tensor_parallel_size=2)


def test_int8_workers_stay_close_and_a_worker_that_dies_fails_its_requests(engines, tiny_model_dir):
    """Two int8 workers (torchao, each quantizing its own shard after loading; an adapter on top in fp32):
    a quarter of the fp32 shard's linear bytes, prompt log-probabilities close to fp32's. Then one worker is
    killed: the next request ends with an error naming it, and the engine stops (Serve replaces the replica)."""
    one, _, names = engines
    eng = InferenceEngine.from_path(
        tiny_model_dir,
        device="cpu",
        config=EngineConfig(**CONFIG),
        tensor_parallel_size=2,
        quantization="int8_weight_only",
    )
    try:
        d = read_peft_adapter(one.adapters.source[names[0]], eng.model_config, names[0])
        eng.add_lora(names[0], d)
        assert eng.describe()["quantization"] == "int8_weight_only"
        assert eng.describe()["weight_bytes_per_worker"] < 0.4 * one.describe()["weight_bytes_per_worker"]
        for lora in (None, names[0]):
            echo = [r for r in requests_for(lora) if r.max_tokens == 0]
            for x, y in zip(one.run_until_done(echo), eng.run_until_done(echo)):
                lp_x = torch.tensor([e.logprob for e in x.prompt_logprobs[1:]])
                lp_y = torch.tensor([e.logprob for e in y.prompt_logprobs[1:]])
                # the tiny model's logits are scaled up (peaked): int8's error is relative to them
                assert torch.allclose(lp_x, lp_y, rtol=0.02, atol=0.05) and not torch.equal(lp_x, lp_y)
        eng.start()
        worker = eng.executor.workers[1].proc
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(30)
        done = []
        eng.add_request(Request([5, 6, 7], max_tokens=4, sampling=GREEDY), done.append)
        eng._thread.join(60)
        assert done and done[-1].finish_reason == "abort" and "tensor-parallel worker 1 exited" in done[-1].error
        assert isinstance(eng.error, EngineDead) and not eng.alive
    finally:
        eng.stop(timeout=5)
