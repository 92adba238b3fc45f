"""Binary metrics, bootstrap confidence intervals, threshold rules and the all-malignant baseline.

Conventions used everywhere in the project:
- label 1 = malignant; `score >= threshold` means malignant (or anomalous, for VAE scores).
- A threshold rule is always told which split it is chosen on, and refuses `test`: thresholds, epochs and fusion
  parameters are chosen on `val`/`calib` and `test` is only reported.
- AUCs come with a seeded percentile bootstrap 95% CI (1000 resamples by default).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

THRESHOLD_RULES = ("youden", "target_sensitivity", "target_specificity", "max_f1", "benign_percentile")
FORBIDDEN_SPLITS = ("test",)


def _arrays(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(y_true).astype(int).ravel(), np.asarray(score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape}) and scores ({s.shape}) differ in length")
    return y, s


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [1e-6, 1 - 1e-6] so a saturated probability stays finite."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def auc(y_true, score) -> float:
    y, s = _arrays(y_true, score)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def _rank_aucs(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row of `scores` (B x N) against the labels `y` (B x N), as the Mann-Whitney U statistic with
    average ranks for ties: identical to roc_auc_score, vectorised over bootstrap resamples."""
    ranks = rankdata(scores, axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    return ((ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_indices(y_true, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """n_boot x N resample indices, stratified by class so every resample holds every class (drawn from the
    highest class index down, which for binary labels is malignant first, then benign)."""
    y = np.asarray(y_true).astype(int)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y == c) for c in np.unique(y)[::-1]]
    return np.concatenate([rng.choice(m, (n_boot, len(m))) for m in members], axis=1)


def bootstrap_aucs(y_true, score, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """AUC on each of n_boot stratified resamples; the same seed gives the same resamples for any score, which is
    what makes paired comparisons of models on the same images possible."""
    y, s = _arrays(y_true, score)
    idx = bootstrap_indices(y, n_boot, seed)
    return _rank_aucs(y[idx], s[idx])


def auc_ci(y_true, score, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """AUC and its percentile bootstrap (1 - alpha) CI."""
    y, s = _arrays(y_true, score)
    point = auc(y, s)
    if np.isnan(point):
        return point, float("nan"), float("nan")
    boots = bootstrap_aucs(y, s, n_boot, seed)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def paired_auc_difference(y_true, score_a, score_b, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same images, with a paired bootstrap 95% CI."""
    y, a = _arrays(y_true, score_a)
    _, b = _arrays(y_true, score_b)
    diffs = bootstrap_aucs(y, a, n_boot, seed) - bootstrap_aucs(y, b, n_boot, seed)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return auc(y, a) - auc(y, b), float(lo), float(hi)


def confusion(y_true, pred) -> dict[str, int]:
    y, p = np.asarray(y_true).astype(int), np.asarray(pred).astype(int)
    return {"TP": int(((p == 1) & (y == 1)).sum()), "TN": int(((p == 0) & (y == 0)).sum()),
            "FP": int(((p == 1) & (y == 0)).sum()), "FN": int(((p == 0) & (y == 1)).sum())}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def decision_metrics(y_true, pred) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, F1, accuracy, balanced accuracy and the confusion counts."""
    c = confusion(y_true, pred)
    tp, tn, fp, fn = c["TP"], c["TN"], c["FP"], c["FN"]
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    ppv = _ratio(tp, tp + fp)
    return {"sensitivity": sens, "specificity": spec, "ppv": ppv, "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
            "balanced_accuracy": (sens + spec) / 2, **c}


def balanced_accuracy(y_true, pred) -> float:
    """Mean recall over the classes present in y_true (any number of classes)."""
    y, p = np.asarray(y_true).astype(int), np.asarray(pred).astype(int)
    return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))


def expected_calibration_error(y_true, prob, n_bins: int = 15) -> float:
    """ECE of P(malignant) with equal-width bins."""
    y, p = _arrays(y_true, prob)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def choose_threshold(y_true, score, rule: str, split: str, target: float | None = None) -> float:
    """Pick a decision threshold on `split` (never `test`) with one of THRESHOLD_RULES.

    youden: max sensitivity + specificity - 1; target_sensitivity: the highest threshold whose sensitivity is at
    least `target`; target_specificity: the lowest threshold whose specificity is at least `target`; max_f1;
    benign_percentile: the `target` quantile (e.g. 0.95) of the benign scores.
    """
    if split in FORBIDDEN_SPLITS:
        raise ValueError(f"refusing to choose a threshold on the {split!r} split: use val or calib")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {THRESHOLD_RULES}")
    y, s = _arrays(y_true, score)
    if rule == "benign_percentile":
        return float(np.quantile(s[y == 0], 0.95 if target is None else target))
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    thresholds = np.minimum(thresholds, np.nextafter(s.max(), np.inf))  # sklearn's first threshold is +inf
    if rule == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])
    if rule == "target_sensitivity":
        return float(thresholds[np.argmax(tpr >= (0.9 if target is None else target))])
    if rule == "target_specificity":
        ok = np.flatnonzero(1 - fpr >= (0.9 if target is None else target))
        return float(thresholds[ok[-1]])
    precision_tp = tpr * y.sum()
    f1 = 2 * precision_tp / (precision_tp + fpr * (len(y) - y.sum()) + y.sum())
    return float(thresholds[np.nanargmax(f1)])


def threshold_for_specificity(y_true, score, specificity: float) -> float:
    """Lowest threshold whose specificity on these scores is at least `specificity` (used to build the
    equal-specificity competitor of a rescue rule on the split being reported)."""
    y, s = _arrays(y_true, score)
    candidates = np.unique(s)
    spec = np.array([((s[y == 0] < t).mean()) for t in candidates])
    ok = np.flatnonzero(spec >= specificity - 1e-12)
    return float(candidates[ok[0]]) if len(ok) else float(np.nextafter(s.max(), np.inf))


def metrics_row(y_true, score, threshold: float, *, model: str, config: str, dataset: str, split: str,
                threshold_split: str, threshold_rule: str = "", n_boot: int = 1000, seed: int = 0,
                prob=None) -> dict[str, Any]:
    """One row of a metrics CSV (see DESIGN.md): AUC with CI, decision metrics at `threshold`, provenance."""
    y, s = _arrays(y_true, score)
    a, lo, hi = auc_ci(y, s, n_boot, seed)
    row = {"model": model, "config": config, "dataset": dataset, "split": split, "n": len(y),
           "n_malignant": int(y.sum()), "auc": a, "auc_ci_low": lo, "auc_ci_high": hi,
           **decision_metrics(y, s >= threshold), "threshold": threshold, "threshold_rule": threshold_rule,
           "threshold_split": threshold_split}
    row["ece"] = expected_calibration_error(y, prob) if prob is not None else float("nan")
    return row


def baseline_row(y_true, *, config: str, dataset: str, split: str) -> dict[str, Any]:
    """The trivial all-malignant classifier: sensitivity 1, specificity 0, AUC 0.5. Shown beside every model."""
    y = np.asarray(y_true).astype(int)
    row = {"model": "all_malignant_baseline", "config": config, "dataset": dataset, "split": split, "n": len(y),
           "n_malignant": int(y.sum()), "auc": 0.5, "auc_ci_low": 0.5, "auc_ci_high": 0.5,
           **decision_metrics(y, np.ones_like(y)), "threshold": float("nan"), "threshold_rule": "constant",
           "threshold_split": "none", "ece": float("nan")}
    return row


def multiclass_bootstrap(y_true, probs, n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Multi-class metrics of argmax decisions and one-vs-rest AUCs: the point estimates (key -> array of shape
    (K,) or scalar) and, under `boot_<key>`, their values on n_boot class-stratified resamples (shape (B, K) or (B,)).
    The same seed gives the same resamples for any model, so two models' arrays can be subtracted (paired)."""
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=float)
    k = p.shape[1]
    if p.shape[0] != len(y):
        raise ValueError(f"labels ({len(y)}) and probabilities ({p.shape[0]}) differ in length")
    missing = sorted(set(range(k)) - set(y))
    if missing:
        raise ValueError(f"classes {missing} have no images: per-class metrics and macro AUC need every class")
    pred = p.argmax(1)

    def scores(idx: np.ndarray) -> dict[str, np.ndarray]:
        yy, pp = y[idx], pred[idx]  # B x N
        counts = np.stack([np.bincount(a * k + b, minlength=k * k).reshape(k, k) for a, b in zip(yy, pp)])
        tp = counts[:, np.arange(k), np.arange(k)].astype(float)
        recall, precision = tp / counts.sum(2), tp / np.maximum(counts.sum(1), 1)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / np.maximum(recall + precision, 1e-12), 0.0)
        aucs = np.stack([_rank_aucs((yy == c).astype(int), p[idx, c]) for c in range(k)], axis=1)
        return {"recall": recall, "precision": precision, "f1": f1, "auc": aucs,
                "balanced_accuracy": recall.mean(1), "macro_auc": aucs.mean(1), "accuracy": (yy == pp).mean(1)}

    point = {key: v[0] for key, v in scores(np.arange(len(y))[None]).items()}
    boots = scores(bootstrap_indices(y, n_boot, seed))
    return {**point, **{f"boot_{key}": v for key, v in boots.items()}}


def ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of bootstrap values (along the first axis)."""
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2], axis=0)
    return lo, hi


def proportion_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion: unlike a bootstrap, not zero-width at 0 or n successes."""
    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=1 - alpha, method="exact")
    return float(interval.low), float(interval.high)


def proportion_with_ci(k: int, n: int) -> tuple[float, float, float]:
    """k / n and its exact 95% CI (NaN for n = 0)."""
    return (k / n, *proportion_ci(k, n)) if n else (float("nan"),) * 3


def decision_row(y: np.ndarray, pred: np.ndarray, score: np.ndarray | None = None) -> dict[str, float]:
    """Decision metrics with exact CIs on sensitivity and specificity, and the AUC with its bootstrap CI."""
    m = decision_metrics(y, pred)
    sens = proportion_with_ci(m["TP"], m["TP"] + m["FN"])
    spec = proportion_with_ci(m["TN"], m["TN"] + m["FP"])
    auc = auc_ci(y, score) if score is not None else (float("nan"),) * 3
    return {"n": len(y), "n_malignant": int(np.sum(y)), "auc": auc[0], "auc_ci_low": auc[1], "auc_ci_high": auc[2],
            "sensitivity": sens[0], "sensitivity_ci_low": sens[1], "sensitivity_ci_high": sens[2],
            "specificity": spec[0], "specificity_ci_low": spec[1], "specificity_ci_high": spec[2],
            **{k: m[k] for k in ("ppv", "npv", "f1", "balanced_accuracy", "TP", "TN", "FP", "FN")}}
