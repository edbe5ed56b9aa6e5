"""The Serve config and typed app builder, and the API's failure modes on one in-process server (uvicorn, no
Ray): a full queue, a dead engine, a client that disconnects, graceful shutdown. In-process, the tests can hold
the engine thread at a chosen point, so what they check never depends on how fast the machine is."""

from __future__ import annotations

import threading
import types

import pytest
import requests
import yaml

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams
from neoxray.model.hf import load_model_and_tokenizer
from neoxray.platform.inference.engine import InferenceEngine
from neoxray.platform.inference.request import EngineConfig, Request
from tests.conftest import ROOT, run_cli, run_here
from tests.support.serving import Server, wait_until


def test_shipped_serve_config_validates_and_builds(tiny_model_dir):
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from neoxray.platform.serve.app import ServeArgs, build_app

    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "neoxray.platform.serve.app:build_app"
    ServeArgs(**app_cfg.args)  # every key the shipped config sets is a known, valid argument
    args = {**app_cfg.args, "model": str(tiny_model_dir)}
    app = call_user_app_builder_with_args_if_necessary(build_app, args)  # what `serve run/deploy` does
    assert isinstance(app, Application)
    with pytest.raises(ValidationError, match="max_num_seq"):
        call_user_app_builder_with_args_if_necessary(build_app, {**args, "max_num_seq": 4})
    with pytest.raises(NeoxrayError, match="no/such/model"):
        build_app({"model": "no/such/model"})


