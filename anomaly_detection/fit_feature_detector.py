"""Fit the feature detector and the out-of-distribution gate, calibrate their thresholds, save both checkpoints.

    python anomaly_detection/fit_feature_detector.py --threads 1   # CPU: ~15 min the first time (backbone), then ~1
    python anomaly_detection/fit_feature_detector.py --device cuda  # the same files, faster

One backbone pass (ImageNet EfficientNet-Lite0, Shades of Gray, 224 px; features cached in .cache/features) serves
both models (anomaly_detection/feature_detector.py, anomaly_detection/gate.py):
- detector: a Gaussian per stage fitted on BENIGN `fit` images of every source (each source weighted equally);
  its stages (`--levels auto`) are the candidate set with the highest `val` AUC, malignant vs benign, pooled over
  sources (every candidate's AUC goes into the sidecar); anomaly_threshold = max over sources of each source's 98th
  percentile of benign `calib` + `val` scores;
- gate: the same on ALL `fit` lesions (both classes, both sources) with stages fixed in advance (gate.GATE_LEVELS),
  and a non-lesion probe trained on those lesions against data/non_lesion.py's development set (its own seed, no
  scikit-image photographs, skin crops of `fit` images), the lesion side joined by degraded copies of `fit` lesions
  (`--degraded-lesions` per source: lost resolution, sensor noise, JPEG, as the classifier's --degrade draws them, so
  that a lesion photographed by a worse camera is not learned as "not a lesion"); gate_threshold and probe_threshold =
  max over sources of each source's 99.7th percentile of `calib` + `val` lesion scores, then loosened for sources the
  gate has never seen: a gate fitted and calibrated on one source alone, applied to the other source's `calib` + `val`
  lesions, would flag many of them (a new device moves every lesion's features). The distance threshold is multiplied
  by, and the probe threshold raised by, the smallest margin at which that leave-one-source-out gate flags at most
  `--unseen-tolerance` (1%) of the unseen source's lesions, the largest over both directions (sidecar:
  `unseen_source`).
Rows of `test` and `external` are never used (their features may be computed into the shared cache, unread here).
Writes --detector and --gate (safetensors + JSON sidecar each); prints each source's calibration flag rates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anomaly_detection.feature_detector import (
    BENIGN_QUANTILE,
    LEVEL_CANDIDATES,
    STAGES,
    FeatureDetector,
    FeatureExtractor,
    Features,
    GaussianModel,
    all_stage_features,
    benign_percentile_threshold,
    calibration_rows,
    feature_spec,
    fit_rows,
    select,
    source_weights,
    upper_quantile,
)
from anomaly_detection.gate import GATE_LEVELS, GATE_QUANTILE, UNSEEN_TOLERANCE, Gate, check_constants, check_paths
from classifiers.models import PretrainedWeightsError
from data.images import ImageError, load_uint8, to_uint8
from data.manifest import file_sha256, read_manifest
from data.non_lesion import DEVELOPMENT_SEED, development_photographs, development_set
from data.paths import CHECKPOINTS, MANIFESTS
from data.runtime import add_runtime_options, cli_main, init_device
from data.transforms import degrade_acquisition
from evaluation.metrics import auc, auc_ci

DEGRADE_P = 0.5  # as the classifier's --degrade 0.5: each degradation on half the images
DEGRADED_PER_SOURCE = 400


def choose_levels(df: pd.DataFrame, features: Features, balance: bool) -> tuple[tuple[str, ...], dict[str, float]]:
    """The LEVEL_CANDIDATES entry whose benign-`fit` Gaussian has the highest `val` AUC (malignant vs benign, pooled
    over sources); returns its stages and every candidate's AUC."""
    train, val = fit_rows(df, benign_only=True), df[df["split"] == "val"]
    weights = source_weights(train["dataset"]) if balance else None
    aucs = {}
    for name, levels in LEVEL_CANDIDATES.items():
        model, _ = GaussianModel.fit({level: features[level][train.index] for level in levels}, weights)
        aucs[name] = auc(val["label"] == "malignant", model.score(select(features, val.index.to_numpy())))
    return LEVEL_CANDIDATES[max(aucs, key=aucs.get)], aucs


