"""Check, in headless Chromium, that the Ray dashboard shows a neoxray training run and the neoxray Serve
application, and take the screenshots in docs/images/ (dashboard-train.png, dashboard-serve.png).

    .venv/bin/pip install playwright          # the Python driver only; the browser is Debian's chromium
    .venv/bin/python tools/dashboard_screenshots.py --data runs/demo/data --model runs/demo/model

It starts its own one-node cluster (`ray start --head --block`, token authentication), runs `neoxray train` on it
and `neoxray serve` beside it, signs in to the dashboard with the cluster's token (POST /api/authenticate, as the
dashboard's own sign-in page does), waits until the Train and Serve pages name the run and the application, saves
the pages, and takes everything down again (only the processes it started). Not a test: CI has no browser.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, condition, timeout: float = 300.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "runs/demo/data"), help="a prepared dataset (the demo's)")
    ap.add_argument("--model", default=str(ROOT / "runs/demo/model"), help="a model to serve (the demo's export)")
    ap.add_argument("--out", default=str(ROOT / "docs/images"), help="where the screenshots go")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="neoxray-dash-"))
    gcs, dash, http = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []

    def start(cmd, log, **kw):
        with open(work / log, "wb") as out:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        start(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                "--num-cpus=10",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--temp-dir={work / 'ray'}",
            ],
            "head.log",
            env=env,
        )
        address = f"127.0.0.1:{gcs}"
        url = f"http://127.0.0.1:{dash}"
        wait_for("the dashboard", lambda: _get(f"{url}/api/authentication_mode"))
        token = subprocess.run(
            [str(BIN / "ray"), "get-auth-token"], capture_output=True, text=True, env=env, check=True
        ).stdout.strip()
        job_env = {**env, "RAY_ADDRESS": address}
        run_dir = work / "dashboard-demo"  # Ray Train names the run after the run directory
        start(
            [
                str(BIN / "neoxray"),
                "train",
                "--config",
                str(ROOT / "configs/tiny-cpu.yaml"),
                "--run-dir",
                str(run_dir),
                f"data.path={args.data}",
                "train.steps=400",
                "name=dashboard-demo",
            ],
            "train.log",
            env=job_env,
        )
        start(
            [
                str(BIN / "neoxray"),
                "serve",
                "--model",
                args.model,
                "--port",
                str(http),
                "--name",
                "demo",
                "--address",
                address,
            ],
            "serve.log",
            env=job_env,
        )
        wait_for(
            "training steps",
            lambda: (
                (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 5
            ),
        )
        wait_for("the endpoint", lambda: _get(f"http://127.0.0.1:{http}/health"))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            signed = page.request.post(f"{url}/api/authenticate", headers={"Authorization": f"Bearer {token}"})
            assert signed.ok, f"sign-in with the cluster's token failed: {signed.status}"
            shots = [
                ("overview", "#/overview", "NeoxrayModel"),  # recent jobs and the Serve deployments
                ("jobs", "#/jobs", "neoxray train"),  # the training driver's job
                ("serve", "#/serve", "neoxray"),  # the Serve application
            ]
            for name, route, needle in shots:
                page.goto(f"{url}/{route}")
                try:
                    page.wait_for_selector(f"text={needle}", timeout=120_000)
                except Exception:
                    page.screenshot(path=str(work / f"missing-{name}.png"))
                    raise SystemExit(f"the dashboard's {route} page never showed {needle!r} (see {work})") from None
                page.wait_for_timeout(1500)  # let the tables fill in before the picture is taken
                path = out / f"dashboard-{name}.png"
                page.screenshot(path=str(path))
                print(f"{route}: shows {needle!r}; saved {path}")
                if name == "jobs":  # the training run, on its job's page (Ray Train's runs of that driver)
                    page.locator("tr", has_text="neoxray train").locator("a").first.click()
                    page.wait_for_selector("text=dashboard-demo", timeout=120_000)
                    page.wait_for_timeout(3000)
                    page.screenshot(path=str(out / "dashboard-train.png"), full_page=True)
                    print(
                        f"the training job's page names the run 'dashboard-demo'; saved {out / 'dashboard-train.png'}"
                    )
            browser.close()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        print(f"logs: {work}")


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


if __name__ == "__main__":
    main()
