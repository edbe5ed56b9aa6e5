"""Check, in headless Chromium, that the Ray dashboard shows a neoxray training run and the neoxray Serve
application, and take the screenshots in docs/images/ (dashboard-overview.png, dashboard-jobs.png,
dashboard-train.png, dashboard-serve.png).

    .venv/bin/pip install playwright          # the Python driver only; the browser is Debian's chromium
    .venv/bin/python tools/dashboard_screenshots.py --data runs/demo/data --model runs/demo/model

It starts its own one-node cluster from the project root (the head of tests/support/cluster.py's harness: `ray
start --head --block` with its own ports, temp dir and token), submits `neoxray train` and `neoxray serve` to it as
a user does (`ray job submit`, paths relative to the project, so the pictures show no machine's absolute paths),
signs in to the dashboard with the cluster's token (POST /api/authenticate, as the dashboard's own sign-in page
does), waits until the Jobs, Train and Serve pages name the run and the application, saves the pages, and takes
everything down again (only the processes it started; the run directory runs/dashboard-demo too). Not a test:
CI has no browser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
RUN_DIR = "runs/dashboard-demo"  # relative to the project; Ray Train names the run after it
SHOTS = [  # (image, route, what the page must show first)
    ("overview", "#/overview", "NeoxrayModel"),  # recent jobs and the Serve deployments
    ("jobs", "#/jobs", "neoxray train"),  # the training job
    ("serve", "#/serve", "neoxray"),  # the Serve application
]


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


def launch_browser(pw):
    """Debian's headless Chromium through playwright (no browser download)."""
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    return pw.chromium.launch(executable_path=CHROMIUM, args=flags)


def submit_train_and_serve(cluster, args, http: int) -> None:
    """`ray job submit --no-wait -- neoxray train ...` and `... neoxray serve ...`, as a user submits them."""
    train = ["neoxray", "train", "--config", "configs/tiny-cpu.yaml", "--run-dir", RUN_DIR, f"data.path={args.data}"]
    serve = ["neoxray", "serve", "--model", args.model, "--port", str(http), "--name", "demo"]
    for job in ([*train, "train.steps=400", "name=dashboard-demo"], serve):
        cluster.ray("job", "submit", "--no-wait", "--", *job, cwd=ROOT)


def take_screenshots(url: str, token: str, out: Path, work: Path) -> None:
    """Sign in, then save each page of SHOTS once it shows what it must, and the training job's own page."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch_browser(pw)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        signed = page.request.post(f"{url}/api/authenticate", headers={"Authorization": f"Bearer {token}"})
        assert signed.ok, f"sign-in with the cluster's token failed: {signed.status}"
        for name, route, needle in SHOTS:
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
            if name == "jobs":
                train_job_page(page, out)
        browser.close()


def train_job_page(page, out: Path) -> None:
    """The training run, on its job's page (Ray Train's runs of that driver)."""
    page.locator("tr", has_text="neoxray train").locator("a").first.click()
    page.wait_for_selector("text=dashboard-demo", timeout=120_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "dashboard-train.png"), full_page=True)
    print(f"the training job's page names the run 'dashboard-demo'; saved {out / 'dashboard-train.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/data", help="a prepared dataset, relative to the project (the demo's)")
    ap.add_argument("--model", default="runs/demo/model", help="a model to serve, relative to the project")
    ap.add_argument("--out", default=str(ROOT / "docs/images"), help="where the screenshots go")
    args = ap.parse_args()
    if (ROOT / RUN_DIR).exists():
        raise SystemExit(f"{RUN_DIR} exists: this tool trains a fresh run there and removes it at the end")
    sys.path.insert(0, str(ROOT))
    from tests.support.cluster import TwoNodeCluster  # its head alone: own ports, temp dir and token

    os.chdir(ROOT)  # the head starts here, so a job's relative paths resolve in the project
    work = Path(tempfile.mkdtemp(prefix="nxd-", dir="/tmp"))  # short: Ray's socket paths are limited
    cluster = TwoNodeCluster(work, cpus_per_node=10)
    try:
        cluster.start_head()
        http = free_port()
        submit_train_and_serve(cluster, args, http)
        metrics = ROOT / RUN_DIR / "metrics.jsonl"
        wait_for("training steps", lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5)
        wait_for("the endpoint", lambda: _get(f"http://127.0.0.1:{http}/health"))
        take_screenshots(cluster.dashboard_url, cluster.token, Path(args.out), work)
    finally:
        cluster.stop()
        shutil.rmtree(ROOT / RUN_DIR, ignore_errors=True)
        print(f"logs: {work}")


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


if __name__ == "__main__":
    main()
