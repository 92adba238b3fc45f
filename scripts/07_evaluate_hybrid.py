"""Step 7: compare the classifier alone, the VAE rescue and their honest competitors on held-out data.

    # CPU: a few minutes (HAM10000 test + ISIC 2017 at 128 px)
    python scripts/07_evaluate_hybrid.py                              # the grid's densenet121_original_s0 + runs/vae
    python scripts/07_evaluate_hybrid.py --classifier runs/classifiers/resnet50_original_s0/best.safetensors
    # one GPU: add --device cuda. Several GPUs: nothing here is worth spreading.

studies/evaluate_hybrid.py (which documents the rules compared) with the pipeline's inputs as defaults:
the classifier from step 4 and the calibrated VAE from steps 5 and 6, rather than the shipped checkpoints.
"""
from __future__ import annotations

import argparse

import pandas as pd

from data.paths import MANIFESTS, RESULTS, RUNS
from data.runtime import add_runtime_options, cli_main, runtime_argv
from studies import evaluate_hybrid


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=str(RUNS / "classifiers" / "densenet121_original_s0" /
                                               "best.safetensors"), help="classifier checkpoint (step 4)")
    p.add_argument("--vae", default=str(RUNS / "vae" / "best.safetensors"),
                   help="VAE checkpoint with its calibrated anomaly_threshold (steps 5 and 6)")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--out", default=str(RESULTS / "hybrid"), help="output folder")
    add_runtime_options(p)
    a = p.parse_args(argv)
    return evaluate_hybrid.main(["--classifier", a.classifier, "--vae", a.vae, "--manifest", a.manifest,
                                 "--out", a.out, *runtime_argv(a)])


if __name__ == "__main__":
    main()
