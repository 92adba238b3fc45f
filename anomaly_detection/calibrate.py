"""Calibrate the VAE's anomaly threshold on calibration splits and store it in the VAE's sidecar.

    python anomaly_detection/calibrate.py --vae checkpoints/convvae.safetensors --manifest data/manifests/mixed.csv
    python anomaly_detection/calibrate.py --vae runs/vae/best.safetensors          # one source: HAM10000 calib
    python anomaly_detection/calibrate.py --vae X.safetensors --rule youden --device cuda

Four candidate thresholds are computed on the calibration rows and recorded; `--rule` says which one the hybrid uses:
- `source_percentile` (the default when the manifest's `calib`/`val` rows come from several sources, by its
  `dataset` column, as in mixed.csv): the largest, over sources, of each source's 0.98 quantile of BENIGN `calib` +
  `val` scores, the rule of the feature detector (anomaly_detection/feature_detector.py). The rescue then flags at
  most 2% of every source's benign calibration images, so a camera whose images the VAE reconstructs worse does not
  turn its benign lesions malignant.
- `benign_percentile` (the old rule; the default otherwise, e.g. original.csv, whose ISIC 2017 rows are all
  `external`): the 95th percentile of benign `calib` scores, pooled; it can flag at most about 5% of the benign
  lesions of the source it was calibrated on.
- `youden` and `target_sensitivity`, on the same rows.
The calibration rows (`calib`, plus `val` for `source_percentile`) are disjoint from the VAE's training images
(benign `fit`); `test` and `external` are never read. Outputs in --out: calib_scores.csv, histogram, ROC/PR PNGs
and calibration.json (with AUC and the specificity at the chosen threshold per source); the sidecar gets
`anomaly_threshold`, the rule, all candidates, the per-source thresholds and the benign score quantiles of the
calibration rows (used to warn on out-of-distribution input). `--score-region` changes where the score is measured
(the central disc or the whole image, anomaly_detection/vae.py) and stores it in the sidecar with the threshold it
was calibrated for.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_detection.feature_detector import BENIGN_QUANTILE, CALIBRATION_SPLITS, benign_percentile_threshold
from anomaly_detection.hybrid import load_vae
from anomaly_detection.train_vae import score_images
from anomaly_detection.vae import SCORE_REGIONS, score_description
from data.atomic import atomic_write_csv
from data.cache import CachedImages
from data.checkpoint import CheckpointError, read_sidecar, write_sidecar
from data.manifest import read_manifest
from data.paths import MANIFESTS, RESULTS, RUNS
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from data.transforms import Preprocess
from evaluation import plots
from evaluation.metrics import auc_ci, choose_threshold, decision_metrics

SOURCE_RULE = "source_percentile"
RULES = (SOURCE_RULE, "benign_percentile", "youden", "target_sensitivity")
NEVER_CALIBRATE_ON = ("test", "external")


def manifest_sources(df: pd.DataFrame) -> np.ndarray:
    """Each row's image source: the manifest's `dataset` column, or one source for a manifest without it."""
    return df["dataset"].astype(str).to_numpy() if "dataset" in df.columns else np.full(len(df), "all")


def default_rule(df: pd.DataFrame) -> str:
    """SOURCE_RULE when the manifest's calibration rows (calib, val) come from several sources."""
    calibration = df[df["split"].isin(CALIBRATION_SPLITS)]
    return SOURCE_RULE if len(np.unique(manifest_sources(calibration))) > 1 else "benign_percentile"


def candidate_thresholds(y: np.ndarray, scores: np.ndarray, sources: np.ndarray, split: str,
                         target_sensitivity: float, benign_percentile: float,
                         source_quantile: float) -> tuple[dict[str, float], dict[str, float]]:
    """Every rule's threshold on these rows, and the per-source thresholds behind `source_percentile`."""
    benign = y == 0
    per_source_max, per_source = benign_percentile_threshold(scores[benign], sources[benign], source_quantile)
    return {SOURCE_RULE: per_source_max,
            "benign_percentile": choose_threshold(y, scores, "benign_percentile", split, benign_percentile),
            "youden": choose_threshold(y, scores, "youden", split),
            "target_sensitivity": choose_threshold(y, scores, "target_sensitivity", split, target_sensitivity),
            }, per_source


def per_source_metrics(y: np.ndarray, scores: np.ndarray, sources: np.ndarray, threshold: float,
                       source_thresholds: dict[str, float]) -> dict[str, dict]:
    """AUC (95% CI) and the decision metrics at `threshold` on each source's calibration rows, and how a threshold
    calibrated on another source alone would transfer: the share of this source's benign rows at or above it."""
    out = {}
    for source in np.unique(sources):
        rows = sources == source
        entry: dict[str, object] = {"n": int(rows.sum()), "n_malignant": int(y[rows].sum())}
        if 0 < y[rows].sum() < rows.sum():
            a_auc, lo, hi = auc_ci(y[rows], scores[rows])
            entry.update(auc=a_auc, auc_ci=[lo, hi])
        entry["at_threshold"] = decision_metrics(y[rows], scores[rows] >= threshold)
        benign = scores[rows & (y == 0)]
        entry["benign_flagged_by_other_source_threshold"] = {
            other: float(np.mean(benign >= t)) for other, t in source_thresholds.items() if other != str(source)}
        out[str(source)] = entry
    return out


