"""Evaluation figures (PNG): confusion matrices, ROC and PR curves, score histograms, operating points, AUC
heatmap colours, training curves."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from sklearn.metrics import auc as area
from sklearn.metrics import precision_recall_curve, roc_curve

from evaluation.metrics import confusion


def auc_image(ax, values: np.ndarray):
    """AUCs as colours on a scale centred on chance (0.5, white): above it blue, below it red, so a model that ranks
    the classes the wrong way round stands out instead of looking like chance."""
    return ax.imshow(values, cmap="RdBu", norm=TwoSlopeNorm(vmin=0.0, vcenter=0.5, vmax=1.0), aspect="auto")


def auc_text_colour(auc: float) -> str:
    """Readable text on auc_image's colour for this AUC."""
    return "white" if abs(auc - 0.5) > 0.35 else "black"


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write the figure atomically (a killed run never leaves a half-written PNG) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")  # long labels or an outside legend are never cut off
    plt.close(fig)
    os.replace(tmp, path)
    return path


def training_curves(rows: list[dict], path: str | os.PathLike, x: str = "epoch", title: str = "") -> Path:
    """Loss columns (names containing 'loss') against `x` on the left, AUC columns ('auc') on the right when there
    are any, one line per `run` when the rows have that column: what every training entry point writes beside its
    CSV log, at each epoch and on resume."""
    keys = list(rows[0]) if rows else []
    panels = [[k for k in keys if "loss" in k], [k for k in keys if "auc" in k]]
    panels = [cols for cols in panels if cols]
    runs = list(dict.fromkeys(r.get("run") for r in rows))  # several runs' logs in one table (a model soup's)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, cols, label in zip(axes[0], panels, ("loss", "AUC")):
        for col, run in ((c, r) for c in cols for r in runs):
            part = [r for r in rows if r.get("run") == run]
            ax.plot([r[x] for r in part], [r[col] for r in part], marker="o" if len(part) < 40 else None,
                    label=col if run is None else f"{col} ({run})")
        ax.set(xlabel=x, ylabel=label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def _draw_confusion(ax, y_true, pred, title: str) -> None:
    c = confusion(y_true, pred)
    m = np.array([[c["TN"], c["FP"]], [c["FN"], c["TP"]]])
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v}", ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=12)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "malignant"], yticklabels=["benign", "malignant"],
           xlabel="predicted", ylabel="true", title=title)


def confusion_matrices(panels: dict[str, tuple], path: str | os.PathLike) -> Path:
    """panels: title -> (y_true, pred). One subplot per panel."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, (y, pred)) in zip(axes[0], panels.items()):
        _draw_confusion(ax, y, pred, title)
    return save_figure(fig, path)


def roc_pr(curves: dict[str, tuple], path: str | os.PathLike, title: str = "") -> Path:
    """curves: name -> (y_true, score). ROC and precision-recall side by side, the chance line for reference."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
    prevalence = None
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        roc_ax.plot(fpr, tpr, label=f"{name} (AUC {area(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(y, s)
        pr_ax.plot(recall, precision, label=name)
        prevalence = float(np.mean(y))
    roc_ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC {title}")
    if prevalence is not None:
        pr_ax.axhline(prevalence, color="k", ls="--", lw=0.8, label=f"all-malignant ({prevalence:.2f})")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"Precision-recall {title}")
    roc_ax.legend(fontsize=8, loc="lower right")
    pr_ax.legend(fontsize=8)
    return save_figure(fig, path)


def score_histogram(y_true, score, path: str | os.PathLike, threshold: float | None = None,
                    xlabel: str = "P(malignant)", title: str = "") -> Path:
    y, s = np.asarray(y_true).astype(int), np.asarray(score, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(s.min(), s.max(), 40)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, density=True, label=f"benign (n={int((y == 0).sum())})")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, density=True, label=f"malignant (n={int(y.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend()
    return save_figure(fig, path)


def operating_points(curves: dict[str, tuple], points: dict[str, tuple[float, float]], path: str | os.PathLike,
                     title: str = "") -> Path:
    """Sensitivity against specificity: a curve per score (name -> (y, score)) and marked operating points
    (name -> (specificity, sensitivity))."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(1 - fpr, tpr, label=name)
    markers = iter("o^sDvP*X")
    for name, (spec, sens) in points.items():
        ax.plot(spec, sens, next(markers, "o"), ms=9, label=f"{name} ({sens:.2f} sens, {spec:.2f} spec)")
    ax.set(xlabel="specificity", ylabel="sensitivity", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def multiclass_confusion(panels: dict[str, tuple], class_names, path: str | os.PathLike) -> Path:
    """panels: title -> (y_true, pred) class indices. Rows normalised to recall (colour), counts written in."""
    k = len(class_names)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (title, (y, pred)) in zip(axes[0], panels.items()):
        m = np.bincount(np.asarray(y) * k + np.asarray(pred), minlength=k * k).reshape(k, k)
        ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.5 * max(1, m[i].sum()) else "black")
        ax.set(xticks=range(k), yticks=range(k), xticklabels=class_names, yticklabels=class_names,
               xlabel="predicted", ylabel="true", title=title)
        ax.tick_params(axis="x", labelrotation=45)
    return save_figure(fig, path)


def grouped_bars(table, group: str, series: str, value: str, path: str | os.PathLike, title: str = "") -> Path:
    """One bar per (group, series) row of `table`, with error bars from `<value>_ci_low`/`<value>_ci_high`."""
    groups, names = list(dict.fromkeys(table[group])), list(dict.fromkeys(table[series]))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 2, 4))
    for n, name in enumerate(names):
        part = table[table[series] == name].set_index(group).reindex(groups)  # a missing pair: no bar
        x = np.arange(len(groups)) + (n - (len(names) - 1) / 2) * width
        mid, low, high = (part[c].to_numpy(float) for c in (value, f"{value}_ci_low", f"{value}_ci_high"))
        ax.bar(x, mid, width, yerr=[mid - low, high - mid], capsize=2, label=name)
    ax.set(xticks=range(len(groups)), xticklabels=groups, ylabel=value, title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
