"""End to end: `neoxray serve` deploys the Ray Serve application on a real local Ray cluster, and real clients
talk to its HTTP endpoint: the `openai` client (completions, streaming), lm-evaluation-harness's
`local-completions` model, 32 concurrent requests, the error cases, auth, metrics. A second test runs the same
API without Ray (`--no-ray`, uvicorn). What needs the engine held at a chosen point (a full queue, a client that
disconnects mid-stream) is tested on an in-process server in test_app.py; that concurrent requests share engine
steps is shown on the engine alone in test_engine.py."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import pytest
import requests
import torch

from neoxray.platform.train.distributed import free_port
from tests.conftest import run_cli
from tests.support.serving import start_server, stop_server

KEY = "test-key"
PROMPTS = ["def __init__(self", "import os\n", "The Python Software Foundation", "Copyright (c)", "for i in range("]


@pytest.fixture(scope="module")
def local_model(serve_model_dir):
    from neoxray.model.hf import load_model_and_tokenizer

    return load_model_and_tokenizer(serve_model_dir)


@pytest.fixture(scope="module")
def server(ray_local, serve_model_dir, tmp_path_factory):
    """`neoxray serve` joining the session's Ray cluster, with an API key; stopped with SIGTERM at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    gcs = ray_local.get_runtime_context().gcs_address
    proc = start_server(
        [
            "--model",
            str(serve_model_dir),
            "--port",
            str(port),
            "--address",
            gcs,
            "--api-key",
            KEY,
            "--name",
            "tiny",
            "--max-num-seqs",
            "8",
        ],
        log,
        url,
    )
    yield url
    assert stop_server(proc, log, signal.SIGTERM) == 0, log.read_text()[-4000:]  # what process managers send


def post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + path, json=body, headers=headers, timeout=60, **kw)


def client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def greedy_cli(model_dir, prompt, n):
    return json.loads(
        run_cli(
            "generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(n), "--greedy", "--json"
        ).stdout
    )


# ------------------------------------------------------------------------------------------------- completions
def test_openai_client_greedy_equals_neoxray_generate(server, serve_model_dir):
    c = client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    for prompt in PROMPTS[:2]:
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        want = greedy_cli(serve_model_dir, prompt, 24)
        assert r.choices[0].text == want["text"]
        assert r.choices[0].finish_reason == want["finish_reason"]
        assert r.usage.prompt_tokens == want["prompt_tokens"]
        assert r.usage.completion_tokens == len(want["token_ids"])
        assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")