def fit_detector(df: pd.DataFrame, features: Features, spec: dict, quantile: float, balance: bool,
                 provenance: dict) -> FeatureDetector:
    """Benign `fit` rows -> Gaussian; benign calib/val rows -> anomaly_threshold (rule in the module docstring)."""
    train, calib = fit_rows(df, benign_only=True), calibration_rows(df, benign_only=False)
    weights = source_weights(train["dataset"]) if balance else None
    detector = FeatureDetector.fit(select(features, train.index.to_numpy()), spec, weights,
                                   trained_on="benign images of the fit split, every source",
                                   fit_counts=train["dataset"].value_counts().to_dict(), source_balanced=balance,
                                   **provenance)
    scores = detector.score(select(features, calib.index.to_numpy()))
    benign = (calib["label"] == "benign").to_numpy()
    threshold, per_source = benign_percentile_threshold(scores[benign], calib["dataset"][benign], quantile)
    y = (calib["label"] == "malignant").to_numpy()
    aucs = {str(s): list(auc_ci(y[part], scores[part])) for s in calib["dataset"].unique()
            for part in [(calib["dataset"] == s).to_numpy()]}
    detector.set_threshold(
        threshold, anomaly_threshold_rule=f"max over sources of each source's {quantile} quantile of benign scores",
        anomaly_threshold_split="calib+val", anomaly_threshold_per_source=per_source,
        calib_val_auc_malignant_vs_benign=aucs)
    return detector


