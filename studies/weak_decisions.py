"""Weak decisions: the cases the classifier is unsure about, how often it is wrong there, and what TTA and the
VAE rescue do to them.

    python studies/weak_decisions.py                     # shipped models, HAM10000 test and ISIC 2017 val
    python studies/weak_decisions.py --classifier runs/classifiers/x/best.safetensors --band 0.4 0.6
    # GPU: add --device cuda. One process is plenty: the work is a few thousand forward passes.

Two bands are reported for every evaluation set: the fixed band LOW < P(malignant) < HIGH (default 0.45-0.55), and
the band of the same width around the classifier's own val-chosen threshold, which is where its decisions are
actually close (a threshold of 0.36 puts 0.5 well inside the malignant side). For each band: how many cases, their
error rate against the rest (decisions at the val threshold), how many leave the band or change decision under flip
TTA, and how many the VAE rescue turns malignant (and how many of those are malignant). Outputs in --out:
weak_decisions.csv (one row per set and band), weak_cases.csv (every case in either band), probability_bands.png
(the score histogram with the bands) and weak_gallery.png (Grad-CAM of the weak cases of the first set).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from anomaly_detection.hybrid import HybridPredictor, rescue
from classifiers.evaluate import check_no_training_overlap, training_manifest
from classifiers.gradcam import gradcam_map, overlay
from classifiers.predict import predict_proba
from classifiers.shipped import resolve_classifier
from data.atomic import write_rows
from data.cache import CachedImages
from data.checkpoint import CheckpointError
from data.manifest import read_manifest
from data.paths import CHECKPOINTS, RESULTS
from data.runtime import add_runtime_options, cli_main, init_device
from evaluation.plots import save_figure
from studies import grid
from studies.evaluate_hybrid import score_split


def score(predictor: HybridPredictor, df: pd.DataFrame, device) -> pd.DataFrame:
    """P(malignant) without and with flip TTA, VAE score, and the three decisions, per decodable row."""
    scored = score_split(predictor, df)
    images = CachedImages(df, predictor.cls_prep.size, predictor.cls_prep.rule).images
    tta = predict_proba(predictor.classifier.to(device), images, predictor.cls_prep, device, tta=True)[:, 1]
    decisions = rescue(scored["prob_malignant"], scored["vae_score"], predictor.malignant_threshold,
                       predictor.anomaly_threshold)
    return scored.assign(prob_tta=tta, pred=decisions["pred_classifier"], rescued=decisions["rescued"],
                         pred_tta=tta >= predictor.malignant_threshold)


def band_row(part: pd.DataFrame, name: str, low: float, high: float, set_name: str) -> dict:
    inside = part["prob_malignant"].between(low, high, inclusive="neither")
    wrong = part["pred"] != part["y"].astype(bool)
    weak = part[inside]
    return {
        "set": set_name, "band": name, "low": low, "high": high, "n": len(part), "n_in_band": int(inside.sum()),
        "share_in_band": float(inside.mean()),
        "error_rate_in_band": float(wrong[inside].mean()) if inside.any() else float("nan"),
        "error_rate_outside": float(wrong[~inside].mean()),
        "left_band_under_tta": int((~weak["prob_tta"].between(low, high, inclusive="neither")).sum()),
        "decision_changed_by_tta": int((weak["pred_tta"] != weak["pred"]).sum()),
        "error_rate_in_band_with_tta": float((weak["pred_tta"] != weak["y"].astype(bool)).mean())
        if len(weak) else float("nan"),
        "rescued_by_vae": int(weak["rescued"].sum()),
        "rescued_and_malignant": int((weak["rescued"] & (weak["y"] == 1)).sum()),
    }


def histogram(sets: dict[str, pd.DataFrame], bands: dict[str, tuple[float, float]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.6), squeeze=False)
    for ax, (name, part) in zip(axes[0], sets.items()):
        bins = np.linspace(0, 1, 41)
        for y, label in ((0, "benign"), (1, "malignant")):
            ax.hist(part.loc[part["y"] == y, "prob_malignant"], bins=bins, alpha=0.6, label=label, density=True)
        for (band, (low, high)), colour in zip(bands.items(), ("grey", "orange")):
            ax.axvspan(low, high, color=colour, alpha=0.25, label=band)
        ax.set_title(name)
        ax.set_xlabel("P(malignant)")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def gallery(predictor: HybridPredictor, weak: pd.DataFrame, n: int, path: Path) -> Path:
    rows = weak.head(n)
    cols = min(4, max(1, len(rows)))
    fig, axes = plt.subplots(-(-len(rows) // cols) or 1, cols, figsize=(3 * cols, 3.3 * (-(-len(rows) // cols) or 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows.itertuples()):
        image = predictor.cls_prep.pixels(r.path)
        ax.imshow(overlay(image, gradcam_map(predictor.classifier, predictor.cls_meta, image)))
        ax.set_title(f"{r.label}\nP={r.prob_malignant:.2f} TTA={r.prob_tta:.2f}\nVAE {r.vae_score:.3f}"
                     f"{' rescued' if r.rescued else ''}", fontsize=8)
    fig.suptitle(f"weak decisions ({len(weak)} in the band; Grad-CAM of the malignant log-odds)")
    return save_figure(fig, path)


@cli_main
def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None,
                   help="classifier checkpoint or shipped name (default: the shipped default); its threshold decides")
    p.add_argument("--vae", default=str(CHECKPOINTS / "convvae.safetensors"), help="calibrated VAE")
    p.add_argument("--manifest", default=None, help="manifest CSV (default: the classifier's training manifest)")
    p.add_argument("--band", type=float, nargs=2, default=(0.45, 0.55), metavar=("LOW", "HIGH"),
                   help="the fixed band of weak decisions")
    p.add_argument("--gallery", type=int, default=16, help="weak cases shown with Grad-CAM (0: no gallery)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per set (quick checks)")
    p.add_argument("--out", default=str(RESULTS / "weak_decisions"), help="output folder")
    add_runtime_options(p)
    a = p.parse_args(argv)
    a.classifier = resolve_classifier(a.classifier)
    device = init_device(a.device, a.threads)
    try:
        predictor = HybridPredictor(a.classifier, a.vae, device)
        df = read_manifest(a.manifest or training_manifest(predictor.cls_meta))
        check_no_training_overlap(predictor.cls_meta, grid.select_eval_sets(df, grid.EVAL_GROUPS))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    out = Path(a.out)
    half = (a.band[1] - a.band[0]) / 2
    t = predictor.malignant_threshold
    bands = {f"{a.band[0]:.2f}-{a.band[1]:.2f}": tuple(a.band),
             f"threshold {t:.2f} +- {half:.2f}": (t - half, t + half)}
    sets, rows, weak_cases = {}, [], []
    for prefix, s in grid.EVAL_SETS.items():
        part = grid.select_eval_sets(df, [s["group"]])
        if a.limit:
            part = part.sample(n=min(a.limit, len(part)), random_state=0)
        sets[prefix] = scored = score(predictor, part, device)
        for band, (low, high) in bands.items():
            rows.append(band_row(scored, band, low, high, prefix))
            inside = scored["prob_malignant"].between(low, high, inclusive="neither")
            weak_cases.append(scored[inside].assign(set=prefix, band=band))
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "weak_decisions.csv", table.to_dict("records"))
    cases = pd.concat(weak_cases)[["set", "band", "path", "label", "prob_malignant", "prob_tta", "vae_score", "pred",
                                   "pred_tta", "rescued"]]
    write_rows(out / "weak_cases.csv", cases.to_dict("records"))
    written = [out / "weak_decisions.csv", out / "weak_cases.csv",
               histogram(sets, bands, out / "probability_bands.png")]
    first = next(iter(sets))
    weak = cases[(cases["set"] == first) & (cases["band"] == next(iter(bands)))]
    if a.gallery and len(weak):
        written.append(gallery(predictor, weak, a.gallery, out / "weak_gallery.png"))
    print(table[["set", "band", "n", "n_in_band", "error_rate_in_band", "error_rate_outside",
                 "decision_changed_by_tta", "rescued_by_vae", "rescued_and_malignant"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    return written


if __name__ == "__main__":
    main()
