"""Cross-dataset matrix and technique ablation, from the evaluated runs of scripts/09_generalisation.py.

A model that only works on the clinic it was trained on is of little use, so every number here is per image
source. The matrix trains on A and tests on B for A, B in {HAM10000, ISIC 2017, both}; `both` as a test set pools
HAM10000 test and ISIC 2017 val. The ablation switches one technique off per row and compares each run with the
reference on the same images (paired bootstrap, so the CI of the difference is much tighter than the two CIs side
by side). Test-time augmentation is the one technique switched on at evaluation only: its row re-scores the
reference with flip TTA. The ensemble table sets the mean of every run trained on both sources, and flip TTA, against
the best single run chosen by val AUC. Nothing here is chosen on test: checkpoints and thresholds were fixed on val.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from classifiers.models import load_classifier
from classifiers.predict import predict_proba
from classifiers.train import source_aucs
from data.atomic import write_rows
from data.cache import CachedImages
from data.transforms import Preprocess
from evaluation.metrics import auc_ci, decision_metrics, paired_auc_difference
from evaluation.plots import auc_image, auc_text_colour, save_figure
from studies import grid

EVAL_NAMES = {"ham10000_test": "HAM10000 test", "isic2017_val": "ISIC 2017 val"}
TTA_ROW = "+ flip TTA (reference re-scored)"


class ReportError(RuntimeError):
    """Runs missing or unfinished for the requested report; the message names them."""


def finished(runs: Path, name: str) -> bool:
    return grid.is_done(runs / name)


def predictions(runs: Path, name: str, evaluation: str = "evaluation") -> dict[str, pd.DataFrame]:
    """Per evaluation set (and `both`, pooled), the run's predictions, in one fixed image order."""
    path = runs / name / evaluation / "predictions.csv"
    df = pd.read_csv(path)
    sets = {}
    for prefix, s in grid.EVAL_SETS.items():
        part = df[(df["dataset"] == s["dataset"]) & (df["split"] == s["split"])].sort_values("path")
        sets[prefix] = part.assign(y=(part["label"] == "malignant").astype(int)).reset_index(drop=True)
    sets["both"] = pd.concat(list(sets.values()), ignore_index=True)
    return sets


