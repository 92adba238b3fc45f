"""The one metrics module: agreement with scikit-learn, seeded bootstrap CIs, the defining property of every
threshold rule (on continuous and on heavily tied scores), `score >= threshold` semantics, the baseline, ECE and
the PNG figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from evaluation import plots
from evaluation.metrics import (
    auc,
    auc_ci,
    baseline_row,
    choose_threshold,
    confusion,
    decision_metrics,
    expected_calibration_error,
    metrics_row,
)


def random_data(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y)))
    return y, (score.round(1) if ties else score)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scikit_learn(seed: int):
    y, s = random_data(seed)
    pred = (s >= np.median(s)).astype(int)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert confusion(y, pred) == {"TP": tp, "TN": tn, "FP": fp, "FN": fn}
    m = decision_metrics(y, pred)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(precision_score(y, pred))
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_auc_of_one_class_is_nan():
    assert np.isnan(auc([0, 0, 0], [0.1, 0.5, 0.9]))


def test_bootstrap_ci_contains_the_point_and_is_seeded():
    y, s = random_data(0)
    point, lo, hi = auc_ci(y, s, n_boot=300, seed=3)
    assert lo < point < hi and hi - lo < 0.3
    assert auc_ci(y, s, n_boot=300, seed=3) == (point, lo, hi)
    assert auc_ci(y, s, n_boot=300, seed=4) != (point, lo, hi)


def test_choose_threshold_refuses_test_and_unknown_rules():
    y, s = random_data(0)
    with pytest.raises(ValueError, match="refusing to choose a threshold on the 'test' split"):
        choose_threshold(y, s, "youden", split="test")
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(y, s, "magic", split="val")


def rates(y: np.ndarray, s: np.ndarray, t: float) -> dict[str, float]:
    return decision_metrics(y, s >= t)


def candidates(s: np.ndarray) -> np.ndarray:
    """Every distinct decision `s >= t` can make: one threshold per distinct score, plus one above them all."""
    return np.append(np.unique(s), np.inf)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.8, 0.95])
@pytest.mark.parametrize("rule,metric", [("target_sensitivity", "sensitivity"), ("target_specificity", "specificity")])
def test_target_rules_pick_the_last_threshold_reaching_the_target(seed: int, ties: bool, target: float, rule: str,
                                                                  metric: str):
    """target_sensitivity: the highest threshold with sensitivity >= target, so the next higher one falls short;
    target_specificity: the lowest threshold with specificity >= target, so the next lower one falls short."""
    y, s = random_data(seed, ties=ties)
    t = choose_threshold(y, s, rule, "val", target)
    assert rates(y, s, t)[metric] >= target
    c = candidates(s)
    beyond = c[c > t][:1] if metric == "sensitivity" else c[c < t][-1:]
    assert len(beyond) == 1 and rates(y, s, beyond[0])[metric] < target


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rule,objective", [
    ("youden", lambda m: m["sensitivity"] + m["specificity"] - 1),
    ("max_f1", lambda m: 0.0 if np.isnan(m["f1"]) else m["f1"])], ids=["youden", "max_f1"])
def test_youden_and_max_f1_maximise_their_objective(seed: int, ties: bool, rule: str, objective):
    y, s = random_data(seed, ties=ties)
    t = choose_threshold(y, s, rule, "calib")
    best = max(objective(rates(y, s, c)) for c in candidates(s))
    assert objective(rates(y, s, t)) == pytest.approx(best)


def test_benign_percentile():
    y, s = random_data(1)
    t = choose_threshold(y, s, "benign_percentile", "calib", 0.9)
    assert np.mean(s[y == 0] <= t) == pytest.approx(0.9, abs=0.01)


def test_score_equal_to_threshold_is_malignant():
    y, s = np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.2, 0.1])
    row = metrics_row(y, s, 0.5, model="m", config="c", dataset="d", split="val", threshold_split="val",
                      n_boot=20)
    assert (row["TP"], row["FP"], row["FN"], row["TN"]) == (1, 1, 1, 1)


def test_baseline_row_calls_everything_malignant():
    y, _ = random_data(0)
    row = baseline_row(y, config="c", dataset="d", split="test")
    assert row["sensitivity"] == 1 and row["specificity"] == 0 and row["auc"] == 0.5
    assert row["TP"] == y.sum() and row["FP"] == (y == 0).sum() and row["TN"] == row["FN"] == 0


def calibrated_bins() -> tuple[np.ndarray, np.ndarray]:
    """Probabilities 0.1, 0.5, 0.8 with exactly that fraction of positives in each."""
    prob = np.repeat([0.1, 0.5, 0.8], [10, 4, 5])
    y = np.concatenate([[1] + [0] * 9, [1, 1, 0, 0], [1, 1, 1, 1, 0]])
    return y, prob


def test_ece_is_zero_when_calibrated_and_positive_otherwise():
    y, prob = calibrated_bins()
    assert expected_calibration_error(y, prob) == pytest.approx(0, abs=1e-12)
    assert expected_calibration_error(y, np.clip(prob + 0.15, 0, 1)) == pytest.approx(0.15)
    assert expected_calibration_error(1 - y, prob) > 0.2


def test_plots_write_png_files(tmp_path: Path):
    y, s = random_data(0)
    pred = s >= 0.5
    written = [
        plots.confusion_matrices({"a": (y, pred), "b": (y, ~pred)}, tmp_path / "cm.png"),
        plots.roc_pr({"model": (y, s), "noise": (y, np.random.default_rng(0).random(len(y)))}, tmp_path / "roc.png"),
        plots.score_histogram(y, s, tmp_path / "sub" / "hist.png", threshold=0.5),
        plots.operating_points({"model": (y, s)}, {"hybrid": (0.8, 0.7)}, tmp_path / "op.png"),
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
