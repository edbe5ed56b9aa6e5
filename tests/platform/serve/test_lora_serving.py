"""Multi-LoRA serving over HTTP (an in-process server: uvicorn on a thread over an engine, no Ray), with
adapters written by peft itself: a request's `model` names an adapter or the base; /v1/models lists both (with
`parent`); 32 concurrent requests mixing the base and 3 adapters each get peft's greedy answer and were batched
together; echo log-probabilities equal peft's; adapters are loaded and unloaded at run time behind the API key,
the least recently used idle one is evicted past max_loras, and none when all are busy; unknown adapters are 404
and bad adapter directories 400 in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from neoxray.errors import NeoxrayError
from neoxray.platform.serve.args import ServeArgs
from tests.support.peft_reference import PeftReference, write_peft_adapters
from tests.support.serving import Server, wait_until

KEY = "lora-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400, 500], list(range(20, 45))]
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}<bot>"


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    dirs = write_peft_adapters(tiny_model_dir, tmp_path_factory.mktemp("peft"))
    ref = PeftReference(tiny_model_dir, dirs)
    loras = {n: str(d) for n, d in dirs.items()}
    root = str(tmp_path_factory.getbasetemp())  # runtime loads read from here: the adapters, and the tests' own
    args = ServeArgs(model=str(tiny_model_dir), loras=loras, max_loras=3, api_key=KEY, allowed_lora_path=root)
    engine = args.build_engine().start()
    srv = Server(engine, args)
    yield srv, engine, dirs, ref
    srv.close()
    engine.stop(timeout=10)


def post(srv, route, body, headers=AUTH, **kw):
    return requests.post(srv.url + route, json=body, headers=headers, timeout=300, **kw)


def complete(srv, model, prompt, **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **kw}
    return post(srv, "/v1/completions", body)


def token_strings(engine, ids):
    return [engine.tokenizer.decode([t]) for t in ids]


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "\n" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_models_lists_the_base_and_each_adapter_with_its_parent(setup):
    srv, engine, dirs, _ = setup
    data = requests.get(srv.url + "/v1/models", headers=AUTH, timeout=30).json()["data"]
    base = data[0]
    assert base["id"] == engine.model_name == "tiny" and base["parent"] is None
    cards = {c["id"]: c for c in data[1:]}
    assert set(cards) == set(dirs)
    for name, card in cards.items():
        assert card["parent"] == "tiny" and card["root"] == str(dirs[name]) and card["object"] == "model"


def test_32_concurrent_requests_mixing_base_and_adapters_are_each_right_and_batched(setup):
    srv, engine, dirs, ref = setup
    names = ["tiny", *dirs]
    jobs = [(names[i % 4], PROMPTS[(i // 4) % 4]) for i in range(32)]
    before = engine.runner.mixed_forwards
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda j: complete(srv, j[0], j[1], logprobs=0), jobs))
    for (model, prompt), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model  # as vLLM answers: the adapter's name, or the base's
        want = ref.greedy(None if model == "tiny" else model, prompt, 8)
        assert r.json()["choices"][0]["logprobs"]["tokens"] == token_strings(engine, want), (model, prompt)
    mixed = engine.runner.mixed_forwards - before
    assert mixed > 0, "no forward held rows of different adapters"
    health = requests.get(srv.url + "/health", timeout=30).json()
    assert health["lora_mixed_forwards"] >= mixed and health["lora_adapters"] == 3


def test_echo_logprobs_and_streaming_per_adapter_equal_peft(setup):
    srv, engine, dirs, ref = setup
    prompt = PROMPTS[2]
    for name in dirs:
        r = complete(srv, name, prompt, max_tokens=0, echo=True, logprobs=1)
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert got[0] is None and got[1:] == pytest.approx(ref.prompt_logprobs(name, prompt), abs=2e-4)
        r = complete(srv, name, prompt, stream=True, logprobs=0)
        tokens = []
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                assert json.loads(line[6:])["model"] == name
                tokens += json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
        assert tokens == token_strings(engine, ref.greedy(name, prompt, 8))
    # the other routes take adapter names too; embeddings apply the adapter
    assert post(srv, "/tokenize", {"model": "beta", "prompt": "hello"}).status_code == 200
    emb = [
        post(srv, "/v1/embeddings", {"model": m, "input": [prompt]}).json()["data"][0]["embedding"]
        for m in ("tiny", "alpha")
    ]
    assert emb[0] != emb[1]


def test_load_unload_and_least_recently_used_eviction_at_run_time(setup, tmp_path):
    srv, engine, dirs, ref = setup
    body = {"lora_name": "delta", "lora_path": str(dirs["gamma"])}
    assert_error(post(srv, "/v1/load_lora_adapter", body, headers={}), 401, "invalid_api_key")
    assert_error(post(srv, "/v1/unload_lora_adapter", {"lora_name": "alpha"}, headers={}), 401)
    for name in ("alpha", "beta", "gamma"):  # alpha is now the least recently used
        assert complete(srv, name, PROMPTS[0]).status_code == 200
    r = post(srv, "/v1/load_lora_adapter", body)
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "lora_adapter", "lora_name": "delta", "status": "loaded", "evicted": ["alpha"]}
    ids = [c["id"] for c in requests.get(srv.url + "/v1/models", headers=AUTH, timeout=30).json()["data"]]
    assert ids == ["tiny", "beta", "gamma", "delta"]
    assert_error(complete(srv, "alpha", PROMPTS[0]), 404, "model_not_found", "model")
    r = complete(srv, "delta", PROMPTS[1], logprobs=0)
    assert r.json()["choices"][0]["logprobs"]["tokens"] == token_strings(engine, ref.greedy("gamma", PROMPTS[1], 8))
    r = post(srv, "/v1/unload_lora_adapter", {"lora_name": "delta"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert_error(complete(srv, "delta", PROMPTS[0]), 404, "model_not_found")
    assert_error(post(srv, "/v1/unload_lora_adapter", {"lora_name": "delta"}), 404, "model_not_found", "lora_name")
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(dirs["alpha"])})
    assert r.status_code == 200 and r.json()["evicted"] == []  # a free slot again


def test_no_idle_slot_refuses_a_load_with_409(setup):
    """Every slot's adapter has a request waiting (the engine thread is held while they queue): a load finds
    nothing to evict and is refused; once they finish it succeeds."""
    srv, engine, dirs, _ = setup
    loaded = [a["name"] for a in engine.loras()]
    assert len(loaded) == 3
    gate, held = threading.Event(), threading.Event()
    engine.run_between_steps(lambda: (held.set(), gate.wait()))
    assert held.wait(60)
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(complete, srv, n, PROMPTS[0]) for n in loaded]
        wait_until(lambda: engine._inbox.qsize() == 3, "the three requests reach the engine")
        load = pool.submit(post, srv, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(dirs["beta"])})
        wait_until(lambda: engine._inbox.qsize() == 4, "the load reaches the engine")
        gate.set()
        err = assert_error(load.result(), 409, "adapter_busy")
        assert "slots" in err["message"]
        assert all(f.result().status_code == 200 for f in busy)
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(dirs["beta"])})
    assert r.status_code == 200 and len(r.json()["evicted"]) == 1
    evicted = r.json()["evicted"][0]
    post(srv, "/v1/unload_lora_adapter", {"lora_name": "x"})
    assert post(srv, "/v1/load_lora_adapter", {"lora_name": evicted, "lora_path": str(dirs[evicted])}).ok


def test_error_cases_and_the_server_keeps_serving(setup, tmp_path):
    srv, engine, dirs, ref = setup
    assert_error(complete(srv, "no-such-adapter", PROMPTS[0]), 404, "model_not_found", "model")
    assert_error(post(srv, "/tokenize", {"model": "no-such-adapter", "prompt": "x"}), 404, "model_not_found")
    assert_error(post(srv, "/v1/embeddings", {"model": "nope", "input": "x"}), 404, "model_not_found")
    load = "/v1/load_lora_adapter"
    err = assert_error(post(srv, load, {"lora_name": "m", "lora_path": str(tmp_path / "missing")}), 400)
    assert err["param"] == "lora_path" and "not found" in err["message"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    assert_error(post(srv, load, {"lora_name": "m", "lora_path": str(bad)}), 400, param="lora_path")
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    assert_error(post(srv, load, {"lora_name": "m", "lora_path": str(bad)}), 400, param="lora_path")
    assert_error(post(srv, load, {"lora_name": "tiny", "lora_path": str(dirs["beta"])}), 400, param="lora_name")
    assert_error(post(srv, load, {"lora_name": "beta", "lora_path": str(dirs["beta"])}), 400, param="lora_name")
    assert_error(post(srv, load, {"lora_name": "m"}), 400, param="lora_path")
    assert_error(post(srv, load, {"lora_name": "m", "lora_path": "x", "extra": 1}), 400, param="extra")
    assert "m" not in [a["name"] for a in engine.loras()] and len(engine.loras()) == 3
    for name in ("tiny", "beta"):  # still serving, and right
        r = complete(srv, name, PROMPTS[3], logprobs=0)
        want = ref.greedy(None if name == "tiny" else name, PROMPTS[3], 8)
        assert r.json()["choices"][0]["logprobs"]["tokens"] == token_strings(engine, want)


# ------------------------------------------------------------------------------------------- open doors
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def loaded(engine) -> list[str]:
    return sorted(a["name"] for a in engine.loras())


def test_without_a_key_the_runtime_adapter_routes_refuse(setup):
    """A server without an API key: anyone who reaches its port could unload the adapters, or make it read any
    directory it can see. Both routes answer 403 unless the operator leaves them open on purpose."""
    _, engine, dirs, _ = setup
    before = loaded(engine)
    srv = Server(engine)  # the same engine behind a server without a key
    try:
        for route, body in [
            (UNLOAD, {"lora_name": before[0]}),
            (LOAD, {"lora_name": "x", "lora_path": str(dirs["beta"])}),
        ]:
            err = assert_error(post(srv, route, body, headers={}), 403, "lora_updates_disabled")
            assert err["type"] == "permission_error" and "--api-key" in err["message"], err
        assert loaded(engine) == before
    finally:
        srv.close()


def test_the_operator_may_leave_the_runtime_adapter_routes_open(setup, tiny_model_dir):
    _, engine, dirs, _ = setup
    name = loaded(engine)[0]
    where = engine.adapters.source[name]
    args = ServeArgs(model=str(tiny_model_dir), allow_unauthenticated_lora_updates=True)
    srv = Server(engine, args)  # the same engine, no key: open on purpose, but no directory to load from
    try:
        assert post(srv, UNLOAD, {"lora_name": name}, headers={}).status_code == 200
        err = assert_error(post(srv, LOAD, {"lora_name": name, "lora_path": where}, headers={}), 403, param="lora_path")
        assert "--allowed-lora-path" in err["message"]
        keyed = setup[0]  # the keyed server, whose allowed path holds the adapters: load it back
        assert post(keyed, LOAD, {"lora_name": name, "lora_path": where}).status_code == 200
    finally:
        srv.close()


def test_runtime_loads_read_only_under_the_allowed_lora_path(setup, tmp_path, tmp_path_factory):
    """The server's allowed LoRA path is pytest's base temporary directory: an adapter outside it is refused
    (403, naming `lora_path`) whether it is named directly, reached through `..`, through a symbolic link to its
    directory, or through one to its weights."""
    srv, engine, dirs, _ = setup
    outside = Path(tempfile.mkdtemp(prefix="neoxray-outside-"))
    try:
        assert not outside.resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve())
        adapter = shutil.copytree(dirs["beta"], outside / "beta")
        (tmp_path / "link").symlink_to(adapter)
        weights = tmp_path / "weights-link"
        weights.mkdir()
        shutil.copy(adapter / "adapter_config.json", weights)
        (weights / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
        up = f"{tmp_path}/{'../' * len(tmp_path.parts)}{str(adapter).lstrip('/')}"
        before = loaded(engine)
        for path in (adapter, tmp_path / "link", weights, up):
            body = {"lora_name": "x", "lora_path": str(path)}
            err = assert_error(post(srv, LOAD, body), 403, "lora_path_not_allowed", "lora_path")
            assert "allowed" in err["message"], err
        assert loaded(engine) == before
    finally:
        shutil.rmtree(outside)


def test_serve_args_for_loras(tiny_model_dir, tmp_path):
    with pytest.raises(ValidationError, match="max_loras is 1"):
        ServeArgs(model="m", loras={"a": "x", "b": "y"}, max_loras=1)
    with pytest.raises(ValidationError, match="must be non-empty"):
        ServeArgs(model="m", loras={" ": "x"})
    with pytest.raises(ValidationError, match="base model's name"):
        ServeArgs(model="m", name="a", loras={"a": "x"})
    args = ServeArgs(model="m", loras={"a": "x", "b": "y"})
    assert args.engine_config(8).max_loras == 2 and args.engine_config(8).max_lora_rank == 8
    assert ServeArgs(model="m").engine_config().max_loras == 0  # no adapters: the model runs unwrapped
    with pytest.raises(NeoxrayError, match="missing"):  # a bad directory fails before the model loads
        ServeArgs(model=str(tiny_model_dir), loras={"a": str(tmp_path / "missing")}).build_engine()


def test_adapters_through_the_ray_serve_model_deployment(ray_local, setup, tiny_model_dir, s3):
    """The same API over a real `NeoxrayModel` replica reached through a Serve DeploymentHandle (what the
    ingress uses), the replica split over two tensor-parallel worker actors in its placement group: the model
    and the adapters from `loras` read from object storage (a real S3-protocol server) through the node's cache,
    each worker reading only its shard, with the environment `neoxray serve` gives its replicas; the adapter's
    answer (sharded like its layers), runtime load with eviction, and the engine's refusals crossing the Ray
    boundary as 404 / 400 / 403."""
    from ray import serve

    from neoxray.platform.serve.app import NeoxrayModel, ServeEngineClient, replica_env
    from neoxray.platform.serve.tp_workers import placement_bundles
    from neoxray.platform.train.distributed import free_port

    _, engine, dirs, ref = setup
    assert ServeArgs(model="m", num_replicas=2, api_key=KEY).lora_updates_refused() is not None
    assert ServeArgs(model="m", max_replicas=3, api_key=KEY).lora_updates_refused() is not None
    assert ServeArgs(model="m", api_key=KEY).lora_updates_refused() is None
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    root = dirs["alpha"].parent  # where the replica may read adapters at run time
    bucket = s3.bucket("serving")
    beta = Path(tempfile.mkdtemp()) / "beta-chat"  # beta as `neoxray export` writes a chat adapter: its template
    shutil.copytree(dirs["beta"], beta)
    (beta / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    loras = {"alpha": s3.upload_dir(dirs["alpha"], f"{bucket}/adapters/alpha")}
    loras["beta"] = s3.upload_dir(beta, f"{bucket}/adapters/beta")
    model = s3.upload_dir(tiny_model_dir, f"{bucket}/tiny")
    args = ServeArgs(
        model=model, name="tiny", loras=loras, allowed_lora_path=str(root), api_key=KEY, tensor_parallel_size=2
    )
    deployment = NeoxrayModel.options(
        name="LoRAModel",
        ray_actor_options={"num_cpus": 0, **replica_env()},
        placement_group_bundles=placement_bundles(2, 0, 0, 1),  # the replica, then one bundle per worker
        placement_group_strategy="STRICT_PACK",
    )
    handle = serve.run(deployment.bind(args.model_dump()), name="lora-model", route_prefix=None)
    srv = Server(ServeEngineClient(handle), args)
    try:
        ids = [c["id"] for c in requests.get(srv.url + "/v1/models", headers=AUTH, timeout=60).json()["data"]]
        assert ids == ["tiny", "alpha", "beta"]
        for name in ("tiny", "alpha", "beta"):
            r = complete(srv, name, PROMPTS[0], logprobs=0)
            want = ref.greedy(None if name == "tiny" else name, PROMPTS[0], 8)
            assert r.json()["choices"][0]["logprobs"]["tokens"] == token_strings(engine, want), name
        assert_error(complete(srv, "gamma", PROMPTS[0]), 404, "model_not_found")
        # chat: beta's own template (read in the replica, from object storage) renders its prompt; the base has none
        chat = {"messages": [{"role": "user", "content": "fox"}], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = post(srv, "/v1/chat/completions", {**chat, "model": "beta", "logprobs": True})
        prompt = engine.tokenizer.encode("<user>fox</user><bot>")
        want = token_strings(engine, ref.greedy("beta", prompt, 8))
        assert [e["token"] for e in r.json()["choices"][0]["logprobs"]["content"]] == want, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(prompt)
        assert_error(post(srv, "/v1/chat/completions", {**chat, "model": "tiny"}), 400, "no_chat_template")
        r = post(srv, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(dirs["gamma"])})
        assert r.status_code == 200 and r.json()["evicted"] == ["alpha"], r.text  # max_loras 2: the LRU one goes
        r = complete(srv, "gamma", PROMPTS[0], logprobs=0)
        assert r.json()["choices"][0]["logprobs"]["tokens"] == token_strings(engine, ref.greedy("gamma", PROMPTS[0], 8))
        bad = {"lora_name": "m", "lora_path": str(root / "no-such-dir")}
        assert_error(post(srv, "/v1/load_lora_adapter", bad), 400)
        outside = {"lora_name": "m", "lora_path": "/no/such/dir"}  # refused where it would be read: the replica
        assert_error(post(srv, "/v1/load_lora_adapter", outside), 403, "lora_path_not_allowed", "lora_path")
        assert_error(post(srv, "/v1/unload_lora_adapter", {"lora_name": "alpha"}), 404, "model_not_found")
        assert post(srv, "/v1/embeddings", {"model": "gamma", "input": "hello"}).status_code == 200
        health = requests.get(srv.url + "/health", timeout=60).json()
        assert health["tensor_parallel_size"] == 2 and health["weight_bytes_per_worker"] > 0, health
    finally:
        srv.close()
        serve.delete("lora-model")
