"""The Streamlit demo's logic through streamlit.testing.v1.AppTest (no browser): uploads of a real and of a corrupt
image, threshold changes and their reset, the batch table, the results tab, a missing checkpoint, the classifier
selector (shipped classifiers by name, the default marked, switching changes the model) and the one-click examples
(the bundled samples, with their ground truth beside the verdict).

The app is pointed at the `tiny_checkpoints` fixture (MELANOMA_CLASSIFIER / MELANOMA_VAE, or a temporary
MELANOMA_CHECKPOINTS folder of tiny "shipped" models), and every expected decision is recomputed here with
HybridPredictor on the same file, so the tests do not depend on shipped weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data.paths import CHECKPOINTS, ROOT, SAMPLES

pytest.importorskip("streamlit")
from streamlit.testing.v1 import (
    AppTest,
    element_tree,
)

from anomaly_detection.hybrid import HybridPredictor, rescue
from classifiers.models import create_model
from data.checkpoint import read_sidecar, save_checkpoint, write_sidecar
from data.images import load_rgb
from data.transforms import preprocess_meta

APP = ROOT / "streamlit" / "app.py"
GATE = CHECKPOINTS / "gate.safetensors"
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
    monkeypatch.setenv("MELANOMA_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("MELANOMA_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MELANOMA_SAMPLES", str(tmp_path / "samples"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module")
def shipped(tiny_checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoints/ folder of two tiny classifiers of different architectures, as shipped ones: medvit_tiny
    (val AUC 0.6, threshold 0.5) and lite0_tiny (EfficientNet-Lite0, 64 px, val AUC 0.7, so the default;
    threshold 0.3), and the tiny VAE as convvae."""
    folder = tmp_path_factory.mktemp("shipped")
    classifier, vae = tiny_checkpoints
    shutil.copyfile(classifier, folder / "medvit_tiny.safetensors")
    write_sidecar(folder / "medvit_tiny.safetensors", {**read_sidecar(classifier), "metrics": {"val": {"auc": 0.6}}})
    torch.manual_seed(0)
    save_checkpoint(folder / "lite0_tiny", create_model("efficientnet_lite0", img_size=64), {
        "kind": "classifier", "arch": "efficientnet_lite0", "arch_kwargs": {}, **preprocess_meta(64),
        "class_names": ["benign", "malignant"], "malignant_threshold": 0.3, "threshold_split": "val",
        "metrics": {"val": {"auc": 0.7}}})
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(vae.with_suffix(suffix), (folder / "convvae").with_suffix(suffix))
    return folder


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
    """A VAE whose benign calibration scores all lie far below this image's score: the app must warn. (The gate
    would refuse this noise image before any verdict, so the app runs without one: an empty checkpoints folder.)"""
    classifier, vae = tiny_checkpoints
    shutil.copyfile(vae, tmp_path / "vae.safetensors")
    meta = read_sidecar(vae)
    write_sidecar(tmp_path / "vae.safetensors", {**meta, "calib_benign_score_quantiles": {"0.5": 1e-4, "1.0": 1e-3}})
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(classifier))
    monkeypatch.setenv("MELANOMA_VAE", str(tmp_path / "vae.safetensors"))
    monkeypatch.setenv("MELANOMA_CHECKPOINTS", str(tmp_path / "checkpoints"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert any("No out-of-distribution gate" in w.value for w in at.sidebar.warning)
    upload(at, random_png(tmp_path / "noise.png"))
    assert any("out of distribution" in w.value for w in at.warning), [w.value for w in at.warning]


def not_lesions(folder: Path) -> list[Path]:
    """A flat grey picture and a coloured checkerboard: neither is a dermoscopic lesion."""
    grey, board = folder / "grey.png", folder / "checkerboard.png"
    Image.new("RGB", (240, 200), (128, 128, 128)).save(grey)
    ys, xs = np.mgrid[0:200, 0:240] // 20
    Image.fromarray(np.where(((ys + xs) % 2 == 0)[..., None], (200, 60, 40), (30, 120, 200)).astype(np.uint8)).save(
        board)
    return [grey, board]


def test_gated_images_show_cannot_assess(monkeypatch: pytest.MonkeyPatch, tiny_checkpoints: tuple[Path, Path],
                                         tmp_path: Path) -> None:
    """With the shipped gate, each non-lesion upload shows "Cannot assess: <reason>" and no verdict, gauges or
    Grad-CAM; the batch tab gives them status "cannot assess" and counts them."""
    classifier, vae = tiny_checkpoints
    for name, value in (("CLASSIFIER", classifier), ("VAE", vae), ("GATE", GATE), ("CHECKPOINTS", tmp_path / "ckpt"),
                        ("RESULTS", tmp_path / "results"), ("SAMPLES", tmp_path / "samples")):
        monkeypatch.setenv(f"MELANOMA_{name}", str(value))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert any("Out-of-distribution gate" in c.value for c in at.sidebar.caption)
    gated = HybridPredictor(classifier, vae, gate=GATE)
    images = not_lesions(tmp_path)
    for path in images:
        p, _ = gated.predict_image(load_rgb(path), path.name)
        assert p.status == "cannot assess", p
        upload(at, path)
        errors = [e.value for e in at.error]
        assert any(e.startswith(f"Cannot assess: {p.gate_reason}.") for e in errors), errors
        assert not [t for t in texts(at) if t.startswith("Final decision:") or "P(malignant) =" in t]
        assert not [c for e in at.image for c in e.captions if "Grad-CAM" in c]
    at.file_uploader(key="batch_upload").set_value([(p.name, p.read_bytes(), "image/png") for p in images])
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["status"]) == ["cannot assess"] * 2 and table["final_malignant"].isna().all()
    assert any("0 benign, 2 cannot assess, 0 not scored" in m.value for m in at.markdown)


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


def test_classifier_selector_switches_the_model(monkeypatch: pytest.MonkeyPatch, shipped: Path,
                                                tmp_path: Path) -> None:
    """Every shipped classifier by name, the best validation AUC preselected and marked; choosing the other one
    runs the other model (its P(malignant), its architecture, its calibrated threshold, its Grad-CAM)."""
    monkeypatch.delenv("MELANOMA_CLASSIFIER", raising=False)
    monkeypatch.delenv("MELANOMA_VAE", raising=False)
    monkeypatch.setenv("MELANOMA_CHECKPOINTS", str(shipped))
    monkeypatch.setenv("MELANOMA_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MELANOMA_SAMPLES", str(tmp_path / "samples"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    selector = at.selectbox(key="classifier")
    assert selector.options[:2] == ["lite0_tiny (default: best validation AUC)", "medvit_tiny"], selector.options
    assert Path(selector.value) == shipped / "lite0_tiny.safetensors"
    assert any("efficientnet_lite0" in c.value and "validation AUC 0.700" in c.value for c in at.sidebar.caption)
    image = random_png(tmp_path / "noise.png")
    upload(at, image)
    vae = shipped / "convvae.safetensors"
    for name, arch, threshold in (("lite0_tiny", "efficientnet_lite0", 0.3), ("medvit_tiny", "medvit", 0.5)):
        if name == "medvit_tiny":
            at.selectbox(key="classifier").set_value(str(shipped / f"{name}.safetensors")).run()
            assert not at.exception, at.exception
        p, _ = HybridPredictor(shipped / f"{name}.safetensors", vae).predict_image(load_rgb(image), image.name)
        assert f"P(malignant) = **{p.prob_malignant:.3f}**" in " ".join(texts(at)), name
        assert at.slider(key="malignant_threshold").value == pytest.approx(threshold)
        loaded = json.loads(at.json[0].value)["classifier"]
        assert (loaded["arch"], Path(loaded["path"]).name) == (arch, f"{name}.safetensors")
        captions = [c for e in at.image for c in e.captions]
        assert len(captions) == 4 and "Grad-CAM" in captions[3], captions


def test_classifier_env_override_comes_first(monkeypatch: pytest.MonkeyPatch, shipped: Path,
                                            tiny_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    monkeypatch.setenv("MELANOMA_CHECKPOINTS", str(shipped))
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(shipped / "medvit_tiny.safetensors"))
    monkeypatch.setenv("MELANOMA_VAE", str(tiny_checkpoints[1]))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    selector = at.selectbox(key="classifier")
    assert Path(selector.value) == shipped / "medvit_tiny.safetensors"
    assert selector.options[:2] == ["medvit_tiny", "lite0_tiny (default: best validation AUC)"], selector.options
    assert Path(at.selectbox(key="vae").value) == tiny_checkpoints[1]


def test_example_click_shows_verdict_and_ground_truth(app: AppTest, predictor: HybridPredictor,
                                                      tmp_path: Path) -> None:
    """The bundled samples (copied, plus a labels.csv row whose file is absent) as one-click examples named by
    their true diagnosis; a click gives the verdict and, beside it, the ground truth; an upload then replaces it."""
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples)
    labels = pd.read_csv(samples / "labels.csv", dtype=str)
    absent = labels.iloc[[0]].assign(file="images/absent.jpg")
    pd.concat([labels, absent]).to_csv(samples / "labels.csv", index=False)
    app.run()
    assert not app.exception, app.exception
    buttons = {b.key: b.label for b in app.button if b.key and b.key.startswith("example_")}
    assert len(buttons) == len(labels) == 8
    assert buttons["example_0"] == "Melanoma (malignant) · HAM10000 test · ISIC_0033871"  # labels.csv's first row
    assert any("Real HAM10000 test images (CC BY-NC-SA 4.0" in c.value for c in app.caption)
    assert any("images/absent.jpg" in w.value and "absent" in w.value for w in app.warning)

    for i in (0, 4):  # a malignant and a benign sample
        row = labels.iloc[i]
        app.button(key=f"example_{i}").click().run()
        assert not app.exception, app.exception
        path = samples / row["file"]
        flags = expected(predictor, path, predictor.malignant_threshold, predictor.anomaly_threshold)
        assert f"Final decision: **{decision(flags)}**" in verdict(app)
        truth = [i.value for i in app.info if i.value.startswith("**Ground truth**")]
        assert len(truth) == 1, texts(app)
        assert "bundled sample only" in truth[0] and f"**{row['label'].upper()}**" in truth[0]
        assert row["image_id"] in truth[0] and row["diagnosis"] in truth[0]
        right = decision(flags).lower() == row["label"]
        assert f"**{'right' if right else 'wrong'}** on this image" in truth[0]

    upload(app, random_png(tmp_path / "mine.png"))  # the latest action wins: the upload, with no ground truth
    verdict(app)
    assert not [i for i in app.info if i.value.startswith("**Ground truth**")]


def test_results_tab_reads_results_and_names_what_is_absent(app: AppTest, tmp_path: Path) -> None:
    assert any("hybrid is absent" in i.value for i in app.info)
    folder = tmp_path / "results" / "hybrid" / "densenet121"  # one subfolder per classifier
    folder.mkdir(parents=True)
    pd.DataFrame({"model": ["classifier", "hybrid"], "sensitivity": [0.61, 0.74]}).to_csv(
        folder / "comparison_metrics.csv", index=False)
    app.run()
    assert not app.exception, app.exception
    assert any(list(d.value.get("sensitivity", [])) == [0.61, 0.74] for d in app.dataframe)
    infos = [i.value for i in app.info]
    assert any("models_evaluation is absent" in i for i in infos) and not any("hybrid is absent" in i for i in infos)
    assert not any("no comparison_metrics.csv" in i for i in infos), infos


def test_missing_checkpoint_gives_a_message(monkeypatch: pytest.MonkeyPatch, tiny_checkpoints: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(tiny_checkpoints[0]))
    monkeypatch.setenv("MELANOMA_VAE", str(tmp_path / "missing.safetensors"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert any("missing.safetensors" in e and "not found" in e for e in errors), errors
    assert any("Limits" == h.value for h in at.subheader)
