"""studies/compare.py: paired AUC differences between evaluated models on the same images, and bad inputs."""
from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest

compare = importlib.import_module("studies.compare")


def evaluated(folder, probs: np.ndarray, y: np.ndarray) -> None:
    """A minimal classifiers/evaluate.py output: predictions.csv and metrics.csv for HAM10000 test and ISIC val."""
    from evaluation.metrics import baseline_row, metrics_row

    folder.mkdir(parents=True)
    n = len(y)
    half = n // 2
    dataset = np.where(np.arange(n) < half, "ham10000", "isic2017")
    split = np.where(np.arange(n) < half, "test", "external")
    pd.DataFrame({"path": [f"img{i}.jpg" for i in range(n)], "label": np.where(y == 1, "malignant", "benign"),
                  "prob_malignant": probs, "pred": (probs >= 0.5).astype(int), "split": split,
                  "dataset": dataset}).to_csv(folder / "predictions.csv", index=False)
    rows = []
    for ds, sp, msp in (("ham10000", "test", "test"), ("isic2017", "external", "external-val")):
        idx = (dataset == ds) & (split == sp)
        common = {"config": "c", "dataset": ds, "split": msp}
        rows += [metrics_row(y[idx], probs[idx], 0.5, model="m", threshold_split="val", threshold_rule="youden",
                             **common), baseline_row(y[idx], **common)]
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)


def test_paired_difference_against_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good, weak = y + rng.normal(0, 0.5, 400), y + rng.normal(0, 2.0, 400)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    evaluated(tmp_path / "good", sigmoid(good), y)
    evaluated(tmp_path / "weak", sigmoid(weak), y)
    table = compare.compare({"good": tmp_path / "good", "weak": tmp_path / "weak"}, "good", {}, n_boot=200)
    weak_rows = table[table["model"] == "weak"]
    assert len(weak_rows) == 2 and (weak_rows["auc_minus_reference"] < 0).all()
    assert (weak_rows["diff_ci_high"] < 0).all() and set(weak_rows["reference"]) == {"good"}
    assert table[table["model"] == "good"]["auc_minus_reference"].isna().all()
    baseline = table[table["model"] == "all-malignant baseline"]
    assert list(baseline["auc"]) == [0.5, 0.5] and list(baseline["n"]) == [200, 200]


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        compare.main(["--run", "nameless", "--reference", "x", "--out", str(tmp_path)])
    assert info.value.code == 2 and "expected NAME=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        compare.main(["--run", f"a={tmp_path / 'nope'}", "--reference", "a", "--out", str(tmp_path)])
    assert info.value.code == 2 and "not found:" in capsys.readouterr().err


def test_training_cost_sums_the_stages_of_a_model_and_keeps_the_last_stages_best_val(tmp_path):
    (tmp_path / "run").mkdir()
    pd.DataFrame({"epoch_seconds": [60.0, 120.0], "images_per_s": [5.0, 7.0], "val_auc": [0.8, 0.7]}).to_csv(
        tmp_path / "run" / "metrics.csv")
    pd.DataFrame({"epoch_seconds": [240.0], "images_per_s": [9.0], "val_auc": [0.9]}).to_csv(tmp_path / "stage1.csv")
    assert compare.training_cost(tmp_path / "run") == {"train_minutes": 3.0, "epochs_run": 2, "train_images_per_s": 6.0,
                                                       "val_auc": 0.8}
    assert compare.training_cost(f"{tmp_path / 'stage1.csv'},{tmp_path / 'run'}") == \
        {"train_minutes": 7.0, "epochs_run": 3, "train_images_per_s": 7.0, "val_auc": 0.8}


def test_a_set_the_evaluation_lacks_is_a_usage_error(tmp_path, capsys):
    y = np.tile([0, 1], 50)
    evaluated(tmp_path / "a", np.linspace(0.1, 0.9, 100), y)
    with pytest.raises(SystemExit):
        compare.main(["--run", f"a={tmp_path / 'a'}", "--reference", "a", "--sets", "ISIC 2017 train (unseen source)",
                      "--out", str(tmp_path / "out")])
    assert "no isic2017/external-train rows" in capsys.readouterr().err
    table = compare.main(["--run", f"a={tmp_path / 'a'}", "--reference", "a", "--sets", "HAM10000 test",
                          "--out", str(tmp_path / "out")])
    assert set(table["evaluation_set"]) == {"HAM10000 test"} and (tmp_path / "out" / "comparison.png").is_file()


def isic_only(folder, probs: np.ndarray, y: np.ndarray, official: np.ndarray, record_official: bool = True) -> None:
    """An evaluate.py output of a model trained without ISIC 2017: all of it `external`, two official splits."""
    from evaluation.metrics import baseline_row, metrics_row

    folder.mkdir(parents=True)
    preds = pd.DataFrame({"path": [f"i{i}.jpg" for i in range(len(y))],
                          "label": np.where(y == 1, "malignant", "benign"), "prob_malignant": probs,
                          "pred": (probs >= 0.5).astype(int), "split": "external",
                          "official_split": official, "dataset": "isic2017"})
    preds.drop(columns=[] if record_official else ["official_split"]).to_csv(folder / "predictions.csv", index=False)
    rows = []
    for name in ("train", "val"):
        idx = official == name
        common = {"config": "c", "dataset": "isic2017", "split": f"external-{name}"}
        rows += [metrics_row(y[idx], probs[idx], 0.5, model="m", threshold_split="val", threshold_rule="youden",
                             **common), baseline_row(y[idx], **common)]
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)


def test_isic_official_splits_are_paired_apart(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    official = np.where(np.arange(300) < 200, "train", "val")
    isic_only(tmp_path / "a", 1 / (1 + np.exp(-(y + rng.normal(0, 1, 300)))), y, official)
    isic_only(tmp_path / "b", 1 / (1 + np.exp(-(y + rng.normal(0, 1, 300)))), y, official)
    sets = ("ISIC 2017 train (unseen source)", "ISIC 2017 val (held out)")
    table = compare.compare({"a": tmp_path / "a", "b": tmp_path / "b"}, "a", {}, n_boot=100, sets=sets)
    b = table[table["model"] == "b"].set_index("evaluation_set")
    assert list(b.loc[list(sets), "paired_n"]) == [200, 100] and list(b.loc[list(sets), "n"]) == [200, 100]
    isic_only(tmp_path / "old", 1 / (1 + np.exp(-y)), y, official, record_official=False)
    with pytest.raises(ValueError, match="re-run classifiers/evaluate.py"):
        compare.compare({"a": tmp_path / "a", "old": tmp_path / "old"}, "a", {}, n_boot=100, sets=sets)
