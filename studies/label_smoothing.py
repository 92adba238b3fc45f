"""Does label smoothing help the fine-tuned EfficientNet-Lite0? Each arm trained with several seeds, so the answer is
read against the seed-noise floor, not against one lucky run.

    # CPU: 2 arms x 3 seeds of a short Lite0 fine-tune at 160 px (about 10 minutes a run on one thread); resumable
    python studies/label_smoothing.py --threads 1
    # one GPU, or several (give each process its own --seeds, then run once more with --report-only)
    python studies/label_smoothing.py --device cuda --seeds 0 1 2 3 4
    CUDA_VISIBLE_DEVICES=1 python studies/label_smoothing.py --device cuda --seeds 5 6 7 &

Every run is the shipped default's recipe (README, "Shipped default": ImageNet Lite0, HAM10000 fit + ISIC 2017
train-fit, Shades of Gray, source/class balancing, strong augmentation, discriminative learning rates) on a shorter
budget (SHORT), with `--label-smoothing` the only difference between arms. The epoch is chosen on val; each run is
then scored once on HAM10000 `test` and ISIC 2017 `val`. The report (--out) holds runs.csv (one row per run: val AUC,
each test set's AUC with its CI, sensitivity and specificity at the val threshold, and the all-malignant baseline),
summary.csv (per arm: mean and spread over seeds; the change against the reference arm with a 95% CI that resamples
the test images while every run's AUC is recomputed, beside the noise floor: the largest AUC gap between two seeds of
the same arm) and label_smoothing.png.
"""
from __future__ import annotations

import argparse
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from classifiers.evaluate import evaluate
from classifiers.train import TrainConfig
from data import paths
from data.config import Runtime, config_changes
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from evaluation.metrics import bootstrap_aucs, ci, decision_metrics
from evaluation.plots import save_figure
from studies import cross_dataset, grid

SHORT = {"arch": "efficientnet_lite0", "pretrained": "imagenet", "img_size": 160, "color_constancy": "shades_of_gray",
         "balance": "source_class", "class_weights": "none", "epoch_size": 2000, "epochs": 2, "patience": 2,
         "lr": 1e-3, "backbone_lr_scale": 0.3, "weight_decay": 0.01, "warmup_epochs": 0.3, "crop_scale": 0.35,
         "jitter": 0.3, "cutout": 0.5, "occlusion": 0.3}
ARMS = {"none": 0.0, "smoothing_0.1": 0.1}  # arm -> --label-smoothing; the first arm is the reference
SETS = ("ham10000_test", "isic2017_val")


def train_arm(arm: str, seed: int, manifest: Path, runs: Path, device, rt: Runtime,
              changes: dict[str, Any], limit: int | None) -> None:
    run = runs / f"{arm}_s{seed}"
    cfg = TrainConfig(**{**SHORT, **changes, "label_smoothing": ARMS[arm]}, config="mixed", manifest=str(manifest),
                      out=str(run), seed=seed, limit=limit)
    eval_rows = grid.eval_rows(manifest, limit, seed)
    grid.train_and_evaluate(
        cfg, rt, lambda: evaluate([str(run / "best.safetensors")], eval_rows, run / "evaluation", device, plot=False),
        f"{arm} seed {seed}")


def run_rows(runs: Path, arms: list[str], seeds: list[int]) -> tuple[pd.DataFrame, dict]:
    """One row per run, and each run's predictions per evaluation set (same image order in every run)."""
    rows, preds = [], {}
    for arm in arms:
        for seed in seeds:
            name = f"{arm}_s{seed}"
            if not cross_dataset.finished(runs, name):
                raise UserError(f"{runs / name} is not trained and evaluated yet; run without --report-only")
            sets = cross_dataset.predictions(runs, name)
            val_auc = pd.read_json(runs / name / "best.json", typ="series")["metrics"]["val"]["auc"]
            row = {"arm": arm, "label_smoothing": ARMS[arm], "seed": seed, "val_auc": val_auc}
            for prefix in SETS:
                part = sets[prefix]
                row |= cross_dataset.set_metrics(prefix, part["y"], part["prob_malignant"], part["pred"])
                preds[arm, seed, prefix] = part
            rows.append(row)
    baseline: dict = {"arm": "all_malignant_baseline"}
    for prefix in SETS:
        y = preds[arms[0], seeds[0], prefix]["y"].to_numpy()
        decisions = decision_metrics(y, np.ones_like(y))
        baseline |= {f"{prefix}_auc": 0.5, f"{prefix}_sensitivity": decisions["sensitivity"],
                     f"{prefix}_specificity": decisions["specificity"]}
    return pd.DataFrame([*rows, baseline]).astype({"seed": "Int64"}), preds


