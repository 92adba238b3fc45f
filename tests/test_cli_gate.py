"""The out-of-distribution gate in the product (issue 22): inference.py's "cannot assess" path on generated non-lesion
images (exit 5, one line on stderr, the JSON's gate fields, the --folder CSV's status column and summary), a real
lesion that passes, --no-gate, the rule that a gated image never gets a verdict, and the exported backends behind
the torch gate. The models are the tiny test checkpoints; the gate is the shipped checkpoints/gate.* (the default)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_inference import run

from anomaly_detection.gate import GateResult
from anomaly_detection.hybrid import HybridPredictor
from data.images import load_rgb
from data.non_lesion import generated, write_folder
from data.paths import CHECKPOINTS

GATE = CHECKPOINTS / "gate.safetensors"
# The first images of the non-lesion evaluation set (results/rescue_sources), one of each generated kind: flat,
# gradient, noise, pattern, text, a scikit-image photograph, a photo crop and a tiny image.
NON_LESIONS = generated(8, seed=0)


@pytest.fixture
def models(tiny_checkpoints) -> list[str]:
    return ["--classifier", str(tiny_checkpoints[0]), "--vae", str(tiny_checkpoints[1])]


@pytest.fixture(scope="module")
def non_lesion_files(tmp_path_factory) -> list[Path]:
    return write_folder(NON_LESIONS, tmp_path_factory.mktemp("non_lesion"))


@pytest.mark.parametrize("index", range(len(NON_LESIONS)), ids=[item.kind for item in NON_LESIONS])
def test_image_mode_cannot_assess(capsys, models, non_lesion_files, tmp_path, index):
    path, out_json, overlay = non_lesion_files[index], tmp_path / "result.json", tmp_path / "cam.png"
    code, out, err = run(capsys, "--image", str(path), "--output", str(out_json), "--gradcam", str(overlay), *models)
    assert code == 5, err
    result = json.loads(out_json.read_text())
    assert (result["status"], result["decision"], result["gate_ok"], result["final_malignant"]) == (
        "cannot assess", "cannot assess", False, None)
    assert result["gate_reason"] and result["gate_threshold"] > 0 and result["gate_distance"] >= 0
    assert 0 <= result["prob_malignant"] <= 1 and result["vae_score"] >= 0  # computed, for research, but not used
    assert result["models"]["gate"] == {"path": str(GATE), "backend": "torch"}
    assert err.strip() == f"cannot assess: {path}: {result['gate_reason']} (no --gradcam overlay written)"
    assert "FINAL DECISION:   CANNOT ASSESS" in out and result["gate_reason"] in out and "P(malignant)" not in out
    assert not overlay.exists()


def test_no_gate_gives_a_verdict_again(capsys, models, non_lesion_files, tmp_path):
    out_json = tmp_path / "result.json"
    code, out, err = run(capsys, "--image", str(non_lesion_files[0]), "--output", str(out_json), "--no-gate", *models)
    result = json.loads(out_json.read_text())
    assert code == 0 and err == "" and "Lesion gate:      off (--no-gate)" in out
    assert result["gate_ok"] is None and result["status"] == "assessed"
    assert result["decision"] in ("benign", "malignant") and result["models"]["gate"] is None


@pytest.mark.real_data
def test_folder_mode_status_column(capsys, models, non_lesion_files, real_images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in [*non_lesion_files[:4], *real_images]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "corrupt.jpg").write_bytes(real_images[0].read_bytes()[:200])
    lesion = np.asarray(load_rgb(real_images[0]), dtype=float)  # a real lesion as a noisy sensor would deliver it
    noisy = np.clip(lesion + np.random.default_rng(0).normal(0, 12, lesion.shape), 0, 255).round().astype(np.uint8)
    Image.fromarray(noisy).save(folder / "noisy_lesion.png")
    csv = tmp_path / "out.csv"
    code, out, err = run(capsys, "--folder", str(folder), "--csv", str(csv), "--batch-size", "3", *models)
    assert code == 0, err
    table = pd.read_csv(csv, keep_default_na=False).assign(name=lambda t: t["path"].map(lambda p: Path(p).name))
    status = dict(zip(table["name"], table["status"]))
    assert status == {**{p.name: "cannot assess" for p in non_lesion_files[:4]}, "noisy_lesion.png": "cannot assess",
                      **{p.name: "assessed" for p in real_images}, "corrupt.jpg": "error"}
    gated = table[table["status"] == "cannot assess"]
    assert (gated["decision"] == "cannot assess").all() and (gated["gate_reason"] != "").all()
    assert (gated["final_malignant"] == "").all()
    lesions = table[table["status"] == "assessed"]
    assert lesions["decision"].isin(["benign", "malignant"]).all() and (lesions["gate_reason"] == "").all()
    assert "10 files: " in out and "5 cannot assess, 1 not scored" in out and out.count("  cannot assess: ") == 5
    reasons = dict(zip(table["name"], table["gate_reason"]))
    assert reasons["noisy_lesion.png"].startswith("image too noisy to assess (estimated noise")


@pytest.mark.real_data
def test_a_real_lesion_passes_the_gate(capsys, models, real_images, tmp_path):
    out_json = tmp_path / "result.json"
    code, out, err = run(capsys, "--image", str(real_images[3]), "--output", str(out_json), *models)
    result = json.loads(out_json.read_text())
    assert code == 0 and err == ""
    assert result["gate_ok"] is True and result["gate_reason"] == "" and result["status"] == "assessed"
    assert result["gate_distance"] < result["gate_threshold"]
    assert result["decision"] == ("malignant" if result["final_malignant"] else "benign")
    assert "Lesion gate:      passed" in out


def test_a_gated_image_never_gets_a_verdict(tiny_checkpoints):
    predictor = HybridPredictor(*tiny_checkpoints)
    refused = GateResult(False, "near-constant image", 400.0, 200.0, float("nan"), float("nan"))
    passed = GateResult(True, "", 50.0, 200.0, -9.0, -5.0)
    gated, ok, ungated, broken = predictor.decide(["a", "b", "c", "d"], [0.99, 0.99, 0.99, float("nan")],
                                                  [0.0, 0.0, 0.0, 0.0], [refused, passed, None, refused])
    assert gated.classifier_malignant and gated.final_malignant is None and gated.decision == "cannot assess"
    assert gated.gate_probe_score is None  # NaN never reaches the JSON
    assert (ok.decision, ok.status, ok.gate_ok) == ("malignant", "assessed", True)
    assert (ungated.decision, ungated.gate_ok) == ("malignant", None)
    assert (broken.status, broken.decision) == ("error", "error")  # an unusable output is an error first


@pytest.mark.real_data
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_backends_keep_the_torch_gate(tiny_checkpoints, non_lesion_files, real_images, tmp_path,
                                               monkeypatch, backend):
    import anomaly_detection.serving as serving

    monkeypatch.setattr(serving, "DEFAULT_CACHE_DIR", tmp_path)
    files = [non_lesion_files[0], non_lesion_files[3], *real_images[:2]]
    reference = HybridPredictor(*tiny_checkpoints, gate=GATE).predict_paths(files)
    exported = HybridPredictor(*tiny_checkpoints, backend=backend, gate=GATE).predict_paths(files)
    assert [p.status for p in exported] == [p.status for p in reference] == ["cannot assess"] * 2 + ["assessed"] * 2
    assert [p.decision for p in exported] == [p.decision for p in reference]
    assert np.allclose([p.gate_distance for p in exported], [p.gate_distance for p in reference])

