"""Step 9: domain-robust training across image sources, the cross-dataset matrix and the ablation.

    # CPU (2 cores): every run below, one after another (about 5 hours on 1 thread); resumable
    python scripts/09_generalisation.py --threads 1
    # two CPU processes side by side (1 thread each), then the report once both are done
    python scripts/09_generalisation.py --runs long/light short/isic_only --threads 1 &
    python scripts/09_generalisation.py --runs short/full short/no_color_constancy --threads 1 &
    python scripts/09_generalisation.py --report-only
    # one GPU: the same runs, faster; several GPUs: give each process its own --runs
    python scripts/09_generalisation.py --device cuda

Every run trains DenseNet-121 on data/manifests/mixed.csv (HAM10000 fit + ISIC 2017 train-fit; val = HAM10000 val
+ ISIC 2017 train-val; ISIC 2017 val is a held-out test) with RECIPE and the run's changes, selects the epoch on the
mean of the two sources' val AUCs, and is evaluated on HAM10000 test and ISIC 2017 val. `long/light` has the full
budget; the `short/` runs share a smaller one so that the ablation (one technique off per row) and the cross-dataset
matrix (train on HAM10000, ISIC 2017 or both) compare like with like. Finished runs are skipped, killed runs resume.
The report writes results/generalisation/: cross_dataset.csv/.png, ablation.csv/.png, ensemble.csv and runs.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from classifiers.evaluate import evaluate
from classifiers.train import TrainConfig
from data import paths
from data.checkpoint import CheckpointError
from data.config import Runtime, config_changes
from data.manifest import read_manifest, stratified_subset
from data.runtime import add_runtime_options, cli_main, pick_device, setup_cpu
from studies import cross_dataset, grid
from studies.recipes import LIGHT_AUGMENTATION, LONG_LIGHT, RECIPE

SHORT = {"epochs": 4, "patience": 4}
RUNS: dict[str, dict] = {
    "long/light": LONG_LIGHT,
    "short/full": SHORT,
    "short/light": {**SHORT, **LIGHT_AUGMENTATION},
    "short/no_color_constancy": {**SHORT, "color_constancy": "none"},
    "short/no_balance": {**SHORT, "balance": "none", "class_weights": "sqrt"},
    "short/no_strong_crop": {**SHORT, "crop_scale": 0.6},
    "short/no_strong_jitter": {**SHORT, "jitter": 0.2},
    "short/no_cutout": {**SHORT, "cutout": 0.0},
    "short/no_occlusion": {**SHORT, "occlusion": 0.0},
    "short/ham_only": {**SHORT, "datasets": ["ham10000"]},
    "short/isic_only": {**SHORT, "datasets": ["isic2017"]},
    "short/size192": {**SHORT, "img_size": 192},
    # The reference again with another training seed: how far a change can move with no technique changed.
    "short/full_seed1": {**SHORT, "seed": 1},
}
MATRIX = {"ham10000": "short/ham_only", "isic2017": "short/isic_only", "both": "short/full"}
ABLATION_REFERENCE = "short/full"
ABLATION = {  # row label -> run; each row switches one technique of the reference off (or, for size, changes it)
    "no colour constancy": "short/no_color_constancy",
    "no source/class balancing (uniform shuffle + sqrt class weights)": "short/no_balance",
    "weak crop (area 0.6-1 instead of 0.3-1)": "short/no_strong_crop",
    "weak colour jitter (0.2 instead of 0.4)": "short/no_strong_jitter",
    "no cutout": "short/no_cutout",
    "no vignette/ruler occlusions": "short/no_occlusion",
    "none of the four strong augmentations (crop, jitter, cutout, occlusions)": "short/light",
    "no ISIC 2017 training data (HAM10000 only)": "short/ham_only",
    "192 px instead of 128 px": "short/size192",
    "nothing (noise floor: the reference re-trained with seed 1)": "short/full_seed1",
}
TTA_RUNS = ("long/light", ABLATION_REFERENCE)  # also scored with flip TTA (evaluation_tta/)


def stale(evaluation: Path, run: Path) -> bool:
    """True when the evaluation is missing or older than the run's best checkpoint (a retrained run)."""
    predictions = evaluation / "predictions.csv"
    return not predictions.is_file() or predictions.stat().st_mtime < (run / "best.safetensors").stat().st_mtime