def summary(runs_df: pd.DataFrame, preds: dict, arms: list[str], seeds: list[int], n_boot: int) -> pd.DataFrame:
    """Per arm and set: mean (sd) AUC over seeds, the change of the seed-mean AUC against the reference arm with a
    bootstrap CI over test images, and the noise floor (largest AUC gap between two seeds of one arm)."""
    rows = []
    for prefix in SETS:
        y = preds[arms[0], seeds[0], prefix]["y"].to_numpy()
        boot = {arm: np.mean([bootstrap_aucs(y, preds[arm, s, prefix]["prob_malignant"], n_boot) for s in seeds],
                             axis=0) for arm in arms}  # the same seed: every run is resampled on the same images
        aucs = {arm: runs_df.loc[runs_df["arm"] == arm, f"{prefix}_auc"].to_numpy() for arm in arms}
        floor = max((abs(a - b) for arm in arms for a, b in combinations(aucs[arm], 2)), default=np.nan)
        for arm in arms:
            change = aucs[arm].mean() - aucs[arms[0]].mean()
            lo, hi = ci(boot[arm] - boot[arms[0]])
            rows.append({"set": prefix, "arm": arm, "seeds": len(seeds), "auc_mean": aucs[arm].mean(),
                         "auc_sd": aucs[arm].std(ddof=1) if len(seeds) > 1 else np.nan,
                         "change": change, "change_ci_low": lo, "change_ci_high": hi, "seed_noise_floor": floor})
    return pd.DataFrame(rows)


def plot(runs_df: pd.DataFrame, arms: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(SETS), figsize=(4.5 * len(SETS), 3.6), sharey=False)
    for ax, prefix in zip(axes, SETS):
        for i, arm in enumerate(arms):
            part = runs_df[runs_df["arm"] == arm]
            ax.scatter(np.full(len(part), i), part[f"{prefix}_auc"], color=f"C{i}", zorder=3, label="one seed")
            ax.hlines(part[f"{prefix}_auc"].mean(), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(arms)), arms)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_title(f"{prefix} AUC (dots: seeds, bar: mean)")
    fig.tight_layout()
    return save_figure(fig, path)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms, the reference first")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds of every arm")
    p.add_argument("--manifest", default=str(paths.MANIFESTS / "mixed.csv"), help="multi-source manifest")
    p.add_argument("--runs-dir", default=str(paths.RUNS / "label_smoothing"), help="one folder per run here")
    p.add_argument("--out", default=str(paths.RESULTS / "label_smoothing"), help="report folder")
    p.add_argument("--report-only", action="store_true", help="skip training; report the finished runs")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change an option of SHORT in every run, e.g. --set img_size=32 epochs=1 (quick checks)")
    p.add_argument("--limit", type=int, default=None,
                   help="quick runs: at most this many fit images per run and images per evaluation set")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the test images")
    add_runtime_options(p, progress=True)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    runs, manifest, out = Path(a.runs_dir), Path(a.manifest), Path(a.out)
    if not manifest.is_file():
        raise UserError(f"{manifest} not found; build it with python scripts/01_prepare_data.py --mixed")
    rt = Runtime.from_args(a)
    try:
        changes = config_changes(TrainConfig, a.set)
    except ValueError as exc:
        raise UserError(f"--set: {exc}") from None
    if not a.report_only:
        for seed in a.seeds:  # seed-major, so a stopped study still has both arms of its first seeds
            for arm in a.arms:
                train_arm(arm, seed, manifest, runs, device, rt, changes, a.limit)
    runs_df, preds = run_rows(runs, a.arms, a.seeds)
    out.mkdir(parents=True, exist_ok=True)
    runs_df.to_csv(out / "runs.csv", index=False, float_format="%.4f")
    summary(runs_df, preds, a.arms, a.seeds, a.n_boot).to_csv(out / "summary.csv", index=False, float_format="%.4f")
    plot(runs_df, a.arms, out / "label_smoothing.png")
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'label_smoothing.png'}")


if __name__ == "__main__":
    main()
