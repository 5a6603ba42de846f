"""Cost of the dataset-analysis page on this machine.

    python -m bench.tsne

Prints: the time to build the t-SNE artifact for the full dataset (goal <= 2 min,
preprocessing cache warm, as after a training run), the page's size (HTML plus the
BokehJS it loads), the server time to render it (first request builds the plot,
later ones are cached), and, where headless Chromium is installed, the time until the
browser's load event (goal < 2 s).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from model.settings import REPO_ROOT, data_dir


def browser_load_seconds(url: str) -> float | None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)  # first visit fills the browser cache with BokehJS, as a returning user has it
        cold = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;")
        driver.get(url)
        warm = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;")
        return cold / 1000, warm / 1000
    finally:
        driver.quit()


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="keep the artifact here (default: discard)")
    args = parser.parse_args()
    if not (data_dir() / "train").is_dir():
        print(f"dataset not found at {data_dir()}: set CHEST_XRAY_DATA")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.out or Path(tmp) / "tsne.npz"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "training.tsne", "--out", str(artifact)], cwd=REPO_ROOT, check=True)
        print(f"t-SNE artifact for the full dataset: {time.perf_counter() - started:.0f} s wall (goal <= 120),"
              f" {artifact.stat().st_size / 1024:.0f} KB")

        from werkzeug.serving import make_server

        from app import create_app

        app = create_app({"SECRET_KEY": "bench", "TSNE_ARTIFACT": str(artifact)})
        client = app.test_client()
        started = time.perf_counter()
        html = client.get("/analysis").get_data(as_text=True)
        first = time.perf_counter() - started
        started = time.perf_counter()
        client.get("/analysis")
        again = time.perf_counter() - started
        import re

        js = [client.get(src.split("?")[0]).get_data() for src in re.findall(r'<script src="([^"]+)"', html)
              if src.startswith("/")]
        print(f"page: {len(html.encode()) / 1024:.0f} KB HTML + {sum(map(len, js)) / 1024:.0f} KB BokehJS;"
              f" server render {first * 1000:.0f} ms first, {again * 1000:.0f} ms cached")
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            loads = browser_load_seconds(f"http://127.0.0.1:{server.server_port}/analysis")
        finally:
            server.shutdown()
        if loads is None:
            print("browser load time: skipped (chromium and chromium-driver not installed)")
        else:
            print(f"browser load event: {loads[0]:.2f} s first visit, {loads[1]:.2f} s with BokehJS cached (goal < 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
