"""Calibrate the VAE's anomaly threshold on the `calib` split and store it in the VAE's sidecar.

    python anomaly_detection/calibrate.py --vae runs/vae/best.safetensors          # CPU, about a minute
    python anomaly_detection/calibrate.py --vae X.safetensors --rule youden --device cuda

`calib` is disjoint from the VAE's training images (benign `fit`), from `val` (which picked its epoch) and from
`test`. Three thresholds are computed and recorded: Youden's J, a target sensitivity, and a benign percentile
(the score above which only (1 - p) of benign calib images fall); `--rule` says which one the hybrid uses.
The default, the 95th benign percentile, bounds the rescue's cost: it can flag at most about 5% of benign lesions.
Outputs in --out: calib_scores.csv, histogram, ROC/PR PNGs and calibration.json; the sidecar gets
`anomaly_threshold`, the rule, all candidates and the calib score quantiles (used to warn on out-of-distribution input).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from anomaly_detection.hybrid import load_vae  # noqa: E402
from anomaly_detection.train_vae import score_images  # noqa: E402
from data.atomic import atomic_write_csv  # noqa: E402
from data.cache import CachedImages  # noqa: E402
from data.checkpoint import CheckpointError, read_sidecar, write_sidecar  # noqa: E402
from data.manifest import read_manifest  # noqa: E402
from data.runtime import init_device  # noqa: E402
from data.transforms import Preprocess  # noqa: E402
from evaluation import plots  # noqa: E402
from evaluation.metrics import auc_ci, choose_threshold, decision_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def candidate_thresholds(y: np.ndarray, scores: np.ndarray, split: str, target_sensitivity: float,
                         benign_percentile: float) -> dict[str, float]:
    return {"youden": choose_threshold(y, scores, "youden", split),
            "target_sensitivity": choose_threshold(y, scores, "target_sensitivity", split, target_sensitivity),
            "benign_percentile": choose_threshold(y, scores, "benign_percentile", split, benign_percentile)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(ROOT / "runs" / "vae" / "best.safetensors"), help="VAE checkpoint")
    p.add_argument("--manifest", default=str(ROOT / "data" / "manifests" / "original.csv"), help="manifest CSV")
    p.add_argument("--split", default="calib", help="split to calibrate on (never test)")
    p.add_argument("--rule", default="benign_percentile", choices=("youden", "target_sensitivity", "benign_percentile"),
                   help="which candidate becomes anomaly_threshold")
    p.add_argument("--target-sensitivity", type=float, default=0.5, help="target for the target_sensitivity rule")
    p.add_argument("--benign-percentile", type=float, default=0.95, help="quantile for the benign_percentile rule")
    p.add_argument("--out", default=str(ROOT / "results" / "vae_calibration"), help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    a = p.parse_args(argv)
    device = init_device(a.device)
    try:
        vae, meta = load_vae(a.vae)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    data = CachedImages(read_manifest(a.manifest).query("split == @a.split"), meta["input_size"], meta["resize"])
    y = data.targets.numpy()
    scores = score_images(vae, data.images, Preprocess.from_meta(meta), device)
    thresholds = candidate_thresholds(y, scores, a.split, a.target_sensitivity, a.benign_percentile)
    chosen = thresholds[a.rule]
    a_auc, lo, hi = auc_ci(y, scores)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "calib_scores.csv", data.df[["path", "label"]].assign(vae_score=scores))
    plots.score_histogram(y, scores, out / "calib_score_histogram.png", chosen, "VAE anomaly score (mean |x - x_hat|)",
                          f"{a.split}: benign vs malignant")
    plots.roc_pr({"VAE score": (y, scores)}, out / "calib_roc_pr.png", a.split)
    benign = scores[y == 0]
    calibration = {
        "split": a.split, "n": int(len(y)), "n_malignant": int(y.sum()), "auc": a_auc, "auc_ci": [lo, hi],
        "thresholds": thresholds, "rule": a.rule, "anomaly_threshold": chosen,
        "at_threshold": {name: decision_metrics(y, scores >= t) for name, t in thresholds.items()},
        "benign_score_quantiles": {q: float(np.quantile(benign, float(q))) for q in ("0.5", "0.95", "0.99", "1.0")},
        "vae": str(a.vae)}
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    sidecar = read_sidecar(a.vae)
    sidecar.update({"anomaly_threshold": chosen, "anomaly_threshold_rule": a.rule, "anomaly_threshold_split": a.split,
                    "anomaly_threshold_candidates": thresholds,
                    "calib_benign_score_quantiles": calibration["benign_score_quantiles"]})
    sidecar.setdefault("metrics", {})[a.split] = {"auc": a_auc, "auc_ci": [lo, hi]}
    write_sidecar(a.vae, sidecar)
    print(f"VAE on {a.split}: AUC {a_auc:.3f} (95% CI {lo:.3f}-{hi:.3f}); thresholds "
          + ", ".join(f"{k} {v:.5f}" for k, v in thresholds.items()) + f"; using {a.rule} = {chosen:.5f}")
    return calibration


if __name__ == "__main__":
    main()
