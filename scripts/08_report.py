"""Step 8: the grid report: per-model metrics, AUC heatmap, AUC change per augmentation, confusion matrices, Grad-CAM.

    # CPU: a few minutes for 30 models (Grad-CAM is most of it; --gradcam-per-group 0 skips it)
    python scripts/08_report.py
    python scripts/08_report.py --results-dir /tmp/smoke/results --runs-dir /tmp/smoke/runs/classifiers
    # one GPU: add --device cuda (only Grad-CAM uses it). Several GPUs: not worth it.

Reads every finished model in <runs-dir> (rebuilding <results-dir>/models_evaluation/grid_evaluation.csv from
their evaluation/metrics.csv, as step 4 does after each model), their predictions.csv and best.safetensors. A model
is compared with its `original` twin only when both were trained with the same budget. Writes to <results-dir>:
- models_evaluation/grid_metrics.csv: one row per model (and the all-malignant baseline): AUC with its bootstrap
  95% CI, sensitivity and specificity at the threshold chosen on `val`, on HAM10000 `test` and ISIC 2017 `val`;
- models_evaluation/grid_auc_heatmap.png: AUC, architecture x configuration;
- models_evaluation/auc_change_vs_original.csv and .png: for each augmentation, AUC(augmented) - AUC(original) on
  the same images with a paired bootstrap 95% CI, per architecture and averaged over architectures;
- models_evaluation/seed_noise.csv (with --seeds-dir): grid models retrained with another training seed against
  their twins, the same paired change: how far a change moves with nothing changed but the seed;
- models_evaluation/grid_report.md: the command, the per-model table, AUC as architecture x configuration per
  evaluation set, the changes and the noise floor;
- confusion_matrices/<model>.png and gradcam_outputs/<model>_ham10000_test.png.
Nothing is chosen here: thresholds come from each checkpoint's sidecar (chosen on `val` during training).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from data.atomic import atomic_write_csv
from data.paths import RESULTS, ROOT, RUNS
from data.runtime import add_runtime_options, cli_main, pick_device, setup_cpu
from studies import grid


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(RESULTS), help="writes every output under it")
    p.add_argument("--runs-dir", default=str(RUNS / "classifiers"), help="the grid's run folders (step 4)")
    p.add_argument("--seeds-dir", default=None,
                   help="grid models retrained with another --seed (step 4 with its own --runs-dir): reported against "
                        "their twins as the noise floor of the changes (seed_noise.csv)")
    p.add_argument("--gradcam-per-group", type=int, default=6,
                   help="Grad-CAM images per outcome (TP, FN, FP) in each gallery; 0 skips the galleries")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the paired AUC differences")
    add_runtime_options(p, seed=0)
    a = p.parse_args(argv)
    results, runs = Path(a.results_dir), Path(a.runs_dir)
    if not runs.is_dir():
        sys.exit(f"error: {runs} not found: run step 4 (scripts/04_train_classifiers.py) first")
    device = pick_device(a.device)
    if device.type == "cpu":
        setup_cpu(a.threads)
    out = results / "models_evaluation"
    try:
        table = grid.grid_table(grid.collect(runs, out / "grid_evaluation.csv"))
        atomic_write_csv(out / "grid_metrics.csv", table)
        grid.auc_heatmap(table, out / "grid_auc_heatmap.png")
        changes = grid.auc_changes(table, runs, a.n_boot, a.seed)
        atomic_write_csv(out / "auc_change_vs_original.csv", changes)
        seeds = grid.seed_changes(table, runs, Path(a.seeds_dir), a.n_boot, a.seed) if a.seeds_dir else None
        if seeds is not None:
            atomic_write_csv(out / "seed_noise.csv", seeds)
        if len(changes):
            grid.auc_change_plot(changes, out / "auc_change_vs_original.png", seeds)
        grid.confusion_matrix_pngs(table, runs, results / "confusion_matrices")
        if a.gradcam_per_group:
            grid.gradcam_galleries(table, runs, results / "gradcam_outputs", a.gradcam_per_group, device)
    except (grid.GridError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    command = "python scripts/08_report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    grid.write_report(out / "grid_report.md", command.strip().replace(f"{ROOT}/", ""), table, changes, seeds)
    print(grid.markdown(grid.summary(table)))
    print(f"wrote {out}/grid_metrics.csv, grid_auc_heatmap.png, auc_change_vs_original.csv, grid_report.md; "
          f"{results / 'confusion_matrices'}; {results / 'gradcam_outputs'}")
    return table


if __name__ == "__main__":
    main()
