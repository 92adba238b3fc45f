"""Seven-class HAM10000 (akiec, bcc, bkl, df, mel, nv, vasc): a baseline classifier against the same classifier
trained with per-class synthetic images for the minority diagnoses, from generators conditioned on the diagnosis.

    # CPU (2 cores): a DCGAN conditioned on dx (about an hour on one thread), then the arms side by side
    python generators/train.py --model dcgan --preset cpu --target dx --threads 1
    python studies/seven_class.py --arms baseline --threads 1 &
    python studies/seven_class.py --arms dcgan --threads 1 &
    python studies/seven_class.py --arms baseline_seed1 --threads 1     # the noise floor, when a core is free
    # the DDPM arm: a DDPM conditioned on dx (45 min on two threads), then its samples and the arm
    # (--bf16: DDIM-50 sampling in bf16 autocast; about 75 min for its 10,752 samples on two threads)
    python generators/train.py --model ddpm --preset cpu --target dx --threads 2
    python studies/seven_class.py --arms ddpm --bf16 --threads 2
    # the latent diffusion arm: the autoencoder (generators/latent.py), a latent model conditioned on dx (about an
    # hour on one thread for the cpu preset's 12,000 steps), then its arm
    python generators/train.py --model ldm --preset cpu --target dx --autoencoder <autoencoder checkpoint> --threads 1
    python studies/seven_class.py --arms ldm --threads 1
    python studies/seven_class.py --report-only            # the tables and figures of every finished arm
    # one GPU: the same with --device cuda --img-size 224 --epochs 20; several GPUs: one --arms process per GPU

Arms: `baseline` trains on HAM10000's real `fit` images; `baseline_seed1` is the same with another seed (the noise
floor: at small budgets the seed alone moves the metrics, see README, Generalisation). Each generator arm adds to
`fit` (only) synthetic images of every diagnosis with fewer than --ratio times the largest class's (nv) real fit
count, up to that count (data/configs.py, with dx as the class column). Every arm has the same architecture
and recipe and sees the same number of images (--epochs x --epoch-size); each selects its epoch on the macro
one-vs-rest val AUC, decides by argmax, and is scored once on HAM10000 `test`: per-class recall, precision, F1 and
one-vs-rest AUC with bootstrap 95% CIs, balanced accuracy and macro AUC, and every other arm's paired bootstrap
change against the baseline. The trivial majority-class rule (always nv) is listed beside them. Runs go to
runs/seven_class/<arm>/ (resumable; a finished arm is not retrained), results to results/seven_class/: summary.csv,
per_class.csv, tables.md (the same as markdown, for the README), confusion.png and per_class_f1.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from classifiers.evaluate import check_no_training_overlap
from classifiers.models import load_classifier
from classifiers.predict import predict_proba
from classifiers.train import TrainConfig
from data import configs
from data.atomic import atomic_write_text, write_rows
from data.cache import CachedImages
from data.config import Runtime
from data.manifest import DX_CLASSES, read_manifest, write_manifest
from data.paths import MANIFESTS, RESULTS, RUNS
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from data.transforms import Preprocess
from evaluation import plots
from evaluation.metrics import ci, multiclass_bootstrap
from generators import sample
from studies import grid

MAJORITY_RULE = "always_nv (majority class)"
# where generators/train.py --target dx --preset cpu writes each generator
DX_GENERATORS = {"dcgan": "dcgan_dx_cpu_s0/model.safetensors", "ddpm": "ddpm_dx_cpu_s0/model.safetensors",
                 "ldm": "ldm_dx_cpu_s0/model.safetensors"}


def manifest_path(work: Path, arm: str) -> Path:
    return work / "manifests" / f"dx7_{arm}.csv"


def arm_manifest(original: Path, arm: str, checkpoint: Path | None, work: Path, ratio: float, seed: int,
                 device: torch.device, progress: bool = True, bf16: bool = False) -> Path:
    """The baseline's manifest (HAM10000 rows of `original`), or it plus `checkpoint`'s samples in fit."""
    base = read_manifest(original)
    base = base[base["dataset"] == "ham10000"] if "dataset" in base else base
    path = manifest_path(work, arm)
    if checkpoint is None:
        write_manifest(base, path, {"experiment": "seven_class", "arm": arm, "base_manifest": original.name})
        return path
    model, meta = sample.load_generator(checkpoint)
    if list(meta["class_names"]) != list(DX_CLASSES):
        raise UserError(f"{checkpoint} generates {meta['class_names']}; train one conditioned on the seven "
                         f"diagnoses (generators/train.py --target dx)")
    counts = {k: n for k, n in configs.needed(base, ratio, "dx").items() if n > 0}
    if not counts:
        raise UserError(f"every diagnosis of {original.name} already has {ratio} x the largest class's fit "
                         f"count: no synthetic images to add")
    print(f"{arm}: sampling {counts}")
    info = sample.provenance(checkpoint, meta, "ddim", None, None)
    # samples already there (a killed run) are reused when the same generator and seed made them, else
    # SampleFolderError (a UserError)
    synthetic = sample.sample_to_folder(model.to(device), meta, counts, work / "synthetic" / arm, seed=seed,
                                        autocast=bf16 and meta["kind"] in sample.DIFFUSION, progress=progress,
                                        info=info)
    df = configs.add_synthetic(base, synthetic, meta["kind"], ratio, seed, column="dx")
    write_manifest(df, path, {"experiment": "seven_class", "arm": arm, "base_manifest": original.name, **info,
                              "ratio": ratio, "added": counts})
    return path


def train_arm(arm: str, manifest: Path, run: Path, a: argparse.Namespace, seed: int, device: torch.device) -> None:
    """Train (or resume) one arm; a finished arm with unchanged weights is left alone."""
    cfg = TrainConfig(target="dx", manifest=str(manifest), config=f"dx7_{arm}", out=str(run), arch=a.arch,
                      img_size=a.img_size, epochs=a.epochs, patience=a.epochs, epoch_size=a.epoch_size, seed=seed,
                      limit=a.limit)
    grid.train_and_evaluate(cfg, Runtime.from_args(a), lambda: predictions(run, manifest, device), arm)


def predictions(run: Path, manifest: Path, device: torch.device) -> pd.DataFrame:
    """Class probabilities of the arm's best checkpoint on HAM10000 test (written to <run>/evaluation/)."""
    model, meta = load_classifier(run / "best.safetensors", classes=DX_CLASSES)
    test = read_manifest(manifest).query("split == 'test'")
    check_no_training_overlap(meta, test, manifest.parent)
    data = CachedImages(test, meta["input_size"], meta["resize"], target="dx")
    probs = predict_proba(model.to(device), data.images, Preprocess.from_meta(meta), device)
    out = data.df[["path", "dx"]].assign(y=data.targets.numpy(), **{f"p_{c}": probs[:, i]
                                                                    for i, c in enumerate(DX_CLASSES)})
    write_rows(run / "evaluation" / "predictions.csv", out.to_dict("records"))
    write_rows(run / "evaluation" / "metrics.csv", [{"best_epoch": meta["epoch"],
                                                      "val_macro_auc": meta["metrics"]["val"]["auc"]}])
    return out


