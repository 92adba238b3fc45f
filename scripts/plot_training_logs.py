"""Redraw the training curves (loss and val AUC per epoch) of the committed training logs in results/.

Every training entry point draws its own curves.png as it runs; this redraws them for the logs kept in results/
(the shipped classifiers' logs in results/classifier_training/, the VAE's in results/vae_training/), so each
committed log has its picture beside it.

    python scripts/plot_training_logs.py            # CPU, seconds; no GPU or cluster involved
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from data.paths import RESULTS
from evaluation import plots

LOGS = {"classifier_training/*_metrics.csv": "{stem}: training log of the shipped run",
        "vae_training/losses.csv": "ConvVAE: training log of the shipped run"}


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(RESULTS), help="the results folder holding the logs")
    a = p.parse_args(argv)
    written = []
    for pattern, title in LOGS.items():
        for log in sorted(Path(a.results_dir).glob(pattern)):
            stem = log.stem.removesuffix("_metrics")
            png = log.with_name(f"{stem}_curves.png" if log.stem.endswith("_metrics") else "curves.png")
            written.append(plots.training_curves(pd.read_csv(log).to_dict("records"), png,
                                                 title=title.format(stem=stem)))
            print(f"{log} -> {png}")
    if not written:
        p.error(f"no training logs under {a.results_dir}")
    return written


if __name__ == "__main__":
    main()