def degraded_lesions(paths_by_source: dict[str, list[str]], per_source: int, size: int, rule: str,
                     seed: int = DEVELOPMENT_SEED) -> np.ndarray:
    """uint8 N x size x size x 3: `per_source` seeded `fit` lesions of each source, each of lost resolution, sensor
    noise and JPEG applied with probability DEGRADE_P (data/transforms.py degrade_acquisition, the classifier's
    --degrade)."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    chosen = [p for paths in paths_by_source.values() for p in rng.permutation(paths)[:per_source]]
    if not chosen:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(np.stack([load_uint8(p, size, rule) for p in chosen])).permute(0, 3, 1, 2)
    return degrade_acquisition(x, generator, DEGRADE_P).permute(0, 2, 3, 1).numpy()


def fit_lesion_gate(df: pd.DataFrame, features: Features, spec: dict, balance: bool, extractor: FeatureExtractor,
                    degraded_per_source: int, datasets: list[str] | None = None, **info) -> Gate:
    """A gate (Gaussian + non-lesion probe, no thresholds yet) fitted on the `fit` lesions of `datasets` (default
    every source), the probe against the development non-lesion set built from those sources' `fit` images, with
    `degraded_per_source` degraded `fit` lesions of each source on the lesion side."""
    train = fit_rows(df, benign_only=False, datasets=datasets)
    weights = source_weights(train["dataset"]) if balance else None
    train_features = select(features, train.index.to_numpy())
    gate = Gate.fit(train_features, spec, weights, fit_counts=train["dataset"].value_counts().to_dict(),
                    source_balanced=balance, **info)
    paths_by_source = {str(d): list(part["path"]) for d, part in train.groupby("dataset", sort=True)}
    items = development_set(paths_by_source)
    size, rule = spec["input_size"], spec["resize"]
    degraded = extractor(degraded_lesions(paths_by_source, degraded_per_source, size, rule))
    lesions = {level: np.r_[train_features[level], degraded[level]] for level in train_features}
    gate.fit_probe(lesions, extractor(np.stack([to_uint8(Image.fromarray(i.image), size, rule) for i in items])))
    gate.meta["probe"]["non_lesions"] = "data/non_lesion.py development_set: " + ", ".join(
        f"{k} {v}" for k, v in pd.Series([i.kind for i in items]).value_counts().sort_index().items())
    gate.meta["probe"]["photographs"] = sorted(development_photographs())
    gate.meta["probe"]["degraded_lesions"] = {"per_source": degraded_per_source, "p": DEGRADE_P,
                                              "how": "data/transforms.py degrade_acquisition on fit lesions"}
    return gate


def unseen_source_margins(df: pd.DataFrame, features: Features, spec: dict, quantile: float, balance: bool,
                          extractor: FeatureExtractor, tolerance: float, degraded_per_source: int) -> dict[str, Any]:
    """Leave-one-source-out on calib+val: a gate fitted and calibrated (`quantile`) on one source alone, applied to
    another source's calib+val lesions. The distance margin (a factor on the threshold) and the probe offset (added
    to its threshold) at which such a gate flags at most `tolerance` of the unseen source's lesions, the largest
    over all ordered pairs of sources (at least 1 and 0: the margins only ever loosen the calibrated thresholds)."""
    calib = calibration_rows(df, benign_only=False)
    calib_features = select(features, calib.index.to_numpy())
    pairs, margin, offset = {}, 1.0, 0.0
    for seen in sorted(calib["dataset"].unique()):
        gate = fit_lesion_gate(df, features, spec, balance, extractor, degraded_per_source, [seen])
        distance, probe = gate.score(calib_features), gate.probe_score(calib_features)
        own = (calib["dataset"] == seen).to_numpy()
        d_seen, p_seen = upper_quantile(distance[own], quantile), upper_quantile(probe[own], quantile)
        for unseen in sorted(set(calib["dataset"]) - {seen}):
            other = (calib["dataset"] == unseen).to_numpy()
            pair = {"distance_margin": float(np.quantile(distance[other] / d_seen, 1 - tolerance)),
                    "probe_offset": float(np.quantile(probe[other] - p_seen, 1 - tolerance)),
                    "flagged_at_calibrated_thresholds": float(np.mean((distance[other] >= d_seen) |
                                                                      (probe[other] >= p_seen)))}
            pairs[f"{seen} -> {unseen}"] = pair
            margin, offset = max(margin, pair["distance_margin"]), max(offset, pair["probe_offset"])
    return {"distance_margin": margin, "probe_offset": offset, "tolerance": tolerance, "pairs": pairs}


def fit_gate(df: pd.DataFrame, features: Features, spec: dict, quantile: float, balance: bool,
             provenance: dict, extractor: FeatureExtractor, unseen_tolerance: float,
             degraded_per_source: int) -> tuple[Gate, list]:
    """All `fit` lesions -> Gaussian; those lesions against the development non-lesion set -> probe; all calib/val
    lesions -> both thresholds, loosened by the unseen-source margins (module docstring), and the margins the cheap
    checks leave on them. Returns the gate and its verdicts on the calib/val lesions."""
    gate = fit_lesion_gate(df, features, spec, balance, extractor, degraded_per_source,
                           trained_on="all lesion images (both classes) of the fit split, every source", **provenance)
    unseen = unseen_source_margins(df, features, spec, quantile, balance, extractor, unseen_tolerance,
                                   degraded_per_source)
    calib = calibration_rows(df, benign_only=False)
    calib_features = select(features, calib.index.to_numpy())
    threshold, per_source = benign_percentile_threshold(gate.score(calib_features), calib["dataset"], quantile)
    gate.set_threshold(unseen["distance_margin"] * threshold, gate_threshold_rule=(
        f"max over sources of each source's {quantile} quantile of lesion distances, times the unseen-source margin"),
        gate_threshold_split="calib+val", gate_threshold_per_source=per_source, unseen_source=unseen)
    probe_threshold, probe_per_source = benign_percentile_threshold(gate.probe_score(calib_features),
                                                                    calib["dataset"], quantile)
    gate.set_probe_threshold(probe_threshold + unseen["probe_offset"], probe_threshold_rule=(
        f"max over sources of each source's {quantile} quantile of lesion probe scores, plus the unseen-source "
        "offset"), probe_threshold_per_source=probe_per_source)
    verdicts, spread, chroma, noise = check_paths(gate, calib_features, list(calib["path"]), spec["input_size"],
                                           spec["resize"])
    gate.meta["checks"] = check_constants(spread, chroma, noise)
    return gate, verdicts


@cli_main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=str(MANIFESTS / "mixed.csv"),
                   help="manifest with fit/val/calib splits and a dataset column (every source is used)")
    p.add_argument("--levels", nargs="+", default=["auto"], choices=["auto", *STAGES],
                   help="the detector's backbone stages; auto: the candidate with the best val AUC")
    p.add_argument("--benign-quantile", type=float, default=BENIGN_QUANTILE,
                   help="detector threshold: this quantile of each source's benign calib+val scores (max over sources)")
    p.add_argument("--gate-quantile", type=float, default=GATE_QUANTILE,
                   help="gate thresholds: this quantile of each source's calib+val lesion distances and probe "
                   "scores (max over sources)")
    p.add_argument("--unseen-tolerance", type=float, default=UNSEEN_TOLERANCE,
                   help="gate: loosen both thresholds until a gate fitted on one source alone flags at most this share "
                        "of another source's calib+val lesions (leave-one-source-out; 0 keeps the calibrated ones)")
    p.add_argument("--degraded-lesions", type=int, default=DEGRADED_PER_SOURCE,
                   help="gate probe: this many degraded fit lesions per source join its lesion side (0: none)")
    p.add_argument("--no-balance", action="store_true", help="weight fit images equally instead of sources equally")
    p.add_argument("--detector", default=str(CHECKPOINTS / "feature_detector.safetensors"),
                   help="where to write the detector")
    p.add_argument("--gate", default=str(CHECKPOINTS / "gate.safetensors"), help="where to write the gate")
    add_runtime_options(p)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    df = read_manifest(a.manifest)
    try:
        extractor, features = all_stage_features(list(df["path"]), device)
    except (PretrainedWeightsError, ImageError) as exc:
        sys.exit(f"error: {exc}")
    provenance = {"manifest": Path(a.manifest).name, "manifest_sha256": file_sha256(a.manifest)}
    balance = not a.no_balance
    levels, candidates = choose_levels(df, features, balance) if a.levels == ["auto"] else (a.levels, {})
    detector = fit_detector(df, features, feature_spec(levels), a.benign_quantile, balance,
                            {**provenance, "levels_val_auc": candidates})
    gate, verdicts = fit_gate(df, features, feature_spec(GATE_LEVELS), a.gate_quantile, balance, provenance,
                              extractor, a.unseen_tolerance, a.degraded_lesions)
    detector.save(a.detector)
    gate.save(a.gate)
    calib = calibration_rows(df, benign_only=False)
    flagged = np.array([not v.ok for v in verdicts])
    summary = {"detector": str(a.detector), "levels": detector.meta["levels"], "levels_val_auc": candidates,
               "anomaly_threshold": detector.threshold,
               "per_source": detector.meta["anomaly_threshold_per_source"],
               "calib_val_auc": detector.meta["calib_val_auc_malignant_vs_benign"],
               "gate": str(a.gate), "gate_threshold": gate.threshold, "probe_threshold": gate.meta["probe_threshold"],
               "unseen_source": gate.meta["unseen_source"],
               "gate_flag_rate_calib_val": {str(s): float(flagged[(calib["dataset"] == s).to_numpy()].mean())
                                            for s in calib["dataset"].unique()},
               "checks": gate.meta["checks"]}
    for key, value in summary.items():
        print(f"{key}: {value}")
    return summary


if __name__ == "__main__":
    main()
