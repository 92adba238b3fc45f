r"""Does the VAE rescue add anything? Compare five decision rules on held-out data, honestly.

    python studies/evaluate_hybrid.py                       # shipped checkpoints, HAM10000 test + ISIC 2017
    python studies/evaluate_hybrid.py --classifier runs/classifiers/x/best.safetensors \
        --vae runs/vae/best.safetensors
    # GPU: add --device cuda. Nothing here is worth spreading over several GPUs.

Rules compared on each evaluation set (HAM10000 `test`, ISIC 2017 `external` subsets):
1. classifier: P(malignant) >= its val-chosen threshold;
2. hybrid rescue: classifier benign AND VAE score >= its calib-chosen threshold -> malignant;
3. classifier at equal specificity: the classifier alone with the lower threshold that gives, on `calib`, the
   hybrid's `calib` specificity (the honest competitor: the rescue trades specificity for sensitivity, so does this);
4. learned fusion: logistic regression on (classifier logit, VAE score) fit on `calib`, threshold by Youden's J on
   `calib`;
5. the all-malignant baseline;
and the VAE score alone as a detector (anomalous = malignant), for reference.
Everything is fitted or chosen on `calib`/`val`; the evaluation sets are only scored. Rules 2 and 5 are decisions
without a score, so their AUC is left empty. Outputs in --out: comparison_metrics.csv, detailed_predictions.csv,
comparison_confusion_matrices_<set>.png and operating_points_<set>.png (the classifier's and the fusion's full
sensitivity/specificity curves, each rule's operating point marked).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from anomaly_detection.hybrid import HybridPredictor, rescue
from classifiers.evaluate import (
    TrainingOverlap,
    check_no_training_overlap,
    evaluation_groups,
    training_manifest,
)
from classifiers.shipped import resolve_classifier
from data.atomic import atomic_write_csv
from data.cache import CachedImages
from data.checkpoint import CheckpointError
from data.manifest import read_manifest
from data.paths import CHECKPOINTS, RESULTS
from data.runtime import add_runtime_options, cli_main, init_device
from evaluation import plots
from evaluation.metrics import auc_ci, choose_threshold, decision_metrics, logit, threshold_for_specificity


def score_split(predictor: HybridPredictor, df: pd.DataFrame, batch: int = 64) -> pd.DataFrame:
    """P(malignant) and VAE score for every decodable row, through each model's own preprocessing."""
    cls = CachedImages(df, predictor.cls_prep.size, predictor.cls_prep.rule)
    vae = CachedImages(df, predictor.vae_prep.size, predictor.vae_prep.rule)
    probs, scores = [], []
    for i in range(0, len(cls), batch):
        p, s, _ = predictor.run_arrays(cls.images[i : i + batch], vae.images[i : i + batch])
        probs.append(p)
        scores.append(s)
    return cls.df.assign(y=cls.targets.numpy(), prob_malignant=np.concatenate(probs), vae_score=np.concatenate(scores))


class Rules:
    """Every parameter of the compared rules, fitted on the calib split only."""

    def __init__(self, predictor: HybridPredictor, calib: pd.DataFrame):
        self.mt, self.at = predictor.malignant_threshold, predictor.anomaly_threshold
        hybrid_calib = rescue(calib["prob_malignant"], calib["vae_score"], self.mt, self.at)["pred_hybrid"]
        self.hybrid_calib_specificity = decision_metrics(calib["y"], hybrid_calib)["specificity"]
        self.equal_spec_threshold = threshold_for_specificity(
            calib["y"], calib["prob_malignant"], self.hybrid_calib_specificity
        )
        # Standardise first: VAE scores vary by ~0.01, so an L2-penalised fit on raw features would all but ignore them.
        self.fusion = make_pipeline(StandardScaler(), LogisticRegression()).fit(self.features(calib), calib["y"])
        self.fusion_threshold = choose_threshold(calib["y"], self.fusion_score(calib), "youden", "calib")

    @staticmethod
    def features(df: pd.DataFrame) -> np.ndarray:
        return np.column_stack([logit(df["prob_malignant"].to_numpy()), df["vae_score"].to_numpy()])

    def fusion_score(self, df: pd.DataFrame) -> np.ndarray:
        return self.fusion.predict_proba(self.features(df))[:, 1]

    def apply(self, df: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray | None, float, str]]:
        """name -> (decisions, score or None, threshold, where the threshold came from)."""
        r = rescue(df["prob_malignant"], df["vae_score"], self.mt, self.at)
        fused = self.fusion_score(df)
        prob = df["prob_malignant"].to_numpy()
        return {
            "classifier": (r["pred_classifier"], prob, self.mt, "val"),
            "hybrid_rescue": (r["pred_hybrid"], None, self.at, "VAE sidecar; val (classifier)"),
            "classifier_equal_specificity": (
                prob >= self.equal_spec_threshold,
                prob,
                self.equal_spec_threshold,
                "calib (matches hybrid specificity)",
            ),
            "learned_fusion": (fused >= self.fusion_threshold, fused, self.fusion_threshold, "calib"),
            "vae_score_alone": (r["anomalous"], df["vae_score"].to_numpy(), self.at, "VAE sidecar"),
            "all_malignant_baseline": (np.ones(len(df), dtype=bool), None, float("nan"), "none"),
        }


