"""Take docs/images/report.png: `neoxray report RUN_DIR` run from the project root with RUN_DIR relative to it (the
page names the run directory as given, so the picture shows no machine's absolute path), opened in headless
Chromium, the top of the page saved.

    .venv/bin/pip install playwright          # the Python driver only; the browser is Debian's chromium
    .venv/bin/python tools/report_screenshot.py --run-dir runs/demo/train

RUN_DIR is any run directory with steps in its metrics.jsonl: the demo's, or a quicker one, e.g.
`neoxray train --no-ray --config configs/tiny-cpu.yaml --run-dir runs/demo/train data.path=runs/demo/data
parallel.data=1 parallel.tensor=1 parallel.pipeline=1 train.steps=100`. Not a test: CI has no browser.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dashboard_screenshots import BIN, ROOT, launch_browser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo/train", help="a run directory, relative to the project")
    ap.add_argument("--out", default=str(ROOT / "docs/images/report.png"), help="the picture to write")
    args = ap.parse_args()
    if Path(args.run_dir).is_absolute():
        raise SystemExit(f"--run-dir {args.run_dir}: give it relative to the project (the page shows it as given)")
    neoxray = [str(BIN / "neoxray")] if (BIN / "neoxray").exists() else [sys.executable, "-m", "neoxray.cli"]
    subprocess.run([*neoxray, "report", args.run_dir], cwd=ROOT, check=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_browser(pw)
        page = browser.new_page(viewport={"width": 1320, "height": 980})
        page.goto((ROOT / args.run_dir / "report.html").as_uri())
        page.screenshot(path=args.out)
        browser.close()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