def test_openai_client_streaming_matches_the_whole_answer(server):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0)
    chunks = list(
        c.completions.create(
            model="tiny",
            prompt=PROMPTS[2],
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_seed_and_prompt_lists(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=1.0, n=2, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    again = c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=1.0, n=2, seed=7)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]
    ids = requests.post(
        server + "/tokenize", json={"prompt": PROMPTS[0]}, headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    by_ids = c.completions.create(model="tiny", prompt=ids["tokens"], max_tokens=8, temperature=0)
    by_text = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_echo_logprobs_equal_neoxray_score(server, serve_model_dir, cli_here):
    text = PROMPTS[2] + " and its licence"
    want = json.loads(cli_here("score", "--model", str(serve_model_dir), "--text", text, "--json"))
    r = post(
        server,
        "/v1/completions",
        {"model": "tiny", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want["logprobs"][1:], abs=1e-4)
    assert "".join(lp["tokens"]) == text
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    # with one generated token, as lm-evaluation-harness asks: the arrays cover prompt + 1
    r = post(
        server,
        "/v1/completions",
        {"model": "tiny", "prompt": want["tokens"], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
    )
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(want["tokens"]) + 1


def test_32_concurrent_requests_are_all_answered_correctly(server, local_model):
    import openai

    from neoxray.model.decoding import SamplingParams
    from neoxray.model.generate import generate

    model, tok = local_model
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    want = generate(
        model, [tok.encode(p) for p in prompts], SamplingParams(max_new_tokens=16, greedy=True), tokenizer=tok
    )

    async def main():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(
            *(c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0) for p in prompts)
        )

    got = asyncio.run(main())
    assert [r.choices[0].text for r in got] == [w.text for w in want]


def test_lm_eval_local_completions_loglikelihood(server, local_model, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from neoxray.model.generate import score

    model, tok = local_model
    docs = [
        {"context": PROMPTS[i], "continuation": c}
        for i, c in enumerate([", name):", "import sys", " is a charity", " 2001 Python", " 10):"])
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(
        "task: neoxray_tiny_loglikelihood\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": server + "/v1/completions",
            "model": "tiny",
            "tokenizer_backend": "remote",
            "auth_token": KEY,
            "num_concurrent": 4,
            "max_retries": 1,
            "tokenized_requests": True,
            "max_length": 256,
        },
        tasks=["neoxray_tiny_loglikelihood"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),  # not lm-eval's 14,000 tasks
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"]["neoxray_tiny_loglikelihood"], key=lambda s: s["doc_id"])
    for doc, sample in zip(docs, samples):
        context, continuation = doc["context"], doc["continuation"]
        spaces = len(context) - len(context.rstrip())  # the harness moves trailing whitespace to the continuation
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tok.encode(context)
        whole = tok.encode(context + continuation)
        lps = score(model, whole)[len(ctx) :]
        ll, greedy = sample["resps"][0][0]
        assert float(ll) == pytest.approx(sum(lps), abs=1e-3)
        with torch.no_grad():
            argmax = model(torch.tensor([whole]))[0, len(ctx) - 1 : -1].argmax(-1).tolist()
        assert bool(greedy) == (argmax == whole[len(ctx) :])
    assert "perplexity,none" in out["results"]["neoxray_tiny_loglikelihood"]


# ------------------------------------------------------------------------------------------------- other routes
def test_embeddings_tokenize_detokenize_tokenizer_info(server, local_model):
    model, tok = local_model
    c = client(server)
    e = c.embeddings.create(model="tiny", input=["hello world", "def f():"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == model.config.d_model
    assert sum(x * x for x in e.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    h = {"Authorization": f"Bearer {KEY}"}
    ids = requests.post(
        server + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}, headers=h
    ).json()
    assert ids["tokens"] == tok.encode("hello world") and ids["count"] == len(ids["tokens"])
    assert requests.post(server + "/detokenize", json={"tokens": ids["tokens"]}, headers=h).json() == {
        "prompt": "hello world"
    }
    info = requests.get(server + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256


# ------------------------------------------------------------------------------------------------- errors
BAD = [
    ("max_tokens", {"prompt": "x", "max_tokens": -1}),
    ("max_tokens", {"prompt": "x", "max_tokens": 10**12}),
    ("max_tokens", {"prompt": "x " * 100, "max_tokens": 200}),  # prompt + max_tokens beyond the context
    ("max_tokens", {"prompt": "x", "max_tokens": "many"}),
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": []}),
    ("prompt", {"prompt": [[5, 99999]]}),
    ("prompt", {"max_tokens": 3}),
    ("logprobs", {"prompt": "x", "logprobs": -1}),
    ("logprobs", {"prompt": "x", "logprobs": 100}),
    ("temperature", {"prompt": "x", "temperature": -0.5}),
    ("top_p", {"prompt": "x", "top_p": 0}),
    ("n", {"prompt": "x", "n": 0}),
    ("stream", {"prompt": "x", "stream": "yes"}),
    ("frobnicate", {"prompt": "x", "frobnicate": True}),
]


@pytest.mark.parametrize("param,body", BAD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD)])
def test_bad_requests_get_400_naming_the_field(server, param, body):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}


def test_invalid_json_wrong_model_and_auth(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = requests.post(server + "/v1/completions", data="{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert requests.get(server + "/v1/models").status_code == 401
    assert requests.get(server + "/health").status_code == 200  # health needs no key (load balancers)
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_serve_metrics_reach_the_prometheus_export(server, ray_local):
    """The replica's neoxray_serve_* metrics are exported where the Ray dashboard and Prometheus read them."""
    node = ray_local._private.worker.global_worker.node
    url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    post(server, "/v1/completions", {"prompt": "metrics", "max_tokens": 4})
    want = (
        "ray_neoxray_serve_time_to_first_token_s",
        "ray_neoxray_serve_generation_tokens",
        "ray_neoxray_serve_running_requests",
        "ray_neoxray_serve_kv_cache_usage",
    )
    deadline, text = time.monotonic() + 300, ""  # a failure guard: the loop ends as soon as all are exported
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            text = ""
        if all(w in text for w in want):
            return
        time.sleep(1)
    missing = [w for w in want if w not in text]
    raise AssertionError(f"not exported after 300 s: {missing}")


# ------------------------------------------------------------------------------------------------- without Ray
@pytest.mark.e2e  # runs the CLI in a child process
def test_serve_without_ray_answers_the_same(serve_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = start_server(["--model", str(serve_model_dir), "--port", str(port), "--no-ray", "--name", "tiny"], log, url)
    try:
        r = post(url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}, key=None)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy_cli(serve_model_dir, PROMPTS[0], 24)["text"]
    finally:
        assert stop_server(proc, log) == 0, log.read_text()[-4000:]