def compare(applied: dict, df: pd.DataFrame, name: str) -> list[dict]:
    """One comparison_metrics.csv row per rule of `Rules.apply(df)`."""
    rows = []
    for model, (pred, score, threshold, chosen_on) in applied.items():
        m = decision_metrics(df["y"], pred)
        a, lo, hi = auc_ci(df["y"], score) if score is not None else (np.nan, np.nan, np.nan)
        rows.append(
            {
                "Dataset": name,
                "Model": model,
                "N": len(df),
                "Accuracy": m["accuracy"],
                "Precision": m["ppv"],
                "Recall": m["sensitivity"],
                "Specificity": m["specificity"],
                "F1": m["f1"],
                "BalancedAcc": m["balanced_accuracy"],
                "AUC": a,
                "AUC_CI_low": lo,
                "AUC_CI_high": hi,
                "TP": m["TP"],
                "TN": m["TN"],
                "FP": m["FP"],
                "FN": m["FN"],
                "Threshold": threshold,
                "ThresholdChosenOn": chosen_on,
            }
        )
    return rows


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--classifier", default=None,
        help="classifier checkpoint or the name of a shipped one (default: the shipped default; classifiers/shipped.py)"
    )
    p.add_argument("--vae", default=str(CHECKPOINTS / "convvae.safetensors"), help="calibrated VAE checkpoint")
    p.add_argument("--manifest", default=None,
                   help="manifest CSV (default: the classifier's training manifest: its splits are held out)")
    p.add_argument("--splits", nargs="+", default=["test", "external"], help="splits to report on")
    p.add_argument("--out", default=str(RESULTS / "hybrid"), help="output folder")
    add_runtime_options(p)
    a = p.parse_args(argv)
    a.classifier = resolve_classifier(a.classifier)
    device = init_device(a.device, a.threads)
    try:
        predictor = HybridPredictor(a.classifier, a.vae, device)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    df = read_manifest(a.manifest or training_manifest(predictor.cls_meta))
    try:
        check_no_training_overlap(predictor.cls_meta, df[df["split"].isin([*a.splits, "calib"])])
    except TrainingOverlap as exc:
        sys.exit(f"error: {exc}")
    rules = Rules(predictor, score_split(predictor, df[df["split"] == "calib"]))
    out = Path(a.out)
    rows, details = [], []
    for group, part in evaluation_groups(df[df["split"].isin(a.splits)]).items():
        scored = score_split(predictor, part)
        applied = rules.apply(scored)
        group_rows = compare(applied, scored, group)
        rows += group_rows
        classifier, hybrid = applied["classifier"][0], applied["hybrid_rescue"][0]
        details.append(
            scored[["path", "label", "prob_malignant", "vae_score"]].assign(
                dataset=group,
                pred_classifier=classifier.astype(int),
                pred_hybrid=hybrid.astype(int),
                rescued=(hybrid & ~classifier).astype(int),
                fusion_score=applied["learned_fusion"][1],
            )
        )
        slug = group.replace("/", "_")
        plots.confusion_matrices(
            {k: (scored["y"], v[0]) for k, v in applied.items()}, out / f"comparison_confusion_matrices_{slug}.png"
        )
        points = {row["Model"]: (row["Specificity"], row["Recall"]) for row in group_rows}
        plots.operating_points(
            {
                "classifier (all thresholds)": (scored["y"], scored["prob_malignant"]),
                "learned fusion (all thresholds)": (scored["y"], applied["learned_fusion"][1]),
                "VAE score alone": (scored["y"], scored["vae_score"]),
            },
            points,
            out / f"operating_points_{slug}.png",
            group,
        )
    metrics = pd.DataFrame(rows)
    atomic_write_csv(out / "comparison_metrics.csv", metrics)
    atomic_write_csv(out / "detailed_predictions.csv", pd.concat(details, ignore_index=True))
    print(
        f"calib: hybrid specificity {rules.hybrid_calib_specificity:.3f} -> equal-specificity classifier threshold "
        f"{rules.equal_spec_threshold:.4f} (val threshold {rules.mt:.4f}); anomaly threshold {rules.at:.5f}"
    )
    cols = ["Dataset", "Model", "Recall", "Specificity", "BalancedAcc", "AUC", "AUC_CI_low", "AUC_CI_high"]
    print(metrics[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}/comparison_metrics.csv")
    return metrics


if __name__ == "__main__":
    main()
