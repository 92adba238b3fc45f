"""End to end in a real headless browser: the Streamlit demo served on 127.0.0.1, Debian's chromium driven by
Playwright for Python (no browser download), a real HAM10000 image uploaded, the verdict read off the page.

The app uses the shipped checkpoints when both are present and the `tiny_checkpoints` fixture otherwise. The
expected verdict is recomputed here with HybridPredictor on the same file. The screenshot goes to the test's tmp
folder; `make screenshot` (MELANOMA_SCREENSHOT=results/screenshots/demo.png) refreshes the committed one, with the
shipped models only, so an untrained model's page never lands in results/. Skipped with a reason when chromium or
playwright is absent (.ci/run installs chromium with `apt-get install -y chromium`).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from anomaly_detection.hybrid import HybridPredictor
from data.images import load_rgb
from data.runtime import pick_device
from inference import DEFAULT_CLASSIFIER, DEFAULT_VAE

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "streamlit" / "app.py"
SCREENSHOT = os.environ.get("MELANOMA_SCREENSHOT")  # where to keep the picture of the page (make screenshot)
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
SERVER_START_S = 90
VERDICT_MS = 180_000  # first page load imports torch and the models on a busy 2-core CPU

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.real_data]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """`streamlit run` the app on a free local port until its health check answers; always stopped afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless=true",
               "--browser.gatherUsageStats=false", "--server.address=127.0.0.1", f"--server.port={port}",
               "--server.fileWatcherType=none"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)


def test_upload_and_verdict_in_chromium(real_images: list[Path], tiny_checkpoints: tuple[Path, Path],
                                        tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found on PATH (install it with `apt-get install -y chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    shipped = DEFAULT_CLASSIFIER.is_file() and DEFAULT_VAE.is_file()
    if SCREENSHOT and not shipped:
        pytest.fail("MELANOMA_SCREENSHOT is set but the shipped checkpoints are missing: no demo picture of a "
                    "random model")
    classifier, vae = (DEFAULT_CLASSIFIER, DEFAULT_VAE) if shipped else tiny_checkpoints
    image = real_images[2]
    torch.set_num_threads(1)
    expected, _ = HybridPredictor(classifier, vae, pick_device("auto")).predict_image(load_rgb(image), image.name)
    env = {"MELANOMA_CLASSIFIER": str(classifier), "MELANOMA_VAE": str(vae), "OMP_NUM_THREADS": "1"}

    with serve(env, tmp_path / "streamlit.log") as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1250})
            page.goto(url, timeout=60_000)
            page.locator(".st-key-single_upload input[type=file]").set_input_files(str(image), timeout=VERDICT_MS)
            verdict = page.get_by_text("Final decision:")
            verdict.wait_for(timeout=VERDICT_MS)
            assert f"Final decision: {expected.decision.upper()}" in verdict.inner_text()
            assert page.get_by_text(f"P(malignant) = {expected.prob_malignant:.3f}").count() == 1
            page.get_by_text("Grad-CAM for 'malignant'").wait_for(timeout=VERDICT_MS)
            page.wait_for_timeout(1500)  # let the charts and images finish drawing before the picture
            target = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "demo.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".tmp.png")
            page.screenshot(path=str(partial), full_page=True, timeout=60_000)
            os.replace(partial, target)
            print(f"screenshot: {target}")
        finally:
            browser.close()