@pytest.mark.e2e  # runs the CLI in a child process
def test_serve_cli_refuses_a_missing_model_before_starting_anything():
    proc = run_cli("serve", "--model", "no/such/model", check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["neoxray: error: model not found: no/such/model"]
    proc = run_here("serve", "--model", "no/such/model", "--replicas", "0")  # the same command, in this process
    assert proc.returncode == 1 and "num_replicas" in proc.stderr


@pytest.mark.e2e  # runs the CLI in a child process
def test_serving_beyond_this_machine_without_a_key_says_so_in_one_line():
    """`--host 0.0.0.0` without a key lets anyone who reaches the port use the model: one warning line, before
    anything starts (here the model is missing, so nothing binds). With a key, or on 127.0.0.1, no warning. A fresh
    process shows the warning as a user sees it; the other calls of the same command run in this process."""
    missing = "neoxray: error: model not found: no/such/model"
    for extra in ([], ["--no-ray"]):
        args = ["serve", "--model", "no/such/model", "--host", "0.0.0.0", *extra]
        proc = run_here(*args) if extra else run_cli(*args, check=False, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and lines[-1] == missing, proc.stderr[-2000:]
        warnings = [line for line in lines[:-1] if "0.0.0.0" in line]
        assert len(warnings) == 1 and "--api-key" in warnings[0], lines
        keyed = run_here("serve", "--model", "no/such/model", "--host", "0.0.0.0", "--api-key", "k", *extra)
        assert keyed.stderr.strip().splitlines() == [missing], keyed.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ in-process
@pytest.fixture()
def model_tok(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir)


def test_a_full_queue_gets_503_and_the_server_recovers(model_tok):
    engine = InferenceEngine(*model_tok, EngineConfig(max_num_seqs=1, max_waiting=1)).start()
    gate, held = threading.Event(), threading.Event()
    engine.run_between_steps(lambda: (held.set(), gate.wait()))  # hold the engine thread so that requests pile up
    assert held.wait(60), "the engine thread did not take the call"  # the inbox is empty again: room for one
    srv = Server(engine)
    try:
        codes = []

        def one():
            codes.append(
                requests.post(
                    srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=300
                ).status_code
            )

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        # the first request to reach the engine fills the one waiting place (the engine thread cannot take it
        # while held); every later one finds the queue full and is refused at once, while the first still waits
        wait_until(lambda: len(codes) >= 3, lambda: f"3 refusals while the engine is held (got {codes})")
        assert codes == [503] * 3, codes
        gate.set()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        assert sorted(codes) == [200, 503, 503, 503], codes
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=300)
        assert r.status_code == 200
    finally:
        gate.set()
        srv.close()
        engine.stop(timeout=60)


def test_a_dead_engine_fails_health_and_requests_with_503(model_tok):
    from neoxray.platform.serve.app import NeoxrayModel

    engine = InferenceEngine(*model_tok).start()
    srv = Server(engine)
    try:
        assert requests.get(srv.url + "/health").status_code == 200
        NeoxrayModel.func_or_class.check_health(types.SimpleNamespace(engine=engine))  # healthy: no error

        def broken(*a, **k):
            raise RuntimeError("simulated device failure")

        engine.executor.execute = broken  # the device fails under the executor
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and "simulated device failure" in r.json()["error"]["message"]
        assert requests.get(srv.url + "/health").status_code == 503
        with pytest.raises(RuntimeError, match="simulated device failure"):
            NeoxrayModel.func_or_class.check_health(types.SimpleNamespace(engine=engine))
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503
    finally:
        srv.close()


def test_graceful_stop_finishes_running_requests(model_tok):
    engine = InferenceEngine(*model_tok).start()
    results = []
    reqs = [
        Request([3, 4, 5], max_tokens=40, sampling=SamplingParams(greedy=True, stop_at_eod=False)) for _ in range(4)
    ]
    for r in reqs:
        engine.add_request(r, lambda o: o.finish_reason and results.append(o.finish_reason))
    engine.stop(timeout=300, drain=True)  # a failure guard: the drain returns as soon as the work is done
    assert results == ["length"] * 4
    with pytest.raises(NeoxrayError, match="stopped"):
        engine.add_request(reqs[0], lambda o: None)


def test_a_client_that_disconnects_frees_its_batch_slot(model_tok):
    """A streaming client goes away mid-generation: its request is aborted and its batch row and KV blocks are
    freed. The engine cannot produce a second token until the abort has been queued (its first decode waits for
    the gate), and every later step takes in aborts first, so the request cannot finish on its own first,
    however fast the engine is."""
    engine = InferenceEngine(*model_tok).start()
    gate, aborted = threading.Event(), threading.Event()
    execute, abort = engine.executor.execute, engine.abort

    def held_execute(batch):  # the first token comes from the prefill; a decode forward waits here for the gate
        if batch.starts[0] > 0 and len(batch.tokens[0]) == 1:
            gate.wait()
        return execute(batch)

    def seen_abort(request_id):
        abort(request_id)
        aborted.set()

    engine.executor.execute, engine.abort = held_execute, seen_abort
    srv = Server(engine)
    try:
        with requests.post(
            srv.url + "/v1/completions",
            # logprobs: every token makes a chunk, even one whose text is held back (an incomplete character)
            json={"prompt": "x", "max_tokens": 32, "stream": True, "ignore_eos": True, "temperature": 0, "logprobs": 0},
            stream=True,
            timeout=300,
        ) as r:
            assert r.status_code == 200
            assert next(line for line in r.iter_lines() if line).startswith(b"data: ")
        assert aborted.wait(120), "the server did not abort the request of the client that went away"
        gate.set()

        def freed():
            s = engine.stats()
            return s["requests_aborted"] == 1 and s["running"] == 0 and s["kv_blocks_used"] == 0

        wait_until(freed, lambda: f"the disconnected request frees its slot and KV blocks ({engine.stats()})")
        s = engine.stats()
        # aborted, not finished by length: the abort is taken in before the decode that waited (1 token) or the
        # step after it (2 tokens), whichever the engine thread reached first
        assert s["requests_finished"] == 0 and s["generated_tokens"] <= 2, s
    finally:
        gate.set()
        srv.close()
        engine.stop(timeout=60)


def test_grafana_serving_dashboard_plots_every_serve_metric():
    import json
    import re

    from neoxray.platform.serve.metrics import METRICS

    dash = json.loads((ROOT / "cluster" / "grafana" / "neoxray-serve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bray_[A-Za-z0-9_:]+", expr):
            base = re.sub(r"_(bucket|total)$", "", name[len("ray_") :])  # Prometheus suffixes of histograms, counters
            assert base in METRICS, name
            used.add(base)
    assert used == set(METRICS), set(METRICS) - used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_sampling_controls_through_the_api(model_tok):
    """OpenAI's `logit_bias`, `presence_penalty`, `frequency_penalty` and vLLM's `repetition_penalty` reach the
    engine's sampler from a real client: a +100 bias forces its token, a frequency penalty wears the forced token
    down, and out-of-range values are 400s naming the field."""
    import openai

    engine = InferenceEngine(*model_tok).start()
    srv = Server(engine)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        base = dict(model=engine.model_name, prompt="x", max_tokens=6, temperature=0)
        forced = client.completions.create(**base, logit_bias={"42": 100})
        assert forced.choices[0].text == engine.tokenizer.decode([42] * 6)
        # each time token 42 comes again it loses 2 more: the +100 bias forces it only until the penalty outweighs it
        long = {**base, "max_tokens": 60, "logit_bias": {"42": 100}}
        ids = engine.tokenizer.encode(client.completions.create(**long, frequency_penalty=2.0).choices[0].text)
        assert ids[:8] == [42] * 8 and set(ids) != {42}
        r = client.completions.create(**base, presence_penalty=0.5, extra_body={"repetition_penalty": 1.2})
        assert r.choices[0].finish_reason == "length"
        bad_values = (
            ({"frequency_penalty": 2.5}, "frequency_penalty"),
            ({"logit_bias": {"7": 101}}, "logit_bias"),
            ({"repetition_penalty": 0}, "repetition_penalty"),
        )
        for bad, field in bad_values:
            r = requests.post(srv.url + "/v1/completions", json={**base, **bad}, timeout=60)
            assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    finally:
        srv.close()
        engine.stop(timeout=10)
