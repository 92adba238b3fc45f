"""Step 4: train the architecture x configuration grid with one budget per preset, evaluating each model as it ends.

    # CPU (2 cores): the 30-model grid, about 6 hours estimated; safe to kill and run again (it resumes)
    python scripts/04_train_classifiers.py --preset cpu
    python scripts/04_train_classifiers.py --preset cpu --archs densenet121 medvit --configs original dcgan_aug
    # one GPU: the paper-scale budget
    python scripts/04_train_classifiers.py --preset full --device cuda
    # several GPUs: give each process its own architectures (and one --runs-dir); each writes the shared table
    CUDA_VISIBLE_DEVICES=0 python scripts/04_train_classifiers.py --preset full --archs densenet121 resnet50 vit &
    CUDA_VISIBLE_DEVICES=1 python scripts/04_train_classifiers.py --preset full --archs swin medvit biovit &

Each model is classifiers/train.py on <manifest-dir>/<config>.csv into <runs-dir>/<arch>_<config>_s<seed>/ with
the preset's budget (studies/presets.py), then classifiers/evaluate.py of its best (val-selected) checkpoint on
HAM10000 `test` and ISIC 2017 `val` (into <run>/evaluation/). Models already trained and evaluated are skipped, a
killed one continues from its last epoch, and after each model the table --results is rebuilt from every finished
run (studies/grid.py). Configurations are the outer loop, so every architecture's `original` comes first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from classifiers.evaluate import evaluate
from classifiers.train import TrainConfig
from data.config import Runtime
from data.manifest import read_manifest
from data.paths import MANIFESTS, RESULTS, RUNS
from data.runtime import add_runtime_options, cli_main, pick_device, setup_cpu
from studies import grid
from studies.presets import PRESETS


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="budget and default grid (studies/presets.py)")
    p.add_argument("--archs", nargs="+", default=None, help="architectures (default: the preset's)")
    p.add_argument("--configs", nargs="+", default=None, help="dataset configurations (default: the preset's)")
    p.add_argument("--manifest-dir", default=str(MANIFESTS), help="folder of <config>.csv")
    p.add_argument("--runs-dir", default=str(RUNS / "classifiers"), help="one run folder per model here")
    p.add_argument("--results", default=str(RESULTS / "models_evaluation" / "grid_evaluation.csv"),
                   help="evaluation table of every finished model (rebuilt after each model)")
    add_runtime_options(p, seed=0, progress=True)
    a = p.parse_args(argv)
    cls = PRESETS[a.preset]["classifier"]
    archs, configs = a.archs or cls["archs"], a.configs or cls["configs"]
    device = pick_device(a.device)
    if device.type == "cpu":
        setup_cpu(a.threads)
    runs, results = Path(a.runs_dir).resolve(), Path(a.results)
    rt = Runtime.from_args(a)
    try:
        for config in configs:
            manifest = Path(a.manifest_dir).resolve() / f"{config}.csv"
            eval_df = grid.select_eval_sets(read_manifest(manifest), grid.EVAL_GROUPS)
            for arch in archs:
                name = grid.run_name(arch, config, a.seed)
                run = runs / name
                cfg = TrainConfig(arch=arch, config=config, manifest=str(manifest), out=str(run), seed=a.seed,
                                  **cls["budget"])
                metrics = grid.train_and_evaluate(
                    cfg, rt, lambda: evaluate([str(run / "best.safetensors")], eval_df, run / "evaluation", device,
                                     model_name=name, plot=False), name)
                if metrics is None:
                    continue
                table = grid.collect(runs, results)
                shown = metrics[metrics["model"] == name]
                print(shown[["dataset", "split", "n", "auc", "auc_ci_low", "auc_ci_high", "sensitivity",
                             "specificity"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
                print(f"{results}: {table['run'].nunique()} models", flush=True)
    except (grid.GridError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    grid.collect(runs, results)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
