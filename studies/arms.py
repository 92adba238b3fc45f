"""Seeded arms: one short training recipe, a few arms that each change it, several seeds per arm, every run scored once
on HAM10000 `test` and ISIC 2017 `val`, every change read against the seed-noise floor rather than one lucky run.

studies/label_smoothing.py and studies/synthetic_data.py are two such studies: each defines a `Study` (the recipe
and its arms) and calls `main`. The epoch and threshold of every run are chosen on its `val`; the test sets are only
scored. The report (--out) holds runs.csv (one row per run: val AUC, each test set's AUC with its CI, sensitivity and
specificity at the val threshold, and the all-malignant baseline), summary.csv (per arm: mean and spread over seeds;
the change against the reference arm with a 95% CI that resamples the test images while every run's AUC is
recomputed, beside the noise floor: the largest AUC gap between two seeds of the same arm) and <study>.png.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
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

SETS = ("ham10000_test", "isic2017_val")
Arms = dict[str, dict[str, Any]]  # arm -> the TrainConfig fields it changes; the first arm is the reference


@dataclass(frozen=True)
class Study:
    name: str  # default runs/<name>, results/<name> and <name>.png
    recipe: dict[str, Any]  # TrainConfig fields shared by every run
    arms: Callable[[argparse.Namespace], Arms]  # the arms given the parsed CLI; each names its `manifest`
    manifest_hint: str  # how to build a missing manifest
    reported: tuple[str, ...] = ()  # arm fields copied into runs.csv beside the arm's name
    add_options: Callable[[argparse.ArgumentParser], None] = lambda p: None


def train_run(study: Study, arm: str, changes: dict[str, Any], seed: int, runs: Path, device, rt: Runtime,
              limit: int | None) -> None:
    run = runs / f"{arm}_s{seed}"
    cfg = TrainConfig(**{**study.recipe, **changes}, out=str(run), seed=seed, limit=limit)
    eval_rows = grid.eval_rows(Path(cfg.manifest), limit, seed)
    grid.train_and_evaluate(
        cfg, rt, lambda: evaluate([str(run / "best.safetensors")], eval_rows, run / "evaluation", device, plot=False),
        f"{arm} seed {seed}")


def run_rows(study: Study, arms: Arms, runs: Path, seeds: list[int]) -> tuple[pd.DataFrame, dict]:
    """One row per run, and each run's predictions per evaluation set (same image order in every run)."""
    rows, preds = [], {}
    for arm, changes in arms.items():
        for seed in seeds:
            name = f"{arm}_s{seed}"
            if not cross_dataset.finished(runs, name):
                raise UserError(f"{runs / name} is not trained and evaluated yet; run without --report-only")
            sets = cross_dataset.predictions(runs, name)
            val_auc = pd.read_json(runs / name / "best.json", typ="series")["metrics"]["val"]["auc"]
            row = {"arm": arm, **{k: changes[k] for k in study.reported}, "seed": seed, "val_auc": val_auc}
            for prefix in SETS:
                part = sets[prefix]
                row |= cross_dataset.set_metrics(prefix, part["y"], part["prob_malignant"], part["pred"])
                preds[arm, seed, prefix] = part
            rows.append(row)
    baseline: dict = {"arm": "all_malignant_baseline"}
    first = (next(iter(arms)), seeds[0])
    for prefix in SETS:
        y = preds[(*first, prefix)]["y"].to_numpy()
        decisions = decision_metrics(y, np.ones_like(y))
        baseline |= {f"{prefix}_auc": 0.5, f"{prefix}_sensitivity": decisions["sensitivity"],
                     f"{prefix}_specificity": decisions["specificity"]}
    return pd.DataFrame([*rows, baseline]).astype({"seed": "Int64"}), preds


def summary(runs_df: pd.DataFrame, preds: dict, arms: list[str], seeds: list[int], n_boot: int) -> pd.DataFrame:
    """Per arm and set: mean (sd) AUC over seeds, the change of the seed-mean AUC against the reference arm with a
    bootstrap CI over test images, the noise floor (largest AUC gap between two seeds of one arm), and the seed-mean
    sensitivity and specificity at each run's val threshold (the recall of each class)."""
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
                         "change": change, "change_ci_low": lo, "change_ci_high": hi, "seed_noise_floor": floor,
                         **{f"{m}_mean": runs_df.loc[runs_df["arm"] == arm, f"{prefix}_{m}"].mean()
                            for m in ("sensitivity", "specificity")}})
    return pd.DataFrame(rows)


def plot(runs_df: pd.DataFrame, arms: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(SETS), figsize=(max(4.5, 1.1 * len(arms)) * len(SETS), 3.6), sharey=False)
    for ax, prefix in zip(axes, SETS):
        for i, arm in enumerate(arms):
            part = runs_df[runs_df["arm"] == arm]
            ax.scatter(np.full(len(part), i), part[f"{prefix}_auc"], color=f"C{i}", zorder=3, label="one seed")
            ax.hlines(part[f"{prefix}_auc"].mean(), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(arms)), arms, rotation=30 if len(arms) > 3 else 0)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_title(f"{prefix} AUC (dots: seeds, bar: mean)")
    fig.tight_layout()
    return save_figure(fig, path)


def parser(study: Study, doc: str, arm_names: list[str], default_arms: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=default_arms, choices=arm_names, help="arms, the reference first")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds of every arm")
    p.add_argument("--runs-dir", default=str(paths.RUNS / study.name), help="one folder per run here")
    p.add_argument("--out", default=str(paths.RESULTS / study.name), help="report folder")
    p.add_argument("--report-only", action="store_true", help="skip training; report the finished runs")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change an option of the recipe in every run, e.g. --set img_size=32 epochs=1 (quick checks)")
    p.add_argument("--limit", type=int, default=None,
                   help="quick runs: at most this many fit images per run and images per evaluation set")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the test images")
    study.add_options(p)
    add_runtime_options(p, progress=True)
    return p


@cli_main
def main(study: Study, doc: str, arm_names: list[str], argv: list[str] | None = None,
         default_arms: list[str] | None = None) -> None:
    a = parser(study, doc, arm_names, default_arms or arm_names).parse_args(argv)
    device = init_device(a.device, a.threads)
    every_arm = study.arms(a)
    arms = {name: every_arm[name] for name in a.arms}
    for name, changes in arms.items():
        if not Path(changes["manifest"]).is_file():
            raise UserError(f"arm {name}: {changes['manifest']} not found; {study.manifest_hint}")
    runs, out, rt = Path(a.runs_dir), Path(a.out), Runtime.from_args(a)
    try:
        changes = config_changes(TrainConfig, a.set)
    except ValueError as exc:
        raise UserError(f"--set: {exc}") from None
    if not a.report_only:
        for seed in a.seeds:  # seed-major, so a stopped study still has every arm of its first seeds
            for arm, arm_changes in arms.items():
                train_run(study, arm, {**arm_changes, **changes}, seed, runs, device, rt, a.limit)
    runs_df, preds = run_rows(study, arms, runs, a.seeds)
    out.mkdir(parents=True, exist_ok=True)
    runs_df.to_csv(out / "runs.csv", index=False, float_format="%.4f")
    summary(runs_df, preds, list(arms), a.seeds, a.n_boot).to_csv(out / "summary.csv", index=False,
                                                                  float_format="%.4f")
    plot(runs_df, list(arms), out / f"{study.name}.png")
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.csv'}, {out / f'{study.name}.png'}")
