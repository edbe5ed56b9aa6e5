"""The page to try the model (GET /, neoxray/platform/serve/page.py) driven in Debian's headless Chromium through
playwright, against a real server on 127.0.0.1 (uvicorn on a thread over an engine, with an API key and one LoRA
adapter): the page loads without the key, asks for it when its first API call answers 401, lists the model and
the adapter, and streams answers that equal the API's own greedy answers to the same conversation; the engine is
held mid-answer to see the text grow while the stream is open and to stop it; refusals and a failure mid-stream
appear as the API words them. The page reaches nothing but its server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests
import torch

from neoxray.platform.serve.args import ServeArgs
from tests.support.serving import Server, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
KEY = "page-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = "Answer in one line."
GUARD_S = 30
"""The deadline of every wait (a failure guard only: each wait ends as soon as its condition holds)."""


@pytest.fixture(scope="module")
def adapter_dir(serve_model_dir, tmp_path_factory):
    """A LoRA adapter of the served model, written by neoxray (random nonzero B: it changes the answers)."""
    from neoxray.model.hf import load_model_and_tokenizer
    from neoxray.model.lora import adapter_from_model, apply_lora
    from neoxray.model.lora_spec import LoRASpec
    from neoxray.model.peft_format import write_peft_adapter

    model, _ = load_model_and_tokenizer(serve_model_dir)
    spec = LoRASpec(r=4, alpha=8, targets=("query_key_value", "dense_4h_to_h"))
    apply_lora(model, spec, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return write_peft_adapter(adapter_from_model(model, spec, "terse"), tmp_path_factory.mktemp("page") / "terse")


def serve(model_dir, adapter):
    args = ServeArgs(
        model=str(model_dir), name="tiny", api_key=KEY, loras={"terse": str(adapter)}, chat_template="default"
    )
    engine = args.build_engine().start()
    return engine, Server(engine, args)


@pytest.fixture(scope="module")
def served(serve_model_dir, adapter_dir):
    engine, srv = serve(serve_model_dir, adapter_dir)
    yield srv, engine, Hold(engine)
    srv.close()
    engine.stop(timeout=30)


@pytest.fixture()
def server(served):
    """The module's server, its engine and their Hold, released after the test whatever happened in it."""
    yield served
    served[2].release()


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)"
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
        b = pw.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield b
        b.close()


class Hold:
    """Holds the engine at a chosen forward (`arm(n)`: the n+1-th forward from now waits for `release`), so that
    the page is seen mid-answer, with the stream still open, however fast the engine is."""

    def __init__(self, engine):
        self.execute = engine.executor.execute
        self.gate, self.held = threading.Event(), threading.Event()
        self.left, self.fail = None, None
        engine.executor.execute = self._execute

    def _execute(self, batch):
        if self.left is not None:
            if self.left == 0:
                self.left = None
                self.held.set()
                self.gate.wait()
                if self.fail:
                    raise RuntimeError(self.fail)
            else:
                self.left -= 1
        return self.execute(batch)

    def arm(self, forwards: int, fail: str | None = None) -> None:
        self.gate.clear()
        self.held.clear()
        self.fail = fail
        self.left = forwards

    def release(self) -> None:
        self.gate.set()


def until(condition, what: str) -> None:
    wait_until(condition, what, timeout=GUARD_S)


def open_page(browser, srv):
    """The page in a fresh context, every request it makes recorded; the key asked for and typed in."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    seen = []
    page.on("request", lambda r: seen.append((r.method, r.url, r.post_data)))
    response = page.goto(srv.url + "/")
    assert response.status == 200 and response.headers["content-type"].startswith("text/html")
    # the first API call (GET v1/models) answered 401: the page asks for the key, quoting the API
    refusal = requests.get(srv.url + "/v1/models").json()["error"]["message"]
    page.locator("#key-form").wait_for(state="visible")
    assert refusal in page.locator("#key-note").inner_text()
    assert page.locator("#model option").count() == 0
    page.get_by_label("API key").fill(KEY)
    page.locator("#key-save").click()
    ids = [m["id"] for m in requests.get(srv.url + "/v1/models", headers=AUTH).json()["data"]]
    until(lambda: page.locator("#model option").count() == len(ids), "the page lists the models")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ids == ["tiny", "terse"]
    assert page.locator("#key-form").is_hidden()
    return page, seen


def settings(page, max_tokens, temperature="0", system=""):
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("Temperature").fill(temperature)
    page.get_by_label("System prompt (optional)").fill(system)


def say(page, text):
    page.get_by_label("Message").fill(text)
    page.locator("#send").click()


def wait_answered(page, n: int) -> str:
    """The n-th answer's text once its stream has ended."""
    until(
        lambda: page.locator(".msg.assistant").count() >= n and page.locator("#stop").is_disabled(),
        f"answer {n} ends",
    )
    return answer(page, n)


def answer(page, n: int) -> str:
    return page.locator(".msg.assistant .content").nth(n - 1).text_content()