def auc_cell(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    point, lo, hi = auc_ci(y, score)
    return {"auc": point, "ci_low": lo, "ci_high": hi}


def against(part: pd.DataFrame, base: pd.DataFrame, prefix: str) -> dict[str, float]:
    """AUC (CI) of `part` and AUC(part) - AUC(base) with a paired 95% CI; the two must hold the same images."""
    if not part["path"].equals(base["path"]):
        raise ReportError(f"{prefix}: the compared predictions are on different images; re-run their evaluation")
    diff, lo, hi = paired_auc_difference(part["y"], part["prob_malignant"], base["prob_malignant"])
    return {**{f"{prefix}_{k}": v for k, v in auc_cell(part["y"], part["prob_malignant"]).items()},
            f"{prefix}_change": diff, f"{prefix}_change_ci_low": lo, f"{prefix}_change_ci_high": hi}


def set_metrics(prefix: str, y: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """AUC (CI) and sensitivity/specificity of the decisions `pred`, keyed by evaluation set."""
    decisions = decision_metrics(y, pred)
    return {**{f"{prefix}_{k}": v for k, v in auc_cell(y, prob).items()},
            **{f"{prefix}_{k}": decisions[k] for k in ("sensitivity", "specificity")}}


def matrix(runs: Path, sources: dict[str, str]) -> pd.DataFrame:
    rows = []
    for train_on, name in sources.items():
        if not finished(runs, name):
            raise ReportError(f"matrix run {name} (trained on {train_on}) is not finished in {runs}")
        for eval_on, part in predictions(runs, name).items():
            rows.append({"train_on": train_on, "run": name, "eval_on": eval_on, "n": len(part),
                         "n_malignant": int(part["y"].sum()), **auc_cell(part["y"], part["prob_malignant"])})
    return pd.DataFrame(rows)


def matrix_heatmap(table: pd.DataFrame, path: Path) -> Path:
    train_on, eval_on = list(dict.fromkeys(table["train_on"])), list(dict.fromkeys(table["eval_on"]))
    grid_auc = table.pivot(index="train_on", columns="eval_on", values="auc").loc[train_on, eval_on]
    fig, ax = plt.subplots(figsize=(1.9 * len(eval_on) + 1.8, 1.1 * len(train_on) + 1.2))
    im = auc_image(ax, grid_auc.to_numpy())
    for r in table.itertuples():
        i, j = train_on.index(r.train_on), eval_on.index(r.eval_on)
        ax.text(j, i, f"{r.auc:.3f}\n[{r.ci_low:.3f}, {r.ci_high:.3f}]", ha="center", va="center",
                color=auc_text_colour(r.auc), fontsize=9)
    ax.set_xticks(range(len(eval_on)), [EVAL_NAMES.get(e, "pooled (both)") for e in eval_on])
    ax.set_yticks(range(len(train_on)), train_on)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained on")
    ax.set_title("DenseNet-121 AUC (95% CI), same budget per row")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def ablation(runs: Path, variants: dict[str, str], reference: str, tta_evaluation: str | None) -> pd.DataFrame:
    """One row per variant: AUC per evaluation set and AUC(variant) - AUC(reference) with a paired 95% CI."""
    if not finished(runs, reference):
        raise ReportError(f"ablation reference {reference} is not finished in {runs}")
    ref = predictions(runs, reference)
    compared = {"reference (every technique on)": ref}
    compared |= {label: predictions(runs, name) for label, name in variants.items() if finished(runs, name)}
    if tta_evaluation:
        compared[TTA_ROW] = predictions(runs, reference, tta_evaluation)
    rows = []
    for label, sets in compared.items():
        row: dict = {"variant": label, "run": variants.get(label, reference)}
        for prefix in EVAL_NAMES:
            row |= against(sets[prefix], ref[prefix], prefix)
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_plot(table: pd.DataFrame, path: Path) -> Path:
    rows = table.iloc[1:]
    fig, axes = plt.subplots(1, len(EVAL_NAMES), figsize=(14, 0.5 * len(rows) + 1.8), sharey=True)
    for ax, (prefix, title) in zip(axes, EVAL_NAMES.items()):
        y = np.arange(len(rows))[::-1]
        change = rows[f"{prefix}_change"].to_numpy()
        err = np.stack([change - rows[f"{prefix}_change_ci_low"], rows[f"{prefix}_change_ci_high"] - change])
        ax.errorbar(change, y, xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_title(title)
        ax.set_xlabel("AUC(variant) - AUC(reference)")
    axes[0].set_yticks(np.arange(len(rows))[::-1], rows["variant"])
    fig.suptitle("Ablation: AUC change against the reference (all techniques on), paired bootstrap 95% CI")
    fig.tight_layout()
    return save_figure(fig, path)


def ensemble(runs: Path, names: list[str], tta_evaluation: str | None) -> pd.DataFrame:
    """The mean P(malignant) of `names` (finished runs), and flip TTA of the best single run, against the best
    single run chosen by its val AUC (never by test), with paired bootstrap CIs of each difference."""
    done = [n for n in names if finished(runs, n)]
    if len(done) < 2:
        raise ReportError(f"an ensemble needs two finished runs; have {done}")
    val = {n: pd.read_json(runs / n / "best.json", typ="series")["metrics"]["val"]["auc"] for n in done}
    best = max(val, key=val.get)
    preds = {n: predictions(runs, n) for n in done}
    for n in done:  # the mean below needs every run's predictions in the same image order
        for k in preds[best]:
            against(preds[n][k], preds[best][k], k)
    candidates = {f"best single by val AUC ({best})": preds[best],
                  f"mean of {len(done)} runs": {k: preds[best][k].assign(prob_malignant=np.mean(
                      [preds[n][k]["prob_malignant"].to_numpy() for n in done], axis=0)) for k in preds[best]}}
    if tta_evaluation and (runs / best / tta_evaluation).is_dir():
        candidates["best single + flip TTA"] = predictions(runs, best, tta_evaluation)
    rows = []
    for label, sets in candidates.items():
        row: dict = {"model": label, "members": ", ".join(done) if label.startswith("mean") else best}
        for prefix in EVAL_NAMES:
            row |= against(sets[prefix], preds[best][prefix], prefix)
        rows.append(row)
    return pd.DataFrame(rows)


def checkpoint_row(label: str, checkpoint: Path, val: pd.DataFrame, eval_sets: pd.DataFrame, device) -> dict:
    """A runs.csv row for a checkpoint trained elsewhere (e.g. the model shipped before): its val AUC per source on
    this val split, and AUC (CI), sensitivity and specificity at its own threshold on each evaluation set."""
    model, meta = load_classifier(checkpoint)
    model, prep = model.float().to(device), Preprocess.from_meta(meta)

    def scored(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        data = CachedImages(df, meta["input_size"], meta["resize"])
        return data.df.assign(y=data.targets.numpy()), predict_proba(model, data.images, prep, device)[:, 1]

    val_df, val_prob = scored(val)
    per_source = source_aucs(val_df, val_df["y"].to_numpy(), val_prob)
    val_auc = float(np.mean(list(per_source.values()))) if per_source else auc_cell(val_df["y"], val_prob)["auc"]
    row = {"run": label, "best_epoch": meta.get("epoch"), "threshold": meta["malignant_threshold"],
           "val_auc": val_auc, **{f"val_auc_{k}": v for k, v in per_source.items()}}
    test_df, test_prob = scored(eval_sets)
    for prefix, s in grid.EVAL_SETS.items():
        idx = ((test_df["dataset"] == s["dataset"]) & (test_df["split"] == s["split"])).to_numpy()
        y, prob = test_df["y"].to_numpy()[idx], test_prob[idx]
        row |= set_metrics(prefix, y, prob, prob >= meta["malignant_threshold"])
    return row


def run_summary(runs: Path, names: list[str], tta_evaluation: str | None = None,
                extra_rows: list[dict] | None = None) -> pd.DataFrame:
    """Every finished run (and its flip-TTA scoring where one exists): best epoch, val AUCs, and per evaluation
    set AUC (CI) with sensitivity/specificity at the val-chosen threshold; then the all-malignant baseline."""
    rows = []
    scored = [(n, "evaluation") for n in names if finished(runs, n)]
    if tta_evaluation:
        scored += [(n, tta_evaluation) for n, _ in list(scored) if (runs / n / tta_evaluation).is_dir()]
    for name, evaluation in scored:
        best = pd.read_json(runs / name / "best.json", typ="series")
        history = pd.read_csv(runs / name / "metrics.csv")
        row = {"run": name + (" + flip TTA" if evaluation != "evaluation" else ""),
               "epochs_trained": len(history), "best_epoch": best["epoch"],
               "train_seconds": round(float(history["epoch_seconds"].sum())), "threshold": best["malignant_threshold"]}
        row |= {f"val_{k}": v for k, v in best["metrics"]["val"].items() if k.startswith("auc")}
        for prefix, part in predictions(runs, name, evaluation).items():
            if prefix != "both":
                row |= set_metrics(prefix, part["y"], part["prob_malignant"], part["pred"])
        rows.append(row)
    rows += extra_rows or []
    if rows:
        baseline = {"run": "all-malignant baseline"}
        for prefix in EVAL_NAMES:
            baseline |= {f"{prefix}_auc": 0.5, f"{prefix}_sensitivity": 1.0, f"{prefix}_specificity": 0.0}
        rows.append(baseline)
    return pd.DataFrame(rows)


def report(runs: Path, run_names: list[str], sources: dict[str, str], variants: dict[str, str], reference: str,
           out: Path, tta_evaluation: str | None = None, ensemble_runs: list[str] | None = None,
           extra_rows: list[dict] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = run_summary(runs, run_names, tta_evaluation, extra_rows)
    if summary.empty:
        raise ReportError(f"no finished run in {runs}; train some first")
    write_rows(out / "runs.csv", summary.to_dict("records"))
    written = [out / "runs.csv"]
    if all(finished(runs, n) for n in sources.values()):
        table = matrix(runs, sources)
        write_rows(out / "cross_dataset.csv", table.to_dict("records"))
        written += [out / "cross_dataset.csv", matrix_heatmap(table, out / "cross_dataset.png")]
    else:
        print(f"cross-dataset matrix skipped: waiting for {[n for n in sources.values() if not finished(runs, n)]}")
    if finished(runs, reference):
        table = ablation(runs, variants, reference, tta_evaluation)
        write_rows(out / "ablation.csv", table.to_dict("records"))
        written += [out / "ablation.csv", ablation_plot(table, out / "ablation.png")]
        missing = [label for label, name in variants.items() if not finished(runs, name)]
        if missing:
            print(f"ablation rows not yet available (runs unfinished): {missing}")
    if ensemble_runs and sum(finished(runs, n) for n in ensemble_runs) >= 2:
        table = ensemble(runs, ensemble_runs, tta_evaluation)
        write_rows(out / "ensemble.csv", table.to_dict("records"))
        written.append(out / "ensemble.csv")
    return written