def _with_ci(prefix: str, point, boots) -> dict[str, float]:
    lo, hi = ci(boots)
    return {prefix: float(point), f"{prefix}_ci_low": float(lo), f"{prefix}_ci_high": float(hi)}


def report(arms: dict[str, pd.DataFrame], out: Path, n_boot: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """summary.csv (one row per arm) and per_class.csv (one row per arm and diagnosis), with paired changes."""
    first = next(iter(arms.values()))
    y = first["y"].to_numpy()
    if any(not np.array_equal(df["path"].to_numpy(), first["path"].to_numpy()) for df in arms.values()):
        raise ValueError("the arms were scored on different test images")
    majority = np.zeros((len(y), len(DX_CLASSES)))
    majority[:, DX_CLASSES.index("nv")] = 1.0
    scores = {name: multiclass_bootstrap(y, df[[f"p_{c}" for c in DX_CLASSES]].to_numpy(), n_boot)
              for name, df in arms.items()}
    scores[MAJORITY_RULE] = multiclass_bootstrap(y, majority, n_boot)
    base = scores.get("baseline")
    summary, per_class = [], []
    for name, s in scores.items():
        row = {"arm": name, "n_test": len(y)}
        for key in ("balanced_accuracy", "macro_auc", "accuracy"):
            row |= _with_ci(key, s[key], s[f"boot_{key}"])
            if base is not None and name not in ("baseline", MAJORITY_RULE):
                row |= _with_ci(f"{key}_change", s[key] - base[key], s[f"boot_{key}"] - base[f"boot_{key}"])
        summary.append(row)
        for i, c in enumerate(DX_CLASSES):
            cls = {"arm": name, "dx": c, "n_test": int((y == i).sum())}
            for key in ("recall", "precision", "f1", "auc"):
                cls |= _with_ci(key, s[key][i], s[f"boot_{key}"][:, i])
            if base is not None and name not in ("baseline", MAJORITY_RULE):
                cls |= _with_ci("f1_change", s["f1"][i] - base["f1"][i],
                                s["boot_f1"][:, i] - base["boot_f1"][:, i])
            per_class.append(cls)
    summary, per_class = pd.DataFrame(summary), pd.DataFrame(per_class)  # arms differ in columns: NaN-filled
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "summary.csv", summary.to_dict("records"))
    write_rows(out / "per_class.csv", per_class.to_dict("records"))
    plots.multiclass_confusion({name: (y, df[[f"p_{c}" for c in DX_CLASSES]].to_numpy().argmax(1))
                                for name, df in arms.items()}, DX_CLASSES, out / "confusion.png")
    atomic_write_text(out / "tables.md", tables_md(summary, per_class))
    plots.grouped_bars(per_class[per_class["arm"] != MAJORITY_RULE], "dx", "arm", "f1", out / "per_class_f1.png",
                       title="HAM10000 test: F1 per diagnosis (95% bootstrap CI)")
    return summary, per_class


