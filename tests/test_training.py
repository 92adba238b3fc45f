"""classifiers/train.py on a small real subset: a run killed mid-epoch and resumed ends exactly where an
uninterrupted run with the same seed ends; the checkpoint it writes honours the contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from data.paths import MANIFESTS, ROOT


# tests that train take the `original` fixture: skipped without the data
def train(out: Path, manifest: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "classifiers" / "train.py"),
        "--arch",
        "medvit",
        "--manifest",
        str(manifest),
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--limit",
        "32",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_killed_and_resumed_run_matches_uninterrupted_run(original, tmp_path):
    manifest = MANIFESTS / "original.csv"
    full = train(tmp_path / "full", manifest)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = train(tmp_path / "resumed", manifest, "--kill-after-steps", "6")  # 4 steps an epoch: dies in epoch 2
    assert killed.returncode == 137
    assert len(pd.read_csv(tmp_path / "resumed" / "metrics.csv")) == 1  # only the finished epoch was recorded
    resumed = train(tmp_path / "resumed", manifest, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = pd.read_csv(tmp_path / "full" / "metrics.csv")
    b = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    pd.testing.assert_frame_equal(
        a[["epoch", "train_loss", "val_auc", "lr"]], b[["epoch", "train_loss", "val_auc", "lr"]]
    )
    wa, wb = (
        load_file(str(tmp_path / "full" / "best.safetensors")),
        load_file(str(tmp_path / "resumed" / "best.safetensors")),
    )
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_best_checkpoint_sidecar_follows_the_contract(original, tmp_path):
    import json

    from classifiers.models import load_classifier

    assert train(tmp_path / "run", MANIFESTS / "original.csv", "--epochs", "1").returncode == 0
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    assert meta["kind"] == "classifier" and meta["threshold_split"] == "val" and meta["input_size"] == 32
    assert 0 <= meta["malignant_threshold"] <= 1 and len(meta["manifest_sha256"]) == 64
    assert meta["normalization"]["mean"] and meta["versions"]["torch"]
    model, _ = load_classifier(tmp_path / "run" / "best.safetensors")
    assert not model.training


def test_missing_manifest_is_a_clear_error(tmp_path):
    result = train(tmp_path / "run", tmp_path / "nope.csv")
    assert result.returncode != 0 and "manifest not found" in result.stderr


def test_k_fold_cross_validation_trains_every_fold_and_summarises(original, tmp_path):
    result = train(tmp_path / "cv", MANIFESTS / "original.csv", "--epochs", "1", "--folds", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = pd.read_csv(tmp_path / "cv" / "cv_summary.csv")
    per_fold = summary[summary["fold"].isin(["0", "1", "2"])]
    assert len(per_fold) == 3 and all((tmp_path / "cv" / f"fold{k}" / "best.safetensors").is_file() for k in range(3))
    stats = summary.set_index("fold")["val_auc"]
    assert stats["mean"] == pytest.approx(per_fold["val_auc"].mean())
    assert stats["std"] == pytest.approx(per_fold["val_auc"].std(ddof=1))
    assert "3-fold CV val AUC" in result.stdout


def test_bad_fold_arguments_are_clear_errors(tmp_path):
    manifest = MANIFESTS / "original.csv"
    for args, says in (["--fold", "1"], "--fold needs --folds"), (["--folds", "3", "--fold", "3"], "at least 2 folds"):
        result = train(tmp_path / "run", manifest, *args)
        assert result.returncode == 2 and says in result.stderr and not (tmp_path / "run").exists()