def store_in_sidecar(vae_path: str, calibration: dict) -> None:
    """The score region and the chosen threshold (with every candidate) go into the VAE's sidecar together."""
    sidecar = read_sidecar(vae_path)
    sidecar["arch_kwargs"]["score_region"] = calibration["score_region"]
    sidecar.update({"score": score_description(calibration["score_region"]),
                    "anomaly_threshold": calibration["anomaly_threshold"],
                    "anomaly_threshold_rule": calibration["rule"], "anomaly_threshold_split": calibration["split"],
                    "anomaly_threshold_manifest": Path(calibration["manifest"]).name,
                    "anomaly_threshold_candidates": calibration["thresholds"],
                    "anomaly_threshold_per_source": calibration["source_thresholds"],
                    "calib_benign_score_quantiles": calibration["benign_score_quantiles"]})
    sidecar.setdefault("metrics", {})[calibration["split"]] = {"auc": calibration["auc"],
                                                               "auc_ci": calibration["auc_ci"]}
    write_sidecar(vae_path, sidecar)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(RUNS / "vae" / "best.safetensors"), help="VAE checkpoint")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--split", default=None,
                   help="comma-separated splits to calibrate on (never test or external); default: "
                        f"{'+'.join(CALIBRATION_SPLITS)} for {SOURCE_RULE}, calib for the other rules")
    p.add_argument("--rule", default=None, choices=RULES,
                   help=f"which candidate becomes anomaly_threshold; default: {SOURCE_RULE} when the manifest's "
                        "calib/val rows come from several sources (its `dataset` column), else benign_percentile "
                        "(the old rule)")
    p.add_argument("--source-quantile", type=float, default=BENIGN_QUANTILE,
                   help=f"per-source benign quantile for the {SOURCE_RULE} rule")
    p.add_argument("--target-sensitivity", type=float, default=0.5, help="target for the target_sensitivity rule")
    p.add_argument("--benign-percentile", type=float, default=0.95, help="quantile for the benign_percentile rule")
    p.add_argument("--score-region", default=None, choices=SCORE_REGIONS,
                   help="where the VAE score averages |x - x_hat| (central disc or whole image), stored in the sidecar "
                        "with the threshold; default: the checkpoint's")
    p.add_argument("--keep-sidecar", action="store_true",
                   help="write the outputs in --out but leave the checkpoint's sidecar as it is (to compare rules or "
                        "score regions)")
    p.add_argument("--out", default=str(RESULTS / "vae_calibration"), help="output folder")
    add_runtime_options(p)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    try:
        vae, meta = load_vae(a.vae)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    vae.score_region = a.score_region or vae.score_region
    df = read_manifest(a.manifest)
    rule = a.rule or default_rule(df)
    splits = a.split.split(",") if a.split else list(CALIBRATION_SPLITS if rule == SOURCE_RULE else ["calib"])
    if forbidden := sorted(set(splits) & set(NEVER_CALIBRATE_ON)):
        raise UserError(f"refusing to calibrate on {forbidden}: use calib and/or val")
    split = "+".join(splits)
    data = CachedImages(df[df["split"].isin(splits)], meta["input_size"], meta["resize"])
    if not len(data):
        raise UserError(f"{a.manifest}: no decodable rows in split(s) {split}")
    y = data.targets.numpy()
    sources = manifest_sources(data.df)
    scores = score_images(vae, data.images, Preprocess.from_meta(meta), device)
    thresholds, source_thresholds = candidate_thresholds(y, scores, sources, split, a.target_sensitivity,
                                                         a.benign_percentile, a.source_quantile)
    chosen = thresholds[rule]
    a_auc, lo, hi = auc_ci(y, scores)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "calib_scores.csv",
                     data.df[["path", "label", "split"]].assign(source=sources, vae_score=scores))
    plots.score_histogram(y, scores, out / "calib_score_histogram.png", chosen,
                          f"VAE anomaly score (mean |x - x_hat|, {vae.score_region})",
                          f"{split}: benign vs malignant")
    plots.roc_pr({"VAE score": (y, scores)}, out / "calib_roc_pr.png", split)
    benign = scores[y == 0]
    calibration = {
        "manifest": str(a.manifest), "split": split, "n": int(len(y)), "n_malignant": int(y.sum()), "auc": a_auc,
        "auc_ci": [lo, hi], "thresholds": thresholds, "source_thresholds": source_thresholds,
        "source_quantile": a.source_quantile, "rule": rule, "anomaly_threshold": chosen,
        "at_threshold": {name: decision_metrics(y, scores >= t) for name, t in thresholds.items()},
        "per_source": per_source_metrics(y, scores, sources, chosen, source_thresholds),
        "benign_score_quantiles": {q: float(np.quantile(benign, float(q))) for q in ("0.5", "0.95", "0.99", "1.0")},
        "score_region": vae.score_region, "vae": str(a.vae)}
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    print(f"VAE ({vae.score_region} score) on {split}: AUC {a_auc:.3f} (95% CI {lo:.3f}-{hi:.3f}); thresholds "
          + ", ".join(f"{k} {v:.5f}" for k, v in thresholds.items()) + f"; using {rule} = {chosen:.5f}")
    for source, entry in calibration["per_source"].items():
        transfer = "".join(f", {rate:.3f} of benign over {other}'s own threshold"
                           for other, rate in entry["benign_flagged_by_other_source_threshold"].items())
        print(f"  {source}: n {entry['n']}, specificity at {chosen:.5f}: {entry['at_threshold']['specificity']:.3f}, "
              f"sensitivity {entry['at_threshold']['sensitivity']:.3f}{transfer}")
    if not a.keep_sidecar:
        store_in_sidecar(a.vae, calibration)
    return calibration


if __name__ == "__main__":
    main()
