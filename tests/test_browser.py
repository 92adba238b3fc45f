"""End to end in a real headless browser: the Streamlit demo served on 127.0.0.1, Debian's chromium driven by
Playwright for Python (no browser download); a real HAM10000 image uploaded, and a bundled sample clicked as a
one-click example, the verdict (and the sample's ground truth) read off the page.

The app uses the shipped models (the default classifier of classifiers/shipped.py and checkpoints/convvae) when
both are present and the `tiny_checkpoints` fixture otherwise. The expected verdict is recomputed here with
HybridPredictor on the same file. Pictures go to the test's tmp folder unless asked for, with the shipped models
only, so an untrained model's page never lands in results/:
- `make screenshot` (MELANOMA_SCREENSHOT=results/screenshots/demo.png) refreshes the committed screenshot;
- `make video` (MELANOMA_VIDEO=results/demo/demo.webm) records the example test with Playwright's screencast
  (Playwright >= 1.65; unlike `record_video_dir` it starts once the page is drawn, so the clip skips the start-up):
  a short, small-viewport clip of the demo (the classifier selector, an example clicked, the verdict, the VAE
  reconstruction and Grad-CAM), refused over 3 MB. Playwright encodes it with its own ffmpeg
  (`playwright install ffmpeg`) or, when that is absent, with the system's (`apt-get install -y ffmpeg`).
Skipped with a reason when chromium or playwright is absent (.ci/run installs chromium with
`apt-get install -y chromium`).
"""
from __future__ import annotations

import json
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
from typing import Any

import pandas as pd
import pytest
import torch

from anomaly_detection.hybrid import HybridPredictor
from classifiers.shipped import default_classifier
from data.images import load_rgb
from data.paths import DEFAULT_VAE, ROOT, SAMPLES
from data.runtime import pick_device

APP = ROOT / "streamlit" / "app.py"
SCREENSHOT = os.environ.get("MELANOMA_SCREENSHOT")  # where to keep the picture of the page (make screenshot)
VIDEO = os.environ.get("MELANOMA_VIDEO")  # where to keep the recording of the example test (make video)
VIDEO_SIZE = {"width": 1120, "height": 760}  # viewport and frame size of the recording
VIDEO_FPS = 10  # the page barely moves: 10 frames a second keep the file small
VIDEO_MAX_BYTES = 3 * 2**20
FFMPEG_NAMES = {"linux": "ffmpeg-linux", "darwin": "ffmpeg-mac"}  # Playwright's name for its ffmpeg binary
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
               "--server.fileWatcherType=none", "--client.toolbarMode=viewer"]
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


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium not found on PATH (install it with `apt-get install -y chromium`)")
    pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    return path


@pytest.fixture(scope="module")
def demo(chromium: str, tiny_checkpoints: tuple[Path, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, HybridPredictor]]:
    """(URL of the served demo, the same models as a HybridPredictor for the expected answers)."""
    try:
        classifier = default_classifier()
    except FileNotFoundError:
        classifier = None
    shipped = classifier is not None and DEFAULT_VAE.is_file()
    if (SCREENSHOT or VIDEO) and not shipped:
        pytest.fail("MELANOMA_SCREENSHOT or MELANOMA_VIDEO is set but the shipped checkpoints are missing: no "
                    "demo picture of a random model")
    classifier, vae = (classifier, DEFAULT_VAE) if shipped else tiny_checkpoints
    torch.set_num_threads(1)
    predictor = HybridPredictor(classifier, vae, pick_device("auto"))
    env = {"MELANOMA_CLASSIFIER": str(classifier), "MELANOMA_VAE": str(vae), "MELANOMA_SAMPLES": str(SAMPLES),
           "OMP_NUM_THREADS": "1"}
    with serve(env, tmp_path_factory.mktemp("streamlit") / "streamlit.log") as url:
        yield url, predictor


def launch(pw: Any, chromium: str) -> Any:
    return pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS, timeout=60_000)


def playwright_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure Playwright finds an ffmpeg to encode the video: its own if installed, else the system's, placed
    where Playwright looks for it (a browsers folder of our own, named by the ffmpeg revision it expects)."""
    import playwright

    browsers = json.loads((Path(playwright.__file__).parent / "driver" / "package" / "browsers.json").read_text())
    revision = next(b["revision"] for b in browsers["browsers"] if b["name"] == "ffmpeg")
    binary = FFMPEG_NAMES.get(sys.platform)
    registry = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache" / "ms-playwright")
    system = shutil.which("ffmpeg")
    if binary is None or (registry / f"ffmpeg-{revision}" / binary).is_file():
        return
    if system is None:
        pytest.fail("recording a video needs ffmpeg: `playwright install ffmpeg` or `apt-get install -y ffmpeg`")
    folder = tmp_path / "ms-playwright" / f"ffmpeg-{revision}"
    folder.mkdir(parents=True)
    (folder / binary).symlink_to(system)
    monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(folder.parent))


def glide_to(page: Any, locator: Any, step: int = 120) -> None:
    """Scroll the page with the mouse wheel, a little at a time (it reads as a scroll in the video), until the
    element's bottom is in view."""
    page.mouse.move(VIDEO_SIZE["width"] * 0.65, VIDEO_SIZE["height"] / 2)
    for _ in range(40):
        box = locator.bounding_box()
        if box is None or box["y"] + box["height"] <= page.viewport_size["height"] - 10:
            break
        page.mouse.wheel(0, step)
        page.wait_for_timeout(60)
    locator.scroll_into_view_if_needed()


