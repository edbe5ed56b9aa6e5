"""Take docs/images/chat-page.png: the page `neoxray serve` answers GET / with, in headless Chromium, after a short
conversation with the demo's model. It runs `neoxray serve --no-ray` from the project root as a user does (paths
relative to the project; `--chat-template default`: the demo's model is a base model without a template), types
the messages into the page, waits for each streamed answer to end, saves the page and stops the server (only the
process it started).

    .venv/bin/pip install playwright          # the Python driver only; the browser is Debian's chromium
    .venv/bin/python tools/chat_screenshot.py --model runs/demo/model --lora chat=runs/demo/adapter --pick chat

Greedy answers (temperature 0), so that the same model gives the same picture. Not a test: the page's test is
tests/platform/serve/test_page.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from dashboard_screenshots import BIN, ROOT, free_port, launch_browser, wait_for

MESSAGES = ["Write a Python class for a point.", "Give it a method that moves it."]
ANSWERED = "n => document.querySelectorAll('.msg.assistant').length === n && document.getElementById('stop').disabled"
"""In the page: the n-th answer's stream has ended."""


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model", help="the model to serve, relative to the project")
    ap.add_argument("--name", default="demo", help="the model id the page lists")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="an adapter to list beside it")
    ap.add_argument("--pick", default=None, help="the model or adapter to chat with (default: the first listed)")
    ap.add_argument("--message", action="append", default=None, help=f"a message to send (default: {MESSAGES})")
    ap.add_argument("--chat-template", default="default", help="the server's --chat-template (default: neoxray's)")
    ap.add_argument("--max-tokens", type=int, default=12, help="max tokens per answer")
    ap.add_argument("--out", default=str(ROOT / "docs/images/chat-page.png"), help="the picture to write")
    args = ap.parse_args()
    neoxray = [str(BIN / "neoxray")] if (BIN / "neoxray").exists() else [sys.executable, "-m", "neoxray.cli"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loras = [flag for spec in args.lora for flag in ("--lora", spec)]
    serve = [*neoxray, "serve", "--no-ray", "--model", args.model, "--name", args.name, *loras]
    serve += ["--chat-template", args.chat_template, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        env = {k: v for k, v in os.environ.items() if k != "NEOXRAY_API_KEY"}  # the picture shows no key prompt
        proc = subprocess.Popen(serve, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for("the server", lambda: proc.poll() is not None or healthy(url), timeout=300, every=0.5)
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"neoxray serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            take(url, args)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    print(f"saved {args.out}")


def take(url: str, args) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_browser(pw)
        page = browser.new_page(viewport={"width": 1000, "height": 720}, color_scheme="light")
        page.goto(url + "/")
        page.locator("#model option").first.wait_for(state="attached")
        if args.pick:
            page.get_by_label("Model").select_option(args.pick)
        page.get_by_label("Max tokens").fill(str(args.max_tokens))
        page.get_by_label("Temperature").fill("0")
        for n, message in enumerate(args.message or MESSAGES, 1):
            page.get_by_label("Message").fill(message)
            page.locator("#send").click()
            page.wait_for_function(ANSWERED, arg=n)
        if page.locator("#error").is_visible():
            raise SystemExit(f"the page shows an error: {page.locator('#error').inner_text()}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