def fit_counts(manifests: dict[str, Path]) -> pd.DataFrame:
    """Training images per diagnosis of each arm, real and synthetic (the `fit` split of its manifest)."""
    rows = []
    for arm, path in manifests.items():
        fit = read_manifest(path).query("split == 'fit'")
        synthetic = fit["source"] != "real"
        for dx in DX_CLASSES:
            rows.append({"arm": arm, "dx": dx, "real": int(((fit["dx"] == dx) & ~synthetic).sum()),
                         "synthetic": int(((fit["dx"] == dx) & synthetic).sum())})
    return pd.DataFrame(rows)


def _cell(df: pd.DataFrame, key: str, signed: bool = False) -> list[str]:
    return grid.ci_cells(df[key], df[f"{key}_ci_low"], df[f"{key}_ci_high"], signed)


def tables_md(summary: pd.DataFrame, per_class: pd.DataFrame) -> str:
    """The two tables of the README section, as markdown (95% bootstrap CIs in brackets)."""
    names = {"balanced_accuracy": "balanced accuracy", "macro_auc": "macro AUC"}
    overall = pd.DataFrame({"arm": summary["arm"], **{name: _cell(summary, key) for key, name in names.items()}})
    for key, name in names.items():
        if f"{key}_change" in summary:
            overall[f"{name} change vs baseline"] = _cell(summary, f"{key}_change", signed=True)
    rows = per_class[per_class["arm"] != MAJORITY_RULE]
    table = rows[rows["arm"] == "baseline"][["dx", "n_test"]].reset_index(drop=True)
    for arm, part in rows.groupby("arm", sort=False):
        part = part.reset_index(drop=True)
        table[f"{arm} recall"] = [f"{v:.2f}" for v in part["recall"]]
        table[f"{arm} F1"] = _cell(part, "f1")
        if arm != "baseline":
            table[f"{arm} F1 change"] = _cell(part, "f1_change", signed=True)
    return f"{grid.markdown(overall)}\n\n{grid.markdown(table)}\n"


