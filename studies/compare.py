r"""Compare evaluated classifiers side by side, paired on the same images: AUC with its CI, the AUC difference to a
reference model with a paired bootstrap CI, sensitivity/specificity at each model's own val threshold, the
all-malignant baseline, and the training cost read from each run's log.

Inputs are classifiers/evaluate.py output folders (metrics.csv + predictions.csv), so nothing is re-scored here.

    python studies/compare.py --reference "Lite0 fine-tuned" \
        --run "Lite0 fine-tuned=runs/eval_lite0_ft" "Lite0 linear probe=runs/eval_lite0_probe" \
        --train-log "Lite0 fine-tuned=runs/lite0_ft" --out results/pretrained
(CPU only, seconds. GPU and several machines change nothing here.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from data.atomic import write_rows
from data.manifest import split_label
from evaluation.metrics import paired_auc_difference
from evaluation.plots import save_figure

# evaluation set -> (dataset, split, ISIC's official split or None), as predictions.csv records them
SETS = {"HAM10000 test": ("ham10000", "test", None),
        "ISIC 2017 val (held out)": ("isic2017", "external", "val"),
        # only for models that never saw ISIC 2017 (trained on original.csv, where all of it is `external`)
        "ISIC 2017 train (unseen source)": ("isic2017", "external", "train"),
        # a selection split for classifiers: mixed.csv's calib is HAM10000's, which no classifier trains or selects on
        "HAM10000 calib (selection)": ("ham10000", "calib", None)}
DEFAULT_SETS = ("HAM10000 test", "ISIC 2017 val (held out)")


def named_paths(items: list[str], flag: str) -> dict[str, Path]:
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r}: expected NAME=PATH")
        pairs[name] = Path(path)
    return pairs


def log_files(logs: str | Path) -> list[Path]:
    """Comma-separated training logs, each a run folder (its metrics.csv) or the CSV itself."""
    return [p / "metrics.csv" if p.is_dir() else p for p in map(Path, str(logs).split(","))]


def training_cost(logs: str | Path) -> dict[str, float]:
    """Summed over the training logs: a model trained in stages costs all of them. `val_auc` is the best epoch's of
    the last stage (the epoch its checkpoint keeps), the number the shipping rule compares."""
    stages = [pd.read_csv(p) for p in log_files(logs)]
    log = pd.concat(stages)
    return {"train_minutes": float(log["epoch_seconds"].sum() / 60), "epochs_run": len(log),
            "train_images_per_s": float(log["images_per_s"].mean()), "val_auc": float(stages[-1]["val_auc"].max())}


def rows_of(df: pd.DataFrame, dataset: str, split: str, official: str | None = None) -> pd.DataFrame:
    """Rows of one evaluation set; `official` picks ISIC's official split where predictions.csv records it (older
    files do not: compare() then checks that the rows are as many as metrics.csv counted)."""
    rows = df[(df["dataset"] == dataset) & (df["split"] == split)]
    return rows[rows["official_split"] == official] if official and "official_split" in rows else rows


def compare(runs: dict[str, Path], reference: str, logs: dict[str, Path], n_boot: int = 1000,
            sets: tuple[str, ...] = DEFAULT_SETS) -> pd.DataFrame:
    metrics = {name: pd.read_csv(path / "metrics.csv") for name, path in runs.items()}
    preds = {name: pd.read_csv(path / "predictions.csv") for name, path in runs.items()}
    rows = []
    for label in sets:
        dataset, split, official = SETS[label]
        metrics_split = split_label(split, official)
        ref = rows_of(preds[reference], dataset, split, official).set_index("path")
        for name in runs:
            m = rows_of(metrics[name], dataset, metrics_split)
            if m.empty:
                raise ValueError(f"{runs[name]} has no {dataset}/{metrics_split} rows for {label!r}: evaluate it with "
                                 f"--splits {split}, or leave that set out of --sets")
            model_row = m[m["model"] != "all_malignant_baseline"].iloc[0]
            p = rows_of(preds[name], dataset, split, official).set_index("path")
            if len(p) != model_row["n"]:
                raise ValueError(f"{runs[name]}: predictions.csv has {len(p)} rows for {label!r}, metrics.csv "
                                 f"{int(model_row['n'])}; re-run classifiers/evaluate.py (it records official_split)")
            common = p.index.intersection(ref.index)
            y = (p.loc[common, "label"] == "malignant").to_numpy()
            diff = (np.nan, np.nan, np.nan) if name == reference else paired_auc_difference(
                y, p.loc[common, "prob_malignant"].to_numpy(), ref.loc[common, "prob_malignant"].to_numpy(), n_boot)
            rows.append({"model": name, "evaluation_set": label, "n": int(model_row["n"]),
                         "n_malignant": int(model_row["n_malignant"]), "auc": model_row["auc"],
                         "auc_ci_low": model_row["auc_ci_low"], "auc_ci_high": model_row["auc_ci_high"],
                         "reference": reference, "auc_minus_reference": diff[0], "diff_ci_low": diff[1],
                         "diff_ci_high": diff[2],
                         "paired_n": len(common), "sensitivity": model_row["sensitivity"],
                         "specificity": model_row["specificity"], "threshold": model_row["threshold"],
                         **(training_cost(logs[name]) if name in logs else {})})
        ref_metrics = rows_of(metrics[reference], dataset, metrics_split)
        baseline = ref_metrics[ref_metrics["model"] == "all_malignant_baseline"].iloc[0]
        rows.append({"model": "all-malignant baseline", "evaluation_set": label, "n": int(baseline["n"]),
                     "n_malignant": int(baseline["n_malignant"]), "auc": 0.5, "sensitivity": 1.0, "specificity": 0.0})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> Path:
    models = [m for m in dict.fromkeys(table["model"]) if m != "all-malignant baseline"]
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(models) + 2.2))
    sets = list(dict.fromkeys(table["evaluation_set"]))
    offsets = np.linspace(-0.15, 0.15, len(sets)) if len(sets) > 1 else [0.0]
    for offset, label, colour in zip(offsets, sets, ("tab:blue", "tab:orange", "tab:green")):
        part = table[table["evaluation_set"] == label].set_index("model").loc[models]
        yy = np.arange(len(models)) + offset
        ax.errorbar(part["auc"], yy, xerr=[part["auc"] - part["auc_ci_low"], part["auc_ci_high"] - part["auc"]],
                    fmt="o", color=colour, capsize=3, label=label)
    ax.axvline(0.5, color="grey", ls="--", lw=0.8, label="all-malignant baseline (0.5)")
    ax.set_yticks(np.arange(len(models)), models)
    ax.invert_yaxis()
    ax.set(xlabel="AUC (95% bootstrap CI)", xlim=(0.45, 1.0))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", required=True, help="NAME=folder written by classifiers/evaluate.py")
    p.add_argument("--reference", required=True, help="the NAME the paired differences are taken against")
    p.add_argument("--train-log", nargs="*", default=[],
                   help="NAME=training run folder or metrics CSV (cost; several stages: comma-separated, summed)")
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), choices=list(SETS), metavar="SET",
                   help=f"evaluation sets to pair on, from {list(SETS)} (the unseen-source one: models trained "
                        "without ISIC 2017)")
    p.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--out", required=True, help="output folder (comparison.csv, comparison.png)")
    a = p.parse_args(argv)
    try:
        runs, logs = named_paths(a.run, "--run"), named_paths(a.train_log, "--train-log")
    except ValueError as exc:
        p.error(str(exc))
    if a.reference not in runs:
        p.error(f"--reference {a.reference!r} is not one of the --run names {list(runs)}")
    missing = [str(path / name) for path in runs.values() for name in ("metrics.csv", "predictions.csv")
               if not (path / name).is_file()] + [str(f) for path in logs.values() for f in log_files(path)
                                                   if not f.is_file()]
    if missing:
        p.error(f"not found: {', '.join(missing)}")
    try:
        table = compare(runs, a.reference, logs, a.n_boot, tuple(a.sets))
    except ValueError as exc:
        p.error(str(exc))
    out = Path(a.out)
    write_rows(out / "comparison.csv", table.to_dict("records"))
    plot(table, out / "comparison.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return table


if __name__ == "__main__":
    main()
