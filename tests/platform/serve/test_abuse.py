"""Serving stays fair and shaped under abuse (issue 11): huge bodies and prompts, floods of sequences, input that
used to reach a 500, Serve's backpressure and a model replica that dies mid-request, an empty API key.

Most of it runs against `neoxray serve` on the session's Ray cluster; what needs the engine held at a chosen
point (a flood queued ahead of a small request, a tokenizer that blocks) runs on an in-process server; what
needs a Serve deployment held in a chosen state (one request running, one queued, then its replica killed)
puts the real ingress in front of a stand-in model deployment (tests/support/serving.py).
docs/reliability.md lists each abuse, what happened before, and the test here that keeps it."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request

import pytest
import requests

from neoxray.platform.train.distributed import free_port
from tests.conftest import run_cli, run_here
from tests.support.serving import Server, cancellations, start_server, stop_server, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(ray_local, serve_model_dir, tmp_path_factory):
    """`neoxray serve` joining the session's Ray cluster (no API key; neoxray's default chat template); Serve
    itself is shut down at the end, so that the next module can start it on its own port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("abuse-log") / "serve.log"
    gcs = ray_local.get_runtime_context().gcs_address
    args = ["--model", str(serve_model_dir), "--port", str(port), "--address", gcs, "--name", "tiny"]
    proc = start_server([*args, "--max-num-seqs", "8", "--chat-template", "default"], log, url)
    yield url
    try:
        assert stop_server(proc, log, signal.SIGTERM) == 0, log.read_text()[-4000:]
    finally:
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="module")
def no_ray_server(serve_model_dir, tmp_path_factory):
    """`neoxray serve --no-ray`: the same API under uvicorn in one process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("abuse-no-ray-log") / "serve.log"
    proc = start_server(["--model", str(serve_model_dir), "--port", str(port), "--no-ray", "--name", "tiny"], log, url)
    yield url
    assert stop_server(proc, log) == 0, log.read_text()[-4000:]


def is_openai_error(r: requests.Response, status: int, param: str | None = "-") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param != "-":
        assert err["param"] == param, err
    return err


# ------------------------------------------------------------------------------------------- size and time
def test_a_20_mb_prompt_is_refused_with_413_at_once_and_health_still_answers(server):
    body = json.dumps({"prompt": "x" * 20_000_000, "max_tokens": 1}).encode()
    answers = {}

    def send():
        headers = {"Content-Type": "application/json"}
        answers["big"] = requests.post(server + "/v1/completions", data=body, headers=headers, timeout=300)

    t = threading.Thread(target=send)
    t.start()
    health = requests.get(server + "/health", timeout=30)  # the replica's event loop is free meanwhile
    t.join(300)
    assert health.status_code == 200
    err = is_openai_error(answers["big"], 413, "body")
    assert "8388608" in err["message"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("where", ["server", "no_ray_server"])
def test_a_client_that_sends_its_whole_body_before_reading_gets_the_413(where, framing, request):
    """urllib writes the whole body before it reads the answer, and asks for `Connection: close`: a server that
    answers 413 and closes while the body is still coming resets the connection, and the client sees
    'Connection reset by peer' instead of the 413. The server reads (and drops) what the client sends first."""
    url = request.getfixturevalue(where)
    body = json.dumps({"prompt": "x" * 20_000_000, "max_tokens": 1}).encode()
    data = body if framing == "content-length" else (body[i : i + 65536] for i in range(0, len(body), 65536))
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(req, timeout=300)
    assert answer.value.code == 413
    err = json.loads(answer.value.read())["error"]
    assert err["code"] == "request_too_large" and err["param"] == "body" and "8388608" in err["message"], err
    assert requests.get(url + "/health", timeout=30).status_code == 200


def test_an_over_long_prompt_is_refused_by_its_length_in_characters(server):
    r = requests.post(server + "/v1/completions", json={"prompt": "x" * 3_000_000, "max_tokens": 1}, timeout=300)
    err = is_openai_error(r, 400, "prompt")
    assert "characters" in err["message"] and "256" in err["message"], err


@pytest.fixture()
def watched(tiny_model_dir):
    """An in-process server whose tokenizer records its calls (characters asked for) and holds a text that
    starts with HOLD until released."""
    from neoxray.model.hf import load_model_and_tokenizer
    from neoxray.platform.inference.engine import InferenceEngine

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    calls, entered, release = [], threading.Event(), threading.Event()

    def watch(fn):
        def wrapped(x):
            texts = [x] if isinstance(x, str) else list(x)
            calls.append(sum(map(len, texts)))
            if any(t.startswith("HOLD") for t in texts):
                entered.set()
                release.wait(120)
            return fn(texts[0] if isinstance(x, str) else texts)

        return wrapped

    tok.encode, tok.encode_batch = watch(tok.encode), watch(tok.encode_batch)
    engine = InferenceEngine(model, tok).start()
    srv = Server(engine)
    try:
        yield srv.url, calls, entered, release
    finally:
        release.set()
        srv.close()
        engine.stop(timeout=60)


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(watched):
    url, calls, _, _ = watched
    r = requests.post(url + "/v1/completions", json={"prompt": "y" * 100_000, "max_tokens": 1}, timeout=300)
    err = is_openai_error(r, 400, "prompt")
    assert "characters" in err["message"] and calls == [], (err, calls)


def test_tokenizing_leaves_the_event_loop_free(watched):
    url, _, entered, release = watched
    answers = {}
    body = {"prompt": "HOLD it", "max_tokens": 2}
    held = threading.Thread(
        target=lambda: answers.setdefault("held", requests.post(url + "/v1/completions", json=body))
    )
    held.start()
    assert entered.wait(60), "the tokenizer was not called"
    assert requests.get(url + "/health", timeout=30).status_code == 200  # not stuck behind the tokenizer
    release.set()
    held.join(120)
    assert answers["held"].status_code == 200, answers["held"].text


# ------------------------------------------------------------------------------------------- fairness
def test_a_small_request_is_served_while_a_flood_request_holds_the_queue(tiny_model_dir):
    """In-process, the engine held while a request of 4 x 2 = 8 sequences (40 tokens each) and then one of a
    single 4-token sequence arrive, in that order, on a batch of 4 rows: the small one finishes before any
    sequence of the flood (first come first served kept it waiting for the whole first wave)."""
    from neoxray.model.hf import load_model_and_tokenizer
    from neoxray.platform.inference.engine import InferenceEngine
    from neoxray.platform.inference.request import EngineConfig

    engine = InferenceEngine(*load_model_and_tokenizer(tiny_model_dir), EngineConfig(max_num_seqs=4)).start()
    engine.config.max_running_per_group = 2  # what `neoxray serve` sets: half of the batch rows
    released, release = [], engine.scheduler.release
    engine.scheduler.release = lambda s: (released.append(s.req.max_tokens), release(s))
    gate, held = threading.Event(), threading.Event()
    engine.run_between_steps(lambda: (held.set(), gate.wait()))
    assert held.wait(60), "the engine thread did not take the call"
    srv = Server(engine)
    answers = {}

    def post(name, body):
        answers[name] = requests.post(srv.url + "/v1/completions", json=body, timeout=300)

    flood = {"prompt": ["a b", "c d"], "n": 4, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    small = {"prompt": "x", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    threads = [
        threading.Thread(target=post, args=("flood", flood)),
        threading.Thread(target=post, args=("small", small)),
    ]
    try:
        threads[0].start()
        wait_until(lambda: engine.stats()["waiting"] == 8, lambda: f"the flood queued ({engine.stats()})")
        threads[1].start()
        wait_until(lambda: engine.stats()["waiting"] == 9, lambda: f"the small request queued ({engine.stats()})")
        gate.set()
        for t in threads:
            t.join(300)
        assert answers["small"].status_code == 200 and answers["flood"].status_code == 200
        assert len(answers["flood"].json()["choices"]) == 8
        assert released[0] == 4 and released.count(40) == 8, released  # the small one first
    finally:
        gate.set()
        srv.close()
        engine.stop(timeout=60)


def test_what_one_request_may_hold_is_bounded(server):
    r = requests.post(server + "/v1/completions", json={"prompt": ["x"] * 16, "n": 64, "max_tokens": 1}, timeout=60)
    err = is_openai_error(r, 400, "n")
    assert "1024 sequences" in err["message"] and "at most 64" in err["message"]
    r = requests.post(server + "/v1/completions", json={"prompt": ["x"] * 65, "max_tokens": 1}, timeout=60)
    is_openai_error(r, 400, "prompt")
    r = requests.post(server + "/v1/embeddings", json={"input": ["x"] * 129}, timeout=60)
    assert "at most 128" in is_openai_error(r, 400, "input")["message"]
    r = requests.post(server + "/v1/embeddings", json={"input": [[5] * 256] * 128}, timeout=120)  # at the limit
    assert r.status_code == 200 and len(r.json()["data"]) == 128, r.text[:500]
    r = requests.post(server + "/v1/completions", json={"prompt": ["x"] * 8, "n": 8, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 64, r.text  # at the limit: served


# ------------------------------------------------------------------------------------------- error shapes
def test_input_that_used_to_reach_a_500_or_kill_the_engine_gets_a_400(server):
    post = lambda path, data, **kw: requests.post(server + path, data=data, timeout=60, **kw)
    json_ct = {"Content-Type": "application/json"}
    lone = '{"prompt": "a\\ud800b", "max_tokens": 1}'
    assert "surrogate" in is_openai_error(post("/v1/completions", lone, headers=json_ct), 400, "prompt")["message"]
    is_openai_error(post("/tokenize", '{"prompt": "\\udc80"}', headers=json_ct), 400, "prompt")
    is_openai_error(post("/v1/embeddings", '{"input": ["ok", "\\ud83d"]}', headers=json_ct), 400, "input")
    assert (
        "UTF-8" in is_openai_error(post("/v1/completions", b'{"prompt": "\xff\xfe"}', headers=json_ct), 400)["message"]
    )
    deep = "[" * 100_000 + "]" * 100_000
    is_openai_error(post("/v1/completions", '{"prompt": ' + deep + "}", headers=json_ct), 400, "body")
    is_openai_error(post("/v1/completions", "[" * 2_000_000, headers=json_ct), 400, "body")
    # values that used to fail inside the engine's step, taking every running request down with it
    for body in ({"seed": 2**64}, {"top_k": 2**63}):
        is_openai_error(post("/v1/completions", json.dumps({"prompt": "x", **body}), headers=json_ct), 400)
    r = post("/v1/completions", json.dumps({"prompt": "x", "temperature": 1e-300, "max_tokens": 3, "seed": 1}))
    assert r.status_code == 200, r.text  # a vanishing temperature is greedy
    assert requests.get(server + "/health", timeout=30).status_code == 200


def test_unknown_routes_and_bodies_without_content_type(server):
    err = is_openai_error(requests.post(server + "/v1/audio/speech", json={}, timeout=60), 404)
    assert err["code"] == "not_found"
    is_openai_error(requests.get(server + "/v1/completions", timeout=60), 405)
    r = requests.post(server + "/v1/completions", data=b'{"prompt": "x", "max_tokens": 2}', timeout=60)
    assert "content-type" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"], r.text  # taken as JSON


def test_chat_on_both_servers_as_the_command_line_sets_them(server, no_ray_server):
    """`--chat-template default` reaches the Ray Serve ingress (a streamed chat equals a completion of the
    prompt neoxray's default template renders); a model without a template, served without the option, answers
    chat with a 400 naming it and keeps serving completions."""
    from neoxray.model.chat_template import default_chat_template

    messages = [{"role": "user", "content": "the quick brown fox"}]
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 6, "ignore_eos": True}
    r = requests.post(server + "/v1/chat/completions", json={**body, "stream": True}, timeout=120, stream=True)
    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    prompt = default_chat_template().render(messages, add_generation_prompt=True)
    done = {"prompt": prompt, "temperature": 0, "max_tokens": 6, "ignore_eos": True}
    want = requests.post(server + "/v1/completions", json=done, timeout=120).json()["choices"][0]["text"]
    assert text == want
    err = is_openai_error(requests.post(no_ray_server + "/v1/chat/completions", json=body, timeout=60), 400)
    assert err["code"] == "no_chat_template" and "--chat-template" in err["message"], err
    assert requests.post(no_ray_server + "/v1/completions", json=done, timeout=120).status_code == 200


# ------------------------------------------------------------------------------------------- Serve's failures
@pytest.fixture(scope="module")
def parked(server, ray_local, serve_model_dir, tmp_path_factory):
    """The real ingress in front of a stand-in model deployment (1 request at a time, 1 queued) at /parked;
    -> its URL, the actor counting arrivals, and the folder where cancellations are marked."""
    from ray import serve

    from neoxray.platform.serve.app import NeoxrayIngress, ServeArgs
    from tests.support.serving import Arrivals, ParkingModel

    arrivals = Arrivals.remote()
    marks = tmp_path_factory.mktemp("parked-cancellations")
    args = ServeArgs(model=str(serve_model_dir), name="tiny").model_dump()
    parking = ParkingModel.options(max_ongoing_requests=1, max_queued_requests=1)
    model = parking.bind(str(serve_model_dir), arrivals, str(marks))
    serve.run(NeoxrayIngress.options(max_queued_requests=-1).bind(model, args), name="parked", route_prefix="/parked")
    yield server + "/parked", arrivals, marks
    serve.delete("parked")


def test_backpressure_and_a_model_replica_that_dies_mid_request(parked, ray_local):
    import ray

    url, arrivals, _ = parked
    body = {"prompt": "park here", "max_tokens": 8}
    with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=300) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: {")  # the first token: the replica is busy
        wait_until(lambda: ray.get(arrivals.count.remote()) == 1, "the stream reached the model replica")
        answers = []

        def send():
            answers.append(requests.post(url + "/v1/completions", json={"prompt": "quick", "max_tokens": 1}))

        waiting = [threading.Thread(target=send) for _ in range(2)]
        for t in waiting:
            t.start()
        wait_until(lambda: answers, "one of two requests refused while the other is queued")
        err = is_openai_error(answers[0], 503)
        assert err["code"] == "server_overloaded" and int(answers[0].headers["Retry-After"]) >= 1
        (name,) = [
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "parked#NeoxrayModel#" in a["name"]
        ]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)  # the replica dies mid-stream
        events = [line for line in lines if line]
    assert events[-1] == b"data: [DONE]", events
    error = json.loads(events[-2][len(b"data: ") :])["error"]
    assert error["type"] == "server_error" and error["code"] == "model_unavailable", error
    for t in waiting:
        t.join(300)  # the queued one is served by the replica Serve starts in place of the dead one
    assert answers[1].status_code == 200, answers[1].text


def test_a_client_that_goes_away_cancels_its_call_on_the_model_replica(parked, ray_local):
    """Through Serve: the ingress cancels its handle call when the HTTP client disconnects (the real model
    replica then aborts its engine requests: test_app.py shows the abort on an engine in-process)."""
    url, _, marks = parked
    before = cancellations(marks)
    body = {"prompt": "park", "max_tokens": 8, "stream": True}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=300) as stream:
        assert next(line for line in stream.iter_lines() if line).startswith(b"data: {")
    wait_until(lambda: cancellations(marks) == before + 1, "the model replica's call cancelled")


def test_a_non_streamed_request_whose_replica_dies_gets_503(parked, ray_local):
    import ray

    url, arrivals, _ = parked
    before = ray.get(arrivals.count.remote())
    answers = []
    t = threading.Thread(
        target=lambda: answers.append(requests.post(url + "/v1/completions", json={"prompt": "park", "max_tokens": 4}))
    )
    t.start()
    wait_until(lambda: ray.get(arrivals.count.remote()) == before + 1, "the request reached the model replica")
    (name,) = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "parked#NeoxrayModel#" in a["name"]
    ]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    t.join(300)
    err = is_openai_error(answers[0], 503)
    assert err["code"] == "model_unavailable" and "went away" in err["message"]


# ------------------------------------------------------------------------------------------- API key
def test_an_empty_api_key_is_refused(tiny_model_dir, monkeypatch):
    from pydantic import ValidationError

    from neoxray.platform.serve.app import ServeArgs

    with pytest.raises(ValidationError, match="api_key"):
        ServeArgs(model=str(tiny_model_dir), api_key="  ")
    port = str(free_port())
    common = ["serve", "--model", str(tiny_model_dir), "--no-ray", "--port", port]
    proc = run_cli(*common, "--api-key", "", check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "neoxray: error: serve: api_key: must not be empty: an empty key would turn authentication off "
        "(omit it for no key)"
    ]
    monkeypatch.setenv("NEOXRAY_API_KEY", "")
    proc = run_here(*common)  # the same command, in this process
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "neoxray: error: NEOXRAY_API_KEY is set but empty: an empty key would turn authentication off "
        "(unset NEOXRAY_API_KEY for no key)"
    ], proc.stderr[-2000:]


def test_serve_flags_show_the_defaults_of_serve_args():
    from neoxray.cli import build_parser
    from neoxray.platform.serve.app import ServeArgs

    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    helps = {a.dest: a.help for a in serve_parser._actions}
    for flag in ("max_request_bytes", "max_seqs_per_request", "max_embedding_inputs", "max_embedding_tokens"):
        assert f"default {ServeArgs.model_fields[flag].default}" in helps[flag], (flag, helps[flag])
