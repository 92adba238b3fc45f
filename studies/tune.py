"""Hyper-parameter search with Optuna on `val`; resumable; the best trial is then scored on `test` once.

    # CPU: a quick study (DenseNet-121 at 64 px on 1,500 fit images, up to 3 epochs a trial)
    python studies/tune.py --trials 8 --img-size 64 --limit 1500 --max-epochs 3 --threads 1
    # one GPU: the full-size search
    python studies/tune.py --trials 50 --img-size 224 --max-epochs 30 --device cuda
    # several GPUs or machines: start the same command once per GPU; they share the study through --storage
    CUDA_VISIBLE_DEVICES=1 python studies/tune.py --trials 50 --img-size 224 --max-epochs 30 --device cuda

Each trial is one classifiers/train.py run (learning rate, head dropout, weight decay and epochs sampled by TPE or at
random) whose objective is its best val AUC; test labels are never read during the search. The study lives in SQLite
(--storage), so a killed search continues where it stopped: trials that were running when it died are marked failed
by their missing heartbeat and re-queued with the same parameters, and since each trial's run folder is named by its
parameters, the retry resumes that run from its last epoch. When --trials trials are complete, the best one (by val
AUC) is evaluated on `test` and `external`; outputs in --out: trials.csv, history.png and best_trial_test.csv.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import pandas as pd

from classifiers.evaluate import evaluate
from classifiers.models import list_models
from classifiers.train import TrainConfig, train
from data.config import Runtime
from data.manifest import read_manifest
from data.paths import MANIFESTS, RESULTS, RUNS
from data.runtime import add_runtime_options, cli_main, init_device
from evaluation.plots import save_figure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="complete trials wanted in the study (counted across runs)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random"), help="Optuna sampler")
    p.add_argument("--arch", default="densenet121", choices=list_models(), help="architecture")
    p.add_argument("--img-size", type=int, default=128, help="input size of every trial")
    p.add_argument("--min-epochs", type=int, default=1, help="smallest epoch budget a trial may draw")
    p.add_argument("--max-epochs", type=int, default=12, help="largest epoch budget a trial may draw")
    p.add_argument("--limit", type=int, default=None, help="fit images per trial (train.py --limit), for quick studies")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--study", default=None, help="study name (default: derived from the fixed settings)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///<runs-dir>/study.db)")
    p.add_argument("--runs-dir", default=str(RUNS / "tuning"), help="trial run folders and the study")
    p.add_argument("--out", default=str(RESULTS / "tuning"), help="report folder")
    add_runtime_options(p, seed=0)
    return p.parse_args(argv)


def suggest(trial: optuna.Trial, a: argparse.Namespace) -> dict[str, float | int]:
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.6),
        "weight_decay": trial.suggest_float("weight_decay", 1e-4, 0.2, log=True),
        "epochs": trial.suggest_int("epochs", a.min_epochs, a.max_epochs),
    }


def run_folder(runs: Path, study: str, params: dict) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return runs / study / digest


def objective(a: argparse.Namespace, study: str):
    def run(trial: optuna.Trial) -> float:
        params = suggest(trial, a)
        out = run_folder(Path(a.runs_dir), study, params)
        trial.set_user_attr("run", str(out))
        cfg = TrainConfig(arch=a.arch, img_size=a.img_size, manifest=a.manifest, seed=a.seed, lr=params["lr"],
                          dropout=params["dropout"], weight_decay=params["weight_decay"], epochs=params["epochs"],
                          patience=params["epochs"], out=str(out), limit=a.limit)
        result = train(cfg, replace(Runtime.from_args(a), progress=False, resume=True))
        return float(result["metrics"]["val"]["auc"])

    return run


def history_plot(trials: pd.DataFrame, path: Path) -> Path:
    done = trials[trials["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(done["number"], done["value"], "o", label="trial val AUC")
    ax.plot(done["number"], done["value"].cummax(), "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val AUC")
    ax.legend()
    return save_figure(fig, path)


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    a = parse_args(argv)
    if a.min_epochs < 1 or a.max_epochs < a.min_epochs:
        sys.exit("error: need 1 <= --min-epochs <= --max-epochs")
    if not Path(a.manifest).is_file():
        sys.exit(f"error: manifest {a.manifest} not found")
    runs = Path(a.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    name = a.study or f"{a.arch}_{a.img_size}px_e{a.min_epochs}-{a.max_epochs}_limit{a.limit or 'all'}_{a.sampler}"
    storage = optuna.storages.RDBStorage(
        a.storage or f"sqlite:///{runs / 'study.db'}", heartbeat_interval=30, grace_period=90,
        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=2))
    sampler = optuna.samplers.TPESampler(seed=a.seed) if a.sampler == "tpe" else optuna.samplers.RandomSampler(a.seed)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    complete = optuna.trial.TrialState.COMPLETE
    remaining = a.trials - len(study.get_trials(states=(complete,)))
    if remaining > 0:
        study.optimize(objective(a, name), callbacks=[optuna.study.MaxTrialsCallback(a.trials, states=(complete,))])
    trials = study.trials_dataframe(attrs=("number", "value", "params", "state", "user_attrs", "duration"))
    trials["state"] = trials["state"].astype(str).str.removeprefix("TrialState.")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    trials.to_csv(out / "trials.csv", index=False)
    history_plot(trials, out / "history.png")
    best = study.best_trial
    df = read_manifest(a.manifest)
    metrics = evaluate([str(Path(best.user_attrs["run"]) / "best.safetensors")], df[df["split"].isin(["test",
                       "external"])], out / "best_trial_evaluation", init_device(a.device),
                       model_name=f"trial{best.number}", plot=False)
    metrics = metrics.assign(trial=best.number, val_auc=best.value, **{f"param_{k}": v for k, v in best.params.items()})
    metrics.to_csv(out / "best_trial_test.csv", index=False)
    print(f"best of {len(study.get_trials(states=(complete,)))} trials: #{best.number} val AUC {best.value:.4f} "
          f"{best.params}")
    print(metrics[["model", "dataset", "split", "auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics


if __name__ == "__main__":
    main()
