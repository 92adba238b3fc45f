"""Did a classifier trained with synthetic images learn what synthetic images look like? Scores its best checkpoint
on images it was trained on, and compares, class by class, how often it gets the real ones right against the
synthetic ones.

    # CPU (about a minute for 200 images per class and source)
    python studies/fit_probe.py --run runs/seven_class/ddpm --out results/seven_class/fit_probe_ddpm.csv
    # one GPU: the same with --device cuda; several GPUs: one process per run

Why: if a generator's samples are easy to tell from real images (textures rather than lesions), a classifier can
fit its synthetic images of a class by their look alone. It then gets them right while it still gets the real images
of that class wrong, and on real test images it falls back on the classes that had real images only (in the
seven-class experiment, nv). Recall on real and on synthetic fit images of the same class, side by side, shows it.
Both were seen in training, so these are fit recalls, not held-out ones: what matters is the gap between them, and
the real rows against a baseline's. CIs are exact (Clopper-Pearson) 95% intervals.

Reads the run's best.safetensors and the manifest it was trained on (found by its recorded sha256, or --manifest,
which must match it), samples up to --per-class `fit` images of every class from each source (real, synthetic),
decides each by the checkpoint's own rule (a benign/malignant model's val-chosen threshold, a seven-class model's
argmax), and writes the CSV (class, source, n, recall with an exact 95% CI, the class predicted most often and its
share) and a bar plot beside it (.png). A run without synthetic images (a baseline) gets its real rows only: the
reference for how well the same recipe fits real images of each class when nothing synthetic is there.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from classifiers.evaluate import recorded_training_manifest
from classifiers.models import load_classifier
from classifiers.predict import decisions, predict_proba
from data.atomic import write_rows
from data.cache import CachedImages
from data.checkpoint import read_sidecar
from data.manifest import file_sha256, read_manifest
from data.runtime import add_runtime_options, cli_main, init_device
from data.transforms import Preprocess
from evaluation import plots
from evaluation.metrics import proportion_ci


def probe_rows(fit: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Up to `per_class` fit rows of every (class, real or synthetic) pair, drawn with `seed`."""
    fit = fit.assign(origin=np.where(fit["source"] == "real", "real", "synthetic"))
    shuffled = fit.sample(frac=1, random_state=seed)
    picked = shuffled.groupby(["target", "origin"]).head(per_class)
    return picked.sort_values(["target", "origin"]).reset_index(drop=True)


def recall_by_origin(rows: pd.DataFrame, predicted: np.ndarray) -> pd.DataFrame:
    """Recall (the share predicted as its own class) per (class, origin), with an exact 95% CI, and the class
    predicted most often for those images (where the misses go; ties go to the first in name order)."""
    out = []
    for (target, origin), idx in rows.groupby(["target", "origin"], sort=False).indices.items():
        hits = int((predicted[idx] == target).sum())
        lo, hi = proportion_ci(hits, len(idx))
        counts = pd.Series(predicted[idx]).value_counts().sort_index(kind="stable").sort_values(
            ascending=False, kind="stable")
        out.append({"class": target, "source": origin, "n": len(idx), "recall": hits / len(idx),
                    "recall_ci_low": lo, "recall_ci_high": hi, "predicted_most": counts.index[0],
                    "predicted_most_share": counts.iloc[0] / len(idx)})
    return pd.DataFrame(out)


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder with best.safetensors (classifiers/train.py --out)")
    p.add_argument("--manifest", default=None,
                   help="the manifest the run was trained on (default: found by the sha256 its checkpoint records)")
    p.add_argument("--out", required=True, help="CSV to write; the bar plot goes beside it (.png)")
    p.add_argument("--per-class", type=int, default=200, help="fit images per class and source (real, synthetic)")
    add_runtime_options(p, seed=0)
    a = p.parse_args(argv)
    checkpoint = Path(a.run) / "best.safetensors"
    if not checkpoint.is_file():
        p.error(f"{checkpoint}: not found (is --run a finished classifiers/train.py run?)")
    meta = read_sidecar(checkpoint)
    manifest = Path(a.manifest) if a.manifest else recorded_training_manifest(meta)
    if not meta.get("manifest_sha256"):
        p.error(f"{checkpoint} records no manifest sha256: cannot tell which images it was trained on")
    if manifest is None or not manifest.is_file() or file_sha256(manifest) != meta["manifest_sha256"]:
        p.error(f"{a.manifest or meta.get('manifest')}: not the manifest {checkpoint} was trained on (its sha256 "
                f"differs, or it is not here); pass that manifest with --manifest")
    device = init_device(a.device, a.threads)
    model, meta = load_classifier(checkpoint, classes=tuple(meta["class_names"]))
    target = meta.get("target", "label")
    fit = read_manifest(manifest).query("split == 'fit'").assign(target=lambda d: d[target])
    rows = probe_rows(fit, a.per_class, a.seed)
    data = CachedImages(rows, meta["input_size"], meta["resize"], target=target)
    probs = predict_proba(model.to(device), data.images, Preprocess.from_meta(meta), device)
    table = recall_by_origin(data.df, decisions(probs, meta))
    out = Path(a.out)
    write_rows(out, table.round(4).to_dict("records"))
    plots.grouped_bars(table, "class", "source", "recall", out.with_suffix(".png"),
                       f"{Path(a.run).name}\nrecall on its own fit images (exact 95% CI)")
    print(table.round(3).to_string(index=False))
    print(f"-> {out}, {out.with_suffix('.png')}")
    return table


if __name__ == "__main__":
    main()