def direct(srv, messages, max_tokens, model="tiny") -> dict:
    """The API's own greedy answer (not streamed) to the same conversation."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = requests.post(srv.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_the_page_asks_for_the_key_and_streams_the_conversation(server, browser):
    srv, engine, hold = server
    page, seen = open_page(browser, srv)
    settings(page, 24, system=SYSTEM)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    want = direct(srv, first, 24)
    assert want["finish_reason"] == "length" and len(want["message"]["content"]) > 8, want

    hold.arm(6)  # the prefill and 5 decodes go through, then the engine waits: the stream stays open
    say(page, "Hello there")
    assert hold.held.wait(GUARD_S), "the page's request did not reach the engine"
    until(lambda: answer(page, 1) != "", "the first tokens appear while the answer is still streaming")
    partial = answer(page, 1)
    assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
    assert want["message"]["content"].startswith(partial) and partial != want["message"]["content"], partial
    hold.release()
    assert wait_answered(page, 1) == want["message"]["content"]
    assert page.locator(".msg.assistant .note").nth(0).inner_text() == "cut off: max tokens reached"

    # the next turn sends the whole conversation
    second = [
        *first,
        {"role": "assistant", "content": want["message"]["content"]},
        {"role": "user", "content": "Go on"},
    ]
    say(page, "Go on")
    assert wait_answered(page, 2) == direct(srv, second, 24)["message"]["content"]
    assert page.locator(".msg.user .content").all_text_contents() == ["Hello there", "Go on"]

    posts = [(url, body) for method, url, body in seen if method == "POST"]
    assert [url for url, _ in posts] == [srv.url + "/v1/chat/completions"] * 2
    assert '"stream":true' in posts[0][1] and '"max_tokens":24' in posts[0][1] and '"temperature":0' in posts[0][1]
    assert all(url.startswith(srv.url + "/") for _, url, _ in seen), seen  # nothing from elsewhere
    assert page.locator("#error").is_hidden()
    page.context.close()


def test_the_adapter_picker_stop_and_refusals(server, browser):
    srv, engine, hold = server
    page, _ = open_page(browser, srv)
    settings(page, 12)
    messages = [{"role": "user", "content": "Name a colour"}]
    base, tuned = direct(srv, messages, 12)["message"]["content"], direct(srv, messages, 12, "terse")
    assert tuned["message"]["content"] != base  # the adapter changes the answer: the picker's choice is seen
    page.get_by_label("Model").select_option("terse")
    say(page, "Name a colour")
    assert wait_answered(page, 1) == tuned["message"]["content"]
    assert page.locator(".msg.assistant .who").nth(0).inner_text() == "terse"

    # a refusal: the API's status and message on the page, and the message back in the box to send again
    settings(page, 100000)
    too_long = [
        *messages,
        {"role": "assistant", "content": tuned["message"]["content"]},
        {"role": "user", "content": "More"},
    ]
    r = requests.post(
        srv.url + "/v1/chat/completions",
        json={"model": "terse", "messages": too_long, "max_tokens": 100000, "stream": True, "temperature": 0},
        headers=AUTH,
    )
    assert r.status_code == 400, r.text
    say(page, "More")
    page.locator("#error").wait_for(state="visible")
    err = r.json()["error"]
    assert page.locator("#error").inner_text() == f"Error 400 ({err['type']}): {err['message']}"
    assert page.get_by_label("Message").input_value() == "More"
    assert page.locator(".msg").count() == 2  # the refused turn is not in the conversation

    # stop: the fetch is aborted mid-answer; the text stays as far as it came
    settings(page, 40)
    hold.arm(4)
    page.locator("#send").click()
    assert hold.held.wait(GUARD_S)
    until(lambda: answer(page, 2) != "", "the first tokens of the answer to stop")
    partial = answer(page, 2)
    page.locator("#stop").click()
    until(lambda: page.locator("#stop").is_disabled(), "the stop takes effect")
    assert page.locator(".msg.assistant .note").nth(1).inner_text() == "stopped"
    hold.release()
    until(lambda: engine.stats()["running"] == 0, "the engine lets the stopped request go")
    assert answer(page, 2) == partial and page.locator("#error").is_hidden()
    page.context.close()


def test_a_failure_mid_stream_is_shown_as_the_api_sends_it(serve_model_dir, adapter_dir, browser):
    engine, srv = serve(serve_model_dir, adapter_dir)
    hold = Hold(engine)
    try:
        page, _ = open_page(browser, srv)
        settings(page, 30)
        hold.arm(3, fail="simulated device failure")
        say(page, "Hello")
        assert hold.held.wait(GUARD_S)
        until(lambda: answer(page, 1) != "", "the first tokens before the failure")
        hold.release()
        page.locator("#error").wait_for(state="visible")
        shown = page.locator("#error").inner_text()
        assert shown.startswith("Error in the stream (server_error): ") and "simulated device failure" in shown, shown
        assert page.locator(".msg.assistant.failed .note").inner_text() == "error"
        page.context.close()
    finally:
        hold.release()
        srv.close()
        engine.stop(timeout=30)