def train_and_evaluate(name: str, manifest: Path, runs: Path, device, rt: Runtime, seed: int,
                       changes: dict[str, Any], limit: int | None) -> None:
    run = runs / name
    cfg = TrainConfig(**{"seed": seed, **RECIPE, **RUNS[name], **changes}, config="mixed", manifest=str(manifest),
                      out=str(run), limit=limit)
    grid.train_and_evaluate(cfg, rt, lambda: evaluate(
        [str(run / "best.safetensors")], grid.eval_rows(manifest, limit, cfg.seed), run / "evaluation", device,
        model_name=name, plot=False), name)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN",
                   help=f"runs to train, in order (default all): {', '.join(RUNS)}")
    p.add_argument("--manifest", default=str(paths.MANIFESTS / "mixed.csv"),
                   help="multi-source manifest (scripts/01_prepare_data.py --mixed)")
    p.add_argument("--runs-dir", default=str(paths.RUNS / "generalisation"), help="one folder per run here")
    p.add_argument("--out", default=str(paths.RESULTS / "generalisation"), help="report folder")
    p.add_argument("--report-only", action="store_true", help="skip training; report the finished runs")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change a train.py option in every run, e.g. --set img_size=32 epochs=1 (quick checks)")
    p.add_argument("--compare", nargs="+", default=[], metavar="LABEL=CHECKPOINT",
                   help="also score these checkpoints (e.g. the model shipped before) on the same val and evaluation "
                        "sets, as extra rows of runs.csv")
    p.add_argument("--limit", type=int, default=None,
                   help="quick runs: at most this many fit images per run and images per evaluation set")
    add_runtime_options(p, seed=0, progress=True)
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if device.type == "cpu":
        setup_cpu(a.threads)
    runs, manifest = Path(a.runs_dir), Path(a.manifest)
    if not manifest.is_file():
        sys.exit(f"error: {manifest} not found; build it with python scripts/01_prepare_data.py --mixed")
    try:
        changes = config_changes(TrainConfig, a.set)
        compare = dict(item.split("=", 1) for item in a.compare)
    except ValueError as exc:
        sys.exit(f"error: --set and --compare take KEY=VALUE items ({exc})")
    rt = Runtime.from_args(a)
    try:
        if not a.report_only:
            for name in a.runs:
                train_and_evaluate(name, manifest, runs, device, rt, a.seed, changes, a.limit)
        for name in (n for n in TTA_RUNS if grid.is_done(runs / n) and stale(runs / n / "evaluation_tta", runs / n)):
            evaluate([str(runs / name / "best.safetensors")], grid.eval_rows(manifest, a.limit, a.seed),
                     runs / name / "evaluation_tta", device, tta=True, model_name=f"{name}+tta", plot=False)
        df = read_manifest(manifest)
        val = df[df["split"] == "val"]
        val = stratified_subset(val, a.limit, a.seed) if a.limit else val
        extra = [cross_dataset.checkpoint_row(label, Path(path), val, grid.eval_rows(manifest, a.limit, a.seed), device)
                 for label, path in compare.items()]
        both_sources = [n for n in RUNS if n not in (MATRIX["ham10000"], MATRIX["isic2017"])]
        written = cross_dataset.report(runs, list(RUNS), MATRIX, ABLATION, ABLATION_REFERENCE, Path(a.out),
                                       "evaluation_tta", both_sources, extra)
    except (grid.GridError, cross_dataset.ReportError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