def test_upload_and_verdict_in_chromium(demo: tuple[str, HybridPredictor], chromium: str, real_images: list[Path],
                                        tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, predictor = demo
    image = real_images[2]
    expected, _ = predictor.predict_image(load_rgb(image), image.name)
    with sync_playwright() as pw:
        browser = launch(pw, chromium)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1520})
            page.goto(url, timeout=60_000)
            page.locator(".st-key-single_upload input[type=file]").set_input_files(str(image), timeout=VERDICT_MS)
            verdict = page.get_by_text("Final decision:")
            verdict.wait_for(timeout=VERDICT_MS)
            assert f"Final decision: {expected.decision.upper()}" in verdict.inner_text()
            assert page.get_by_text(f"P(malignant) = {expected.prob_malignant:.3f}").count() == 1
            assert page.get_by_text("known for this bundled sample only").count() == 0  # an upload has none
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


def test_example_click_in_chromium(demo: tuple[str, HybridPredictor], chromium: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Click the first bundled sample (a melanoma): its verdict, its ground truth, the VAE reconstruction and
    Grad-CAM appear. Recorded as a video when MELANOMA_VIDEO is set, from the moment the page is drawn (the clip
    shows the demo, not its start-up)."""
    from playwright.sync_api import sync_playwright

    url, predictor = demo
    row = pd.read_csv(SAMPLES / "labels.csv", dtype=str).iloc[0]
    expected, _ = predictor.predict_image(load_rgb(SAMPLES / row["file"]), Path(row["file"]).name)
    label = f"Melanoma (malignant) · HAM10000 test · {row['image_id']}"
    if VIDEO:
        playwright_ffmpeg(tmp_path, monkeypatch)
    with sync_playwright() as pw:
        browser = launch(pw, chromium)
        try:
            page = browser.new_page(viewport=VIDEO_SIZE)
            page.goto(url, timeout=60_000)
            example = page.get_by_role("button", name=label)
            example.wait_for(timeout=VERDICT_MS)
            partial = Path(VIDEO).with_suffix(".tmp.webm") if VIDEO else None
            if partial:
                if not hasattr(page, "screencast"):
                    pytest.fail("MELANOMA_VIDEO needs Playwright >= 1.65 (page.screencast with size and fps)")
                partial.parent.mkdir(parents=True, exist_ok=True)
                page.wait_for_timeout(1000)  # the last widgets finish drawing
                page.screencast.start(path=str(partial), size=VIDEO_SIZE, fps=VIDEO_FPS)
                page.screencast.show_actions(cursor="pointer", style={"title": "display: none"})
            page.wait_for_timeout(1200)
            # open the classifier selector: the shipped ones by name, the default marked
            page.get_by_role("combobox", name="Classifier").click()
            page.get_by_role("option").filter(has_text="(default: best validation AUC)").wait_for(timeout=10_000)
            page.wait_for_timeout(1800)
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
            example.click()
            verdict = page.get_by_text("Final decision:")
            verdict.wait_for(timeout=VERDICT_MS)
            assert f"Final decision: {expected.decision.upper()}" in verdict.inner_text()
            truth = page.get_by_text("known for this bundled sample only").inner_text()
            assert "Ground truth" in truth and "MALIGNANT, melanoma" in truth, truth
            assert page.get_by_text(f"P(malignant) = {expected.prob_malignant:.3f}").count() == 1
            gradcam = page.get_by_text("Grad-CAM for 'malignant'")
            gradcam.wait_for(timeout=VERDICT_MS)
            assert page.get_by_text("VAE reconstruction", exact=True).count() == 1
            page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalHeight > 0)",
                                   timeout=60_000)  # the pictures are drawn: the page's height is final
            page.wait_for_timeout(1500)
            glide_to(page, gradcam)
            page.wait_for_timeout(3500)
            if partial:
                page.screencast.stop()  # writes the file
                size = partial.stat().st_size
                if size > VIDEO_MAX_BYTES:
                    partial.unlink()
                    pytest.fail(f"the recording is {size / 2**20:.1f} MB, over {VIDEO_MAX_BYTES / 2**20:.0f} MB")
                os.replace(partial, VIDEO)
                print(f"video: {VIDEO} ({size / 2**20:.2f} MB)")
        finally:
            browser.close()
