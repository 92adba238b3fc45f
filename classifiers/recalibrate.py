r"""Recalibrate a classifier's malignant threshold on a new clinic's own labelled images.

    python classifiers/recalibrate.py --checkpoint checkpoints/efficientnet_lite0.safetensors \
        --folder my_clinic/ --out my_clinic/efficientnet_lite0        # my_clinic/<benign|malignant>/*
    python inference.py --classifier my_clinic/efficientnet_lite0.safetensors --folder new_patients/
    python classifiers/recalibrate.py ... --rule target_sensitivity --target 0.85    # screening: fix the sensitivity
    # one GPU: add --device cuda. Several GPUs: not needed (one pass over the clinic's images).

Why: a classifier's ranking transfers to a new camera better than its threshold does. Trained on HAM10000 alone,
the default's recipe still ranks ISIC 2017 images at 0.70 AUC, but its HAM10000 threshold finds a third of the
melanomas there (README, "A source it never saw"). The threshold belongs to the clinic, so it is chosen on the
clinic's own labelled images with the checkpoint's rule (Youden, as at training, unless --rule says otherwise),
never on images the model was trained or selected on (refused). The result is a new checkpoint: the same weights
(a byte copy, the same sha256) and a sidecar whose `malignant_threshold` is the clinic's, recording the threshold
before and where the new one came from. `inference.py`, the demo and classifiers/evaluate.py use it like any other.

Beside it, <out>.recalibration.json: AUC (95% CI) and the decision metrics (exact 95% CIs on sensitivity and
specificity) at the thresholds before and after, on these images. The numbers at the new threshold are in-sample:
judge it on other images of the clinic (`classifiers/evaluate.py --checkpoint <out>.safetensors --folder <others>`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classifiers.evaluate import TrainingOverlap, predict_ensemble
from data.atomic import atomic_write_bytes, atomic_write_text
from data.checkpoint import CheckpointError, write_sidecar
from data.manifest import ManifestError, label_index, read_folder
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from evaluation.metrics import THRESHOLD_RULES, auc_ci, choose_threshold, decision_row

MIN_PER_CLASS = 10  # fewer images of a class than this cannot place a threshold


def decisions(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """decision_row without its AUC fields (the AUC does not depend on the threshold; the report gives it once),
    undefined ratios (e.g. PPV with no positive decision) as None, so that the report is strict JSON."""
    return {k: None if isinstance(v, float) and np.isnan(v) else v
            for k, v in decision_row(y, pred).items() if not k.startswith("auc")}


def recalibrate(checkpoint: str, df: pd.DataFrame, rule: str | None, target: float | None,
                device) -> tuple[dict[str, Any], dict[str, Any]]:
    """(new sidecar, report) for `checkpoint` with its threshold chosen on the labelled rows of `df`."""
    prob, meta, kept = predict_ensemble([checkpoint], df, device, tta=False)
    y = label_index(kept["label"]).to_numpy()
    counts = {label: int((y == i).sum()) for i, label in enumerate(("benign", "malignant"))}
    if min(counts.values()) < MIN_PER_CLASS:
        raise UserError(f"{counts['benign']} benign and {counts['malignant']} malignant images decoded: at least "
                        f"{MIN_PER_CLASS} of each are needed to place a threshold")
    rule = rule or meta.get("threshold_rule") or "youden"
    threshold = choose_threshold(y, prob, rule, "clinic", target)
    value, low, high = auc_ci(y, prob)
    before = meta["malignant_threshold"]
    report = {"checkpoint": str(checkpoint), "n": len(y), **counts, "auc": value, "auc_ci": [low, high],
              "rule": rule, "target": target, "before": {"threshold": before, **decisions(y, prob >= before)},
              "after": {"threshold": threshold, **decisions(y, prob >= threshold)}}
    sidecar = {**meta, "malignant_threshold": threshold, "threshold_rule": rule,
               "threshold_target": target, "threshold_split": "clinic",
               "recalibrated": {"from": str(checkpoint), "threshold_before": before,
                                "threshold_split_before": meta.get("threshold_split"), "n": len(y), **counts}}
    return sidecar, report


def write_recalibrated(checkpoint: str, out: Path, sidecar: dict[str, Any], report: dict[str, Any]) -> Path:
    """The weights copied byte for byte, the new sidecar and the report, each atomically."""
    source, weights = Path(checkpoint).with_suffix(".safetensors"), out.with_suffix(".safetensors")
    if weights.resolve() == source.resolve():
        raise UserError("--out must differ from --checkpoint: the original keeps its own threshold")
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights, source.read_bytes())
    write_sidecar(weights, sidecar)
    atomic_write_text(out.with_suffix(".recalibration.json"), json.dumps(report, indent=2, allow_nan=False) + "\n")
    return weights


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="classifier checkpoint (.safetensors with its .json sidecar)")
    p.add_argument("--folder", required=True,
                   help="the clinic's labelled images: <folder>/benign/* and <folder>/malignant/*")
    p.add_argument("--out", required=True,
                   help="path of the recalibrated checkpoint, without suffix (writes .safetensors, .json and "
                        ".recalibration.json)")
    p.add_argument("--rule", default=None, choices=THRESHOLD_RULES,
                   help="threshold rule (default: the checkpoint's own, e.g. youden)")
    p.add_argument("--target", type=float, default=None,
                   help="the rule's target: sensitivity for target_sensitivity, specificity for target_specificity")
    add_runtime_options(p)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    if not os.path.isdir(a.folder):
        raise UserError(f"{a.folder}: folder not found")
    try:
        df = read_folder(a.folder, split="test")
        sidecar, report = recalibrate(a.checkpoint, df, a.rule, a.target, device)
    except (CheckpointError, ManifestError, TrainingOverlap) as exc:
        raise UserError(str(exc)) from None
    weights = write_recalibrated(a.checkpoint, Path(a.out), sidecar, report)
    b, n = report["before"], report["after"]
    print(f"{report['n']} images ({report['malignant']} malignant): AUC {report['auc']:.3f} "
          f"({report['auc_ci'][0]:.3f}-{report['auc_ci'][1]:.3f})")
    for name, point in (("before", b), ("after", n)):
        print(f"  {name}: threshold {point['threshold']:.4f}, sensitivity {point['sensitivity']:.3f} "
              f"({point['sensitivity_ci_low']:.3f}-{point['sensitivity_ci_high']:.3f}), specificity "
              f"{point['specificity']:.3f} ({point['specificity_ci_low']:.3f}-{point['specificity_ci_high']:.3f})")
    print(f"wrote {weights} (threshold by {report['rule']} on these images; judge it on others)")
    return report


if __name__ == "__main__":
    main()