@cli_main
def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", default=str(MANIFESTS / "original.csv"),
                   help="real manifest whose HAM10000 rows (with dx) every arm trains, selects and tests on")
    p.add_argument("--generator", nargs="+",
                   default=[f"{arm}={RUNS / 'generators' / run}" for arm, run in DX_GENERATORS.items()],
                   metavar="ARM=CHECKPOINT", help="generator arms: name=checkpoint conditioned on dx (default: the "
                                                  "DCGAN, DDPM and LDM that generators/train.py --target dx writes)")
    p.add_argument("--arms", nargs="+", default=None,
                   help="arms to train now (default: baseline and every --generator arm); others are only reported")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="top minority diagnoses up to this fraction of the largest class's real fit count")
    p.add_argument("--arch", default="densenet121", help="architecture (classifiers/models.py registry)")
    p.add_argument("--img-size", type=int, default=128, help="input size in pixels")
    p.add_argument("--epochs", type=int, default=6, help="epochs per arm (the epoch is chosen on val)")
    p.add_argument("--epoch-size", type=int, default=6400, help="images per epoch, the same for every arm")
    p.add_argument("--limit", type=int, default=None,
                   help="train on at most this many fit images and a quarter as many val images (quick runs, tests)")
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[1],
                   help="also train the baseline with these seeds (arms baseline_seed<N>): how far an arm moves with "
                        "nothing changed but the seed, the noise floor of every other arm's change")
    p.add_argument("--work", default=str(RUNS / "seven_class"), help="runs, manifests and synthetic images")
    p.add_argument("--out", default=str(RESULTS / "seven_class"), help="tables and figures")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the arms that are done")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the CIs")
    p.add_argument("--bf16", action="store_true",
                   help="DDPM and LDM arms: sample with bf16 autocast (faster on CPUs and GPUs with bf16; recorded "
                        "with the samples, which a later run with another setting refuses to mix in)")
    add_runtime_options(p, seed=0, progress=True)
    a = p.parse_args(argv)
    if any("=" not in g for g in a.generator):
        p.error(f"--generator expects ARM=CHECKPOINT, got {a.generator}")
    generators = dict(g.split("=", 1) for g in a.generator)
    replicas = {f"baseline_seed{s}": s for s in a.noise_seeds}
    all_arms = ["baseline", *replicas, *generators]
    unknown = sorted(set(a.arms or []) - set(all_arms))
    if unknown:
        p.error(f"unknown arms {unknown}; known: {all_arms}")
    work = Path(a.work)
    device = None if a.report_only else init_device(a.device, a.threads)
    for arm in ([] if a.report_only else a.arms or all_arms):
        checkpoint = Path(generators[arm]) if arm in generators else None
        data_arm = arm if arm in generators else "baseline"  # seed replicas share the baseline's manifest
        manifest = manifest_path(work, data_arm)
        if not grid.is_done(work / arm):  # a finished arm needs neither its generator nor its samples again
            if checkpoint is not None and not checkpoint.is_file():
                sys.exit(f"error: {checkpoint}: no generator checkpoint for arm {arm!r} (see the commands above)")
            arm_manifest(Path(a.original), data_arm, checkpoint, work, a.ratio, a.seed, device, not a.no_progress,
                         a.bf16)
        train_arm(arm, manifest, work / arm, a, replicas.get(arm, a.seed), device)
    done = {arm: pd.read_csv(work / arm / "evaluation" / "predictions.csv") for arm in all_arms
            if grid.is_done(work / arm)}
    if "baseline" not in done:
        print("the baseline arm is not done yet: nothing to report")
        return None
    recipe = grid.budget(work, "baseline", ("seed",))
    for arm in done:
        if grid.budget(work, arm, ("seed",)) != recipe:
            sys.exit(f"error: arm {arm} was trained with another recipe than the baseline "
                     f"({grid.budget(work, arm, ('seed',))} vs {recipe}): not comparable")
    summary, per_class = report(done, Path(a.out), a.n_boot)
    write_rows(Path(a.out) / "fit_counts.csv", fit_counts({arm: manifest_path(work, arm) for arm in done
                                                           if arm not in replicas}).to_dict("records"))
    cols = ["arm", "balanced_accuracy", "balanced_accuracy_ci_low", "balanced_accuracy_ci_high", "macro_auc",
            "macro_auc_ci_low", "macro_auc_ci_high"]
    print(summary[cols].round(3).to_string(index=False))
    print(f"-> {a.out}")
    return summary, per_class


if __name__ == "__main__":
    main()
