r"""Where does a classifier err? Sensitivity and specificity by patient age band, sex and body site.

Reads a classifier's per-image predictions (classifiers/evaluate.py's predictions.csv: the `pred` column is the
decision at the checkpoint's own val threshold) and the manifest's HAM10000 metadata, and writes one table row per
(attribute, group): counts, sensitivity and specificity with exact (Clopper-Pearson) 95% CIs, AUC with its bootstrap
CI where the group has at least 5 of each class, and the prevalence (the all-malignant baseline's PPV; that baseline
has sensitivity 1 and specificity 0 in every group). Nothing is chosen here: it only reads decisions already made.

    python studies/patient_errors.py                              # the shipped default classifier's predictions
    python studies/patient_errors.py --predictions results/classifier/densenet121/predictions.csv \
        --out results/patient_errors/densenet121
(CPU only and seconds: no model runs. GPU and several machines change nothing here.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from classifiers.shipped import default_classifier
from data.atomic import write_rows
from data.manifest import read_manifest
from data.paths import MANIFESTS, RESULTS
from evaluation.metrics import auc_ci, proportion_ci
from evaluation.plots import save_figure

AGE_BANDS = [0, 30, 45, 60, 75, 200]
MIN_PER_CLASS_FOR_AUC = 5


def age_band(age: float) -> str:
    if pd.isna(age):
        return "unknown"
    i = np.searchsorted(AGE_BANDS, age, side="right") - 1
    return f"{AGE_BANDS[i]}-{AGE_BANDS[i + 1] - 1}" if AGE_BANDS[i + 1] < 200 else f"{AGE_BANDS[i]}+"


def group_row(attribute: str, group: str, part: pd.DataFrame) -> dict:
    y, pred = (part["label"] == "malignant").to_numpy(), part["pred"].to_numpy().astype(bool)
    tp, fn = int((y & pred).sum()), int((y & ~pred).sum())
    tn, fp = int((~y & ~pred).sum()), int((~y & pred).sum())
    row = {"attribute": attribute, "group": group, "n": len(part), "n_malignant": int(y.sum()),
           "prevalence": y.mean(), "TP": tp, "FN": fn, "TN": tn, "FP": fp}
    for name, hits, total in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
        row[name] = hits / total if total else np.nan
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = proportion_ci(hits, total) if total else (np.nan, np.nan)
    if min(y.sum(), (~y).sum()) >= MIN_PER_CLASS_FOR_AUC:
        row["auc"], row["auc_ci_low"], row["auc_ci_high"] = auc_ci(y, part["prob_malignant"].to_numpy())
    else:
        row["auc"] = row["auc_ci_low"] = row["auc_ci_high"] = np.nan
    return row


def error_table(df: pd.DataFrame) -> pd.DataFrame:
    attributes = {"age": df["age"].map(age_band), "sex": df["sex"].fillna("unknown"),
                  "site": df["site"].fillna("unknown")}
    rows = [group_row("all", "all", df)]
    for attribute, groups in attributes.items():
        order = sorted(groups.unique(), key=lambda g: (g == "unknown", AGE_BANDS[0] if g == "unknown" else g)) \
            if attribute == "age" else groups.value_counts().index
        rows += [group_row(attribute, group, df[groups == group]) for group in order]
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    attributes = [a for a in ("age", "sex", "site") if a in set(table["attribute"])]
    fig, axes = plt.subplots(1, len(attributes), figsize=(5 * len(attributes), 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [table["attribute"].eq(a).sum() for a in attributes]})
    overall = table[table["attribute"] == "all"].iloc[0]
    for ax, attribute in zip(axes[0], attributes):
        part = table[table["attribute"] == attribute].reset_index(drop=True)
        x = np.arange(len(part))
        for offset, metric, colour in ((-0.15, "sensitivity", "tab:red"), (0.15, "specificity", "tab:blue")):
            err = [part[metric] - part[f"{metric}_ci_low"], part[f"{metric}_ci_high"] - part[metric]]
            ax.errorbar(x + offset, part[metric], yerr=err, fmt="o", color=colour, capsize=3, label=metric)
            ax.axhline(overall[metric], color=colour, lw=0.8, ls="--")
        labels = [f"{g}\n(n={n}, {m} mal.)" for g, n, m in zip(part["group"], part["n"], part["n_malignant"])]
        ax.set_xticks(x, labels, rotation=60 if attribute == "site" else 35, fontsize=7, ha="right")
        ax.set(ylim=(-0.02, 1.02), title=attribute)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{title}: 95% exact CIs; dashed = all images. All-malignant baseline: sensitivity 1, specificity 0")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", default=None,
                   help="predictions.csv of classifiers/evaluate.py (default: the shipped default classifier's, "
                        "results/classifier/<name>/predictions.csv)")
    p.add_argument("--manifest", default=str(MANIFESTS / "mixed.csv"),
                   help="manifest holding age, sex and site for the predicted images")
    p.add_argument("--dataset", default="ham10000", help="rows of this dataset (the one with patient metadata)")
    p.add_argument("--split", default="test", help="rows of this split")
    p.add_argument("--out", default=None, help="output folder (default: results/patient_errors/<name>)")
    a = p.parse_args(argv)
    name = default_classifier().stem if a.predictions is None else Path(a.predictions).parent.name
    predictions = Path(a.predictions or RESULTS / "classifier" / name / "predictions.csv")
    if not predictions.is_file():
        p.error(f"{predictions}: predictions not found (run classifiers/evaluate.py first)")
    preds = pd.read_csv(predictions)
    preds = preds[(preds["dataset"] == a.dataset) & (preds["split"] == a.split)]
    preds = preds.assign(image_id=preds["path"].map(lambda s: Path(s).stem))
    meta = read_manifest(a.manifest)[["image_id", "age", "sex", "site"]].drop_duplicates("image_id")
    df = preds.merge(meta, on="image_id", how="left", validate="one_to_one")
    if df.empty:
        p.error(f"{predictions}: no {a.dataset}/{a.split} rows")
    table = error_table(df)
    out = Path(a.out or RESULTS / "patient_errors" / name)
    write_rows(out / "errors_by_patient.csv", table.to_dict("records"))
    plot(table, out / "errors_by_patient.png", f"{name} on {a.dataset} {a.split}")
    print(f"{len(df)} images; {len(table) - 1} groups -> {out}")
    return table


if __name__ == "__main__":
    main()
