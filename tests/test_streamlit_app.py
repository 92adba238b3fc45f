"""The Streamlit demo's logic through streamlit.testing.v1.AppTest (no browser): uploads of a real and of a corrupt
image, threshold changes and their reset, the batch table, the results tab and a missing checkpoint.

The app is pointed at the `tiny_checkpoints` fixture (MELANOMA_CLASSIFIER / MELANOMA_VAE), and every expected
decision is recomputed here with HybridPredictor on the same file, so the tests do not depend on shipped weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import (
    AppTest,  # noqa: E402
    element_tree,  # noqa: E402
)

from anomaly_detection.hybrid import HybridPredictor, rescue  # noqa: E402
from data.checkpoint import read_sidecar, write_sidecar  # noqa: E402
from data.images import load_rgb  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "streamlit" / "app.py"
TIMEOUT = 120  # seconds per script run: the first run loads the models and computes Grad-CAM on a busy CPU

if not hasattr(element_tree, "FileUploader"):
    pytest.skip("this streamlit's AppTest cannot drive st.file_uploader (added in streamlit PR #14341); the "
                "browser test covers uploads", allow_module_level=True)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, tiny_checkpoints: tuple[Path, Path], tmp_path: Path) -> AppTest:
    classifier, vae = tiny_checkpoints
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(classifier))
    monkeypatch.setenv("MELANOMA_VAE", str(vae))
    monkeypatch.setenv("MELANOMA_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MELANOMA_SAMPLES", str(tmp_path / "samples"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module")
def predictor(tiny_checkpoints: tuple[Path, Path]) -> HybridPredictor:
    torch.set_num_threads(1)
    return HybridPredictor(*tiny_checkpoints)


def texts(at: AppTest) -> list[str]:
    """Every markdown, alert and caption the last run drew."""
    kinds = ("markdown", "caption", "error", "warning", "success", "info")
    return [str(e.value) for kind in kinds for e in getattr(at, kind)]


def verdict(at: AppTest) -> str:
    found = [t for t in texts(at) if t.startswith("Final decision:")]
    assert len(found) == 1, texts(at)
    return found[0]


def upload(at: AppTest, path: Path) -> AppTest:
    at.file_uploader(key="single_upload").set_value((path.name, path.read_bytes(), "image/jpeg"))
    at.run()
    assert not at.exception, at.exception
    return at


def expected(predictor: HybridPredictor, path: Path, malignant: float, anomaly: float) -> dict[str, bool]:
    """The rescue truth table for this image at these thresholds, computed outside the app."""
    p, _ = predictor.predict_image(load_rgb(path), path.name)
    return {k: bool(v) for k, v in rescue(p.prob_malignant, p.vae_score, malignant, anomaly).items()}


def decision(flags: dict[str, bool]) -> str:
    return "MALIGNANT" if flags["pred_hybrid"] else "BENIGN"


@pytest.mark.real_data
def test_real_image_upload(app: AppTest, predictor: HybridPredictor, real_images: list[Path]) -> None:
    path = real_images[2]
    upload(app, path)
    p, _ = predictor.predict_image(load_rgb(path), path.name)
    assert f"Final decision: **{p.decision.upper()}**" in verdict(app)
    shown = " ".join(texts(app))
    assert f"P(malignant) = **{p.prob_malignant:.3f}**" in shown
    assert f"Score = **{p.vae_score:.4f}**" in shown
    assert f"**Rescue fired:** {'yes' if p.rescued else 'no'}" in shown
    assert ("out of distribution" in shown) == p.out_of_distribution
    captions = [c for e in app.image for c in e.captions]
    assert len(captions) == 4 and "not evidence" in captions[3], captions


def random_png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_out_of_distribution_warning(monkeypatch: pytest.MonkeyPatch, tiny_checkpoints: tuple[Path, Path],
                                     tmp_path: Path) -> None:
    """A VAE whose benign calibration scores all lie far below this image's score: the app must warn."""
    classifier, vae = tiny_checkpoints
    shutil.copyfile(vae, tmp_path / "vae.safetensors")
    meta = read_sidecar(vae)
    write_sidecar(tmp_path / "vae.safetensors", {**meta, "calib_benign_score_quantiles": {"0.5": 1e-4, "1.0": 1e-3}})
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(classifier))
    monkeypatch.setenv("MELANOMA_VAE", str(tmp_path / "vae.safetensors"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    upload(at, random_png(tmp_path / "noise.png"))
    assert any("out of distribution" in w.value for w in at.warning), [w.value for w in at.warning]


def test_corrupt_upload_keeps_the_app_running(app: AppTest, tmp_path: Path) -> None:
    app.file_uploader(key="single_upload").set_value(("broken.jpg", b"\xff\xd8 this is not a JPEG", "image/jpeg"))
    app.run()
    assert not app.exception, app.exception
    errors = [e.value for e in app.error]
    assert any("broken.jpg" in e and "not a readable image" in e for e in errors), errors
    assert not [t for t in texts(app) if t.startswith("Final decision:")]
    assert any("Limits" == h.value for h in app.subheader)  # the other tabs are still drawn
    upload(app, random_png(tmp_path / "good.png"))  # the next readable file is analysed
    verdict(app)


@pytest.mark.real_data
def test_threshold_change_and_reset(app: AppTest, predictor: HybridPredictor, real_images: list[Path]) -> None:
    path = real_images[0]
    upload(app, path)
    p, _ = predictor.predict_image(load_rgb(path), path.name)
    top = app.slider(key="anomaly_threshold").max
    cases = [(max(p.prob_malignant - 0.005, 0.0), top),   # the classifier alone says malignant
             (min(p.prob_malignant + 0.005, 1.0), 0.0),   # benign classifier, every image anomalous: rescue
             (min(p.prob_malignant + 0.005, 1.0), top)]   # benign classifier, anomaly threshold at its maximum
    for malignant, anomaly in cases:
        app.slider(key="malignant_threshold").set_value(malignant)
        app.slider(key="anomaly_threshold").set_value(anomaly)
        app.run()
        assert not app.exception, app.exception
        flags = expected(predictor, path, malignant, anomaly)
        assert f"Final decision: **{decision(flags)}**" in verdict(app), (malignant, anomaly, flags)
        assert ("rescued:" in verdict(app)) == flags["rescued"]
    assert expected(predictor, path, *cases[1])["rescued"] and not expected(predictor, path, *cases[0])["rescued"]

    app.button(key="reset_thresholds").click()
    app.run()
    cls_meta, vae_meta = (read_sidecar(c) for c in (predictor.paths["classifier"], predictor.paths["vae"]))
    assert app.slider(key="malignant_threshold").value == pytest.approx(cls_meta["malignant_threshold"])
    assert app.slider(key="anomaly_threshold").value == pytest.approx(vae_meta["anomaly_threshold"])
    flags = expected(predictor, path, cls_meta["malignant_threshold"], vae_meta["anomaly_threshold"])
    assert f"Final decision: **{decision(flags)}**" in verdict(app)


@pytest.mark.real_data
def test_batch_table_and_csv(app: AppTest, predictor: HybridPredictor, real_images: list[Path]) -> None:
    files = [(p.name, p.read_bytes(), "image/jpeg") for p in real_images[1:3]] + [("bad.png", b"nope", "image/png")]
    app.file_uploader(key="batch_upload").set_value(files)
    app.run()
    assert not app.exception, app.exception
    table = app.dataframe[0].value
    assert list(table["file"]) == [f[0] for f in files]
    assert "bad.png" in table["error"].iloc[2] and table["decision"].iloc[2] == "error"
    for path, row in zip(real_images[1:3], table.itertuples()):
        flags = expected(predictor, path, predictor.malignant_threshold, predictor.anomaly_threshold)
        assert row.decision == decision(flags).lower() and row.error == ""
    assert app.get("download_button"), "no CSV download button"


@pytest.mark.real_data
def test_bundled_sample(app: AppTest, real_images: list[Path], tmp_path: Path) -> None:
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "sample_0.jpg").write_bytes(real_images[3].read_bytes())
    app.run()
    app.radio(key="source").set_value("Bundled sample")
    app.run()
    assert not app.exception, app.exception
    verdict(app)
    assert any("synthetic" in c.value for c in app.caption)


def test_results_tab_reads_results_and_names_what_is_absent(app: AppTest, tmp_path: Path) -> None:
    assert any("hybrid is absent" in i.value for i in app.info)
    folder = tmp_path / "results" / "hybrid"
    folder.mkdir(parents=True)
    pd.DataFrame({"model": ["classifier", "hybrid"], "sensitivity": [0.61, 0.74]}).to_csv(
        folder / "comparison_metrics.csv", index=False)
    app.run()
    assert not app.exception, app.exception
    assert any(list(d.value.get("sensitivity", [])) == [0.61, 0.74] for d in app.dataframe)
    infos = [i.value for i in app.info]
    assert any("models_evaluation is absent" in i for i in infos) and not any("hybrid is absent" in i for i in infos)


def test_missing_checkpoint_gives_a_message(monkeypatch: pytest.MonkeyPatch, tiny_checkpoints: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(tiny_checkpoints[0]))
    monkeypatch.setenv("MELANOMA_VAE", str(tmp_path / "missing.safetensors"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert any("missing.safetensors" in e and "not found" in e for e in errors), errors
    assert any("Limits" == h.value for h in at.subheader)
