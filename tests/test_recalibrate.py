"""Recalibrating a classifier's threshold on a clinic's labelled folder: a new checkpoint, the same weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from classifiers import recalibrate
from classifiers.models import load_classifier
from classifiers.predict import predict_proba
from data.cache import CachedImages
from data.checkpoint import file_digest, read_sidecar
from data.manifest import label_index, read_folder
from data.transforms import Preprocess
from evaluation.metrics import choose_threshold


@pytest.fixture(scope="module")
def clinic(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 benign and 12 malignant ISIC 2017 val images as a clinic's <benign|malignant>/ folder (symlinks)."""
    root = tmp_path_factory.mktemp("clinic")
    for label in ("benign", "malignant"):
        (root / label).mkdir()
        for image in sorted((real_data / "isic2017" / "val" / label).glob("*.jpg"))[:12]:
            (root / label / image.name).symlink_to(image)
    return root


@pytest.mark.real_data
def test_recalibrated_checkpoint_has_the_clinic_threshold_and_the_same_weights(tiny_checkpoints, clinic, tmp_path):
    classifier = tiny_checkpoints[0]
    out = tmp_path / "clinic" / "classifier"
    report = recalibrate.main(["--checkpoint", str(classifier), "--folder", str(clinic), "--out", str(out),
                               "--device", "cpu", "--threads", "1"])
    weights = out.with_suffix(".safetensors")
    assert file_digest(weights) == file_digest(classifier)  # a byte copy
    model, meta = load_classifier(weights)
    df = read_folder(clinic, split="test")
    data = CachedImages(df, meta["input_size"], meta["resize"])
    prob = predict_proba(model, data.images, Preprocess.from_meta(meta), torch.device("cpu"))[:, 1]
    expected = choose_threshold(label_index(data.df["label"]).to_numpy(), prob, "youden", "clinic")
    assert meta["malignant_threshold"] == pytest.approx(expected)
    assert meta["threshold_split"] == "clinic" and meta["recalibrated"]["threshold_before"] == 0.5
    assert read_sidecar(classifier)["malignant_threshold"] == 0.5  # the original is untouched
    # strict JSON (NaN is not JSON): the AUC once at the top, none in the decision rows
    saved = json.loads(out.with_suffix(".recalibration.json").read_text(), parse_constant=pytest.fail)
    assert 0 <= saved["auc"] <= 1 and "auc" not in saved["before"]
    assert saved["before"]["threshold"] == 0.5 and (saved["benign"], saved["malignant"]) == (12, 12)
    assert 0 <= saved["after"]["sensitivity_ci_low"] <= saved["after"]["sensitivity"] <= 1
    assert report["after"]["threshold"] == pytest.approx(expected)


@pytest.mark.real_data
def test_recalibration_refuses_bad_requests(tiny_checkpoints, clinic, tmp_path):
    classifier = str(tiny_checkpoints[0])
    with pytest.raises(SystemExit, match="--out must differ"):
        recalibrate.main(["--checkpoint", classifier, "--folder", str(clinic),
                          "--out", str(Path(classifier).with_suffix("")), "--device", "cpu"])
    few = tmp_path / "few"
    for label in ("benign", "malignant"):
        (few / label).mkdir(parents=True)
        for image in sorted((clinic / label).iterdir())[:3]:
            (few / label / image.name).symlink_to(image.resolve())
    with pytest.raises(SystemExit, match="at least 10 of each"):
        recalibrate.main(["--checkpoint", classifier, "--folder", str(few), "--out", str(tmp_path / "x"),
                          "--device", "cpu"])
    with pytest.raises(SystemExit, match="folder not found"):
        recalibrate.main(["--checkpoint", classifier, "--folder", str(tmp_path / "nowhere"),
                          "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert not np.any([p.suffix == ".safetensors" for p in tmp_path.iterdir()])  # nothing half-written
