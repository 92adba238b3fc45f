"""Does the rescue survive a new image source, and does the gate stop non-lesions? The computations behind
scripts/10_rescue_across_sources.py.

Scores (one table, `score_table`): the classifier's P(malignant), the ConvVAE score (DESIGN.md: mean absolute
reconstruction error), the feature detector's score and the gate's distance, for the `calib`/`val` rows (where
everything is chosen) and the `test`/`external` rows (only reported).

Rescue threshold rule (`RESCUE_RULE`), the same for either anomaly score: the largest, over sources, of each source's
98th percentile of benign `calib` + `val` scores. The rescue then flags at most 2% of every source's benign
calibration images, so it costs at most 0.02 specificity there, whatever the classifier (the feature detector's
sidecar holds this threshold; the VAE's is recomputed here by the same rule, and its shipped threshold, the 95th
percentile of HAM10000 `calib`, is reported too).

Per evaluation set (`source_rows`): AUC (malignant vs benign) with bootstrap 95% CIs for the classifier, each
anomaly score alone and a learned fusion (logistic regression on classifier logit, VAE and feature scores, fitted on
calib+val, threshold by Youden's J there); each hybrid's sensitivity and specificity (exact 95% CIs) with the change
against the classifier at its threshold (the rescued share of benign / malignant images, exact CIs); the classifier
at equal specificity, both with its threshold matched on calib+val (a deployable rule) and matched on the reported
set itself (a reference point on its curve, not a rule); and the all-malignant baseline.

Leave-one-source-out (`loso_rows`): calibrate the rescue threshold on one source's benign calib+val images only and
apply it to the other source. The specificity drop is the classifier's specificity minus the hybrid's on the same
images (what the rescue costs there). Modes: `calibration` (the shipped detector, fitted on both sources' benign
`fit` images), `refit` (the detector refitted on the calibration source's benign `fit` images only: the unseen source
is unseen in every way) and the VAE (not refitted: only its threshold is left out).

Gate (`gate_rows`): the share flagged "cannot assess" of the non-lesion set (data/non_lesion.py) per kind and in all,
and of HAM10000 `test` and ISIC 2017 `external` lesions, with exact CIs; also the share flagged by the feature
distance alone, without the cheap checks.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from anomaly_detection.feature_detector import (
    BENIGN_QUANTILE,
    CALIBRATION_SPLITS,
    FEATURE_KEYS,
    FeatureDetector,
    FeatureExtractor,
    Features,
    benign_percentile_threshold,
    fit_rows,
    select,
    upper_quantile,
)
from anomaly_detection.fit_feature_detector import fit_lesion_gate
from anomaly_detection.gate import GATE_QUANTILE, Gate, GateResult, Original, check_paths, original
from anomaly_detection.hybrid import load_vae, rescue
from anomaly_detection.train_vae import score_images
from classifiers.models import load_classifier
from classifiers.predict import predict_proba
from data.atomic import atomic_write
from data.cache import CachedImages
from data.images import to_uint8
from data.non_lesion import NonLesion
from data.transforms import Preprocess
from evaluation import plots
from evaluation.metrics import (
    choose_threshold,
    decision_metrics,
    decision_row,
    logit,
    proportion_with_ci,
    threshold_for_specificity,
)

RESCUE_RULE = f"max over sources of each source's {BENIGN_QUANTILE} quantile of benign calib+val scores"
EVALUATION_SPLITS = ("test", "external")
SCORES = {"feature": "feature_score", "vae": "vae_score"}
TARGETS = {"hybrid_spec_loss_max": 0.05, "loso_spec_drop_max": 0.10, "gate_non_lesion_min": 0.99,
           "gate_lesion_max": 0.01}


def classifier_probs(path: str, df: pd.DataFrame, device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    model, meta = load_classifier(path)
    prep = Preprocess.from_meta(meta)
    images = CachedImages(df, prep.size, prep.rule).images
    return predict_proba(model.to(device), images, prep, device)[:, 1], meta


def vae_scores(path: str, df: pd.DataFrame, device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    vae, meta = load_vae(path)
    prep = Preprocess.from_meta(meta)
    images = CachedImages(df, prep.size, prep.rule).images
    return score_images(vae.to(device), images, prep, device), meta


def score_table(df: pd.DataFrame, features: Features, classifier: str, vae: str, detector: FeatureDetector,
                gate: Gate, device: torch.device) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Scores of the calib/val/test/external rows of `df` (whose index addresses `features`); returns (table,
    classifier sidecar, VAE sidecar)."""
    rows = df[df["split"].isin((*CALIBRATION_SPLITS, *EVALUATION_SPLITS))]
    prob, cls_meta = classifier_probs(classifier, rows, device)
    vae_score, vae_meta = vae_scores(vae, rows, device)
    part = select(features, rows.index.to_numpy())
    prep = Preprocess.from_meta(gate.meta)
    verdicts, *_ = check_paths(gate, part, list(rows["path"]), prep.size, prep.rule)
    table = rows[["path", "dataset", "split", "label"]].assign(
        row=rows.index.to_numpy(), y=(rows["label"] == "malignant").astype(int).to_numpy(), prob_malignant=prob,
        vae_score=vae_score, feature_score=detector.score(part), **verdict_columns(verdicts))
    return table.reset_index(drop=True), cls_meta, vae_meta


def rescue_threshold(calib: pd.DataFrame, column: str) -> float:
    """RESCUE_RULE on the benign calibration rows of `calib` (every source present in it)."""
    benign = calib[calib["y"] == 0]
    return benign_percentile_threshold(benign[column], benign["dataset"])[0]


def rescue_change(y: np.ndarray, classifier: np.ndarray, hybrid: np.ndarray) -> dict[str, float]:
    """What the rescue changes against the classifier alone on the same images: the specificity lost is the share
    of benign images rescued, the sensitivity gained the share of malignant ones (each with an exact CI)."""
    rescued = hybrid & ~classifier
    loss = proportion_with_ci(int(rescued[y == 0].sum()), int((y == 0).sum()))
    gain = proportion_with_ci(int(rescued[y == 1].sum()), int((y == 1).sum()))
    return {"spec_change": -loss[0], "spec_change_ci_low": -loss[2], "spec_change_ci_high": -loss[1],
            "sens_change": gain[0], "sens_change_ci_low": gain[1], "sens_change_ci_high": gain[2]}


@dataclass
class Rules:
    """Every threshold and fitted parameter, from the calib+val rows only."""

    malignant_threshold: float
    anomaly_thresholds: dict[str, float]     # rescue name -> anomaly threshold
    columns: dict[str, str]                  # rescue name -> score column
    equal_spec_thresholds: dict[str, float]
    fusion: Any
    fusion_threshold: float

    @classmethod
    def fit(cls, calib: pd.DataFrame, malignant_threshold: float, vae_shipped_threshold: float) -> Rules:
        thresholds = {name: rescue_threshold(calib, column) for name, column in SCORES.items()}
        thresholds["vae_shipped"] = vae_shipped_threshold
        columns = {**SCORES, "vae_shipped": "vae_score"}
        y, prob = calib["y"].to_numpy(), calib["prob_malignant"].to_numpy()
        equal = {}
        for name, column in columns.items():
            hybrid = rescue(prob, calib[column], malignant_threshold, thresholds[name])["pred_hybrid"]
            equal[name] = threshold_for_specificity(y, prob, decision_metrics(y, hybrid)["specificity"])
        fusion = make_pipeline(StandardScaler(), LogisticRegression()).fit(fusion_features(calib), y)
        fusion_threshold = choose_threshold(y, fusion.predict_proba(fusion_features(calib))[:, 1], "youden",
                                            "calib+val")
        return cls(malignant_threshold, thresholds, columns, equal, fusion, fusion_threshold)


def fusion_features(df: pd.DataFrame) -> np.ndarray:
    return np.column_stack([logit(df["prob_malignant"].to_numpy()), df["vae_score"], df["feature_score"]])


def source_rows(part: pd.DataFrame, rules: Rules, name: str) -> list[dict[str, Any]]:
    """Every compared rule on one evaluation set (see the module docstring)."""
    y, prob = part["y"].to_numpy(), part["prob_malignant"].to_numpy()
    base = {"evaluation_set": name}
    classifier = prob >= rules.malignant_threshold
    rows = [{**base, "model": "classifier", **decision_row(y, classifier, prob),
             "threshold": rules.malignant_threshold, "threshold_split": "val (classifier sidecar)"}]
    for score_name, column in SCORES.items():
        score = part[column].to_numpy()
        rows.append({**base, "model": f"{score_name}_alone", **decision_row(y, score >= rules.anomaly_thresholds[
            score_name], score), "threshold": rules.anomaly_thresholds[score_name], "threshold_split": "calib+val"})
    for rescue_name, column in rules.columns.items():
        threshold = rules.anomaly_thresholds[rescue_name]
        hybrid = rescue(prob, part[column], rules.malignant_threshold, threshold)["pred_hybrid"]
        rule = "the VAE sidecar's own (README.md here)" if rescue_name == "vae_shipped" else RESCUE_RULE
        rows.append({**base, "model": f"hybrid_{rescue_name}", **decision_row(y, hybrid),
                     **rescue_change(y, classifier, hybrid), "threshold": threshold, "threshold_rule": rule,
                     "threshold_split": "calib+val" if rescue_name != "vae_shipped" else "VAE sidecar"})
        matched = rules.equal_spec_thresholds[rescue_name]
        rows.append({**base, "model": f"classifier_equal_spec_to_hybrid_{rescue_name}",
                     **decision_row(y, prob >= matched), "threshold": matched,
                     "threshold_rule": "hybrid's calib+val specificity", "threshold_split": "calib+val"})
        here = threshold_for_specificity(y, prob, decision_row(y, hybrid)["specificity"])
        rows.append({**base, "model": f"classifier_at_hybrid_{rescue_name}_spec_on_this_set",
                     **decision_row(y, prob >= here), "threshold": here,
                     "threshold_rule": "hybrid's specificity on this set (a curve point, not a rule)",
                     "threshold_split": name})
    fused = rules.fusion.predict_proba(fusion_features(part))[:, 1]
    rows.append({**base, "model": "learned_fusion", **decision_row(y, fused >= rules.fusion_threshold, fused),
                 "threshold": rules.fusion_threshold, "threshold_rule": "youden", "threshold_split": "calib+val"})
    rows.append({**base, "model": "all_malignant_baseline", **decision_row(y, np.ones_like(classifier)),
                 "threshold": float("nan"), "threshold_rule": "constant", "threshold_split": "none"})
    return rows


def evaluation_sets(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {f"{d}/{s}": part for (d, s), part in table[table["split"].isin(EVALUATION_SPLITS)]
            .groupby(["dataset", "split"], sort=True)}


def loso_rows(table: pd.DataFrame, df: pd.DataFrame, features: Features, detector: FeatureDetector,
              malignant_threshold: float) -> list[dict[str, Any]]:
    """Leave-one-source-out rows (see the module docstring). `df` is the full manifest whose index addresses
    `features` (for the refit mode); `table` comes from score_table."""
    sets = evaluation_sets(table)
    datasets = sorted(table["dataset"].unique())
    rows = []
    for seen in datasets:
        calib = table[table["split"].isin(CALIBRATION_SPLITS) & (table["dataset"] == seen)]
        train = fit_rows(df, benign_only=True, datasets=[seen])
        spec = {k: detector.meta[k] for k in (*FEATURE_KEYS, "levels")}
        refit = FeatureDetector.fit(select(features, train.index.to_numpy()), spec)
        refit_scores = {name: refit.score(select(features, part["row"].to_numpy()))
                        for name, part in {**sets, "calib": calib}.items()}
        for mode, column in (("calibration", "feature_score"), ("refit", "refit"), ("calibration", "vae_score")):
            score_of = (lambda name, part, col=column: part[col].to_numpy()) if column != "refit" else \
                (lambda name, part: refit_scores[name])
            calib_benign = score_of("calib", calib)[calib["y"].to_numpy() == 0]
            threshold = upper_quantile(calib_benign, BENIGN_QUANTILE)
            for name, part in sets.items():
                y, prob = part["y"].to_numpy(), part["prob_malignant"].to_numpy()
                r = rescue(prob, score_of(name, part), malignant_threshold, threshold)
                change = rescue_change(y, r["pred_classifier"], r["pred_hybrid"])
                rows.append({"score": "vae" if column == "vae_score" else "feature", "mode": mode,
                             "calibrated_on": seen, "applied_to": name,
                             "unseen": not name.startswith(seen), "threshold": threshold,
                             "benign_flag_rate_calibration": float((calib_benign >= threshold).mean()),
                             "benign_flag_rate": float(r["anomalous"][y == 0].mean()),
                             "spec_classifier": decision_metrics(y, r["pred_classifier"])["specificity"],
                             "spec_hybrid": decision_metrics(y, r["pred_hybrid"])["specificity"],
                             "spec_drop": -change["spec_change"], "spec_drop_ci_low": -change["spec_change_ci_high"],
                             "spec_drop_ci_high": -change["spec_change_ci_low"],
                             "sens_classifier": decision_metrics(y, r["pred_classifier"])["sensitivity"],
                             "sens_hybrid": decision_metrics(y, r["pred_hybrid"])["sensitivity"]})
    return rows


def gate_loso_rows(table: pd.DataFrame, df: pd.DataFrame, features: Features, gate: Gate,
                   extractor: FeatureExtractor) -> list[dict[str, Any]]:
    """Leave-one-source-out for the gate's learned checks (distance, probe): a gate fitted on one source's `fit`
    lesions alone, its thresholds the 99.7th percentiles of that source's calib+val lesions, first as calibrated and
    then loosened by the shipped gate's unseen-source margin and offset; the share of every evaluation set's lesions
    it flags. `df` is the full manifest whose index addresses `features`; `table` comes from score_table."""
    unseen = gate.meta.get("unseen_source") or {"distance_margin": 1.0, "probe_offset": 0.0}
    spec = {k: gate.meta[k] for k in (*FEATURE_KEYS, "levels")}
    degraded = gate.meta.get("probe", {}).get("degraded_lesions", {}).get("per_source", 0)
    rows = []
    for seen in sorted(table["dataset"].unique()):
        single = fit_lesion_gate(df, features, spec, True, extractor, degraded, [seen])
        calib = table[table["split"].isin(CALIBRATION_SPLITS) & (table["dataset"] == seen)]
        calib_features = select(features, calib["row"].to_numpy())
        distance_q = upper_quantile(single.score(calib_features), GATE_QUANTILE)
        probe_q = upper_quantile(single.probe_score(calib_features), GATE_QUANTILE)
        for name, part in evaluation_sets(table).items():
            part_features = select(features, part["row"].to_numpy())
            distance, probe = single.score(part_features), single.probe_score(part_features)
            for thresholds, margin, offset in (("calibrated", 1.0, 0.0), ("unseen-source margin", unseen[
                    "distance_margin"], unseen["probe_offset"])):
                flagged = int(((distance >= margin * distance_q) | (probe >= probe_q + offset)).sum())
                rate = proportion_with_ci(flagged, len(part))
                rows.append({"fitted_on": seen, "applied_to": name, "unseen": not name.startswith(seen),
                             "thresholds": thresholds, "n": len(part), "flagged": flagged, "flag_rate": rate[0],
                             "flag_rate_ci_low": rate[1], "flag_rate_ci_high": rate[2]})
    return rows


def verdict_columns(verdicts: Sequence[GateResult]) -> dict[str, list]:
    return {"gate_distance": [v.distance for v in verdicts], "gate_probe": [v.probe_score for v in verdicts],
            "gate_ok": [v.ok for v in verdicts], "gate_reason": [v.reason for v in verdicts]}


def non_lesion_pixels(items: Sequence[NonLesion], extractor: FeatureExtractor) -> tuple[np.ndarray, list[Original]]:
    """Non-lesion images -> (uint8 pixels at the backbone's size, each image's Original)."""
    size, rule = extractor.preprocess.size, extractor.preprocess.rule
    images = [Image.fromarray(item.image) for item in items]
    return np.stack([to_uint8(image, size, rule) for image in images]), [original(image) for image in images]


def gate_table(items: Sequence[NonLesion], gate: Gate, extractor: FeatureExtractor) -> pd.DataFrame:
    pixels, originals = non_lesion_pixels(items, extractor)
    verdicts = gate.check_features(extractor(pixels), pixels, originals)
    return pd.DataFrame({"name": [i.name for i in items], "kind": [i.kind for i in items],
                         "width": [o.width for o in originals], "height": [o.height for o in originals],
                         **verdict_columns(verdicts)})


def _flag_row(name: str, kind: str, part: pd.DataFrame, gate: Gate) -> dict[str, Any]:
    """Flag rates of one set: the gate as shipped, and (to show what each part does) the feature distance alone,
    the probe alone, and the gate without the probe (cheap checks + distance)."""
    flagged = int((~part["gate_ok"]).sum())
    rate = proportion_with_ci(flagged, len(part))
    by_distance = (part["gate_distance"] >= gate.threshold).to_numpy()
    by_probe = (part["gate_probe"] >= gate.meta.get("probe_threshold", np.inf)).to_numpy()
    cheap = ~part["gate_ok"].to_numpy() & ~by_distance & ~by_probe
    reasons = part.loc[~part["gate_ok"], "gate_reason"].str.split(" \\(").str[0].value_counts().to_dict()
    n = max(len(part), 1)
    return {"set": name, "kind": kind, "n": len(part), "flagged": flagged, "flag_rate": rate[0],
            "flag_rate_ci_low": rate[1], "flag_rate_ci_high": rate[2],
            "flag_rate_distance_only": by_distance.sum() / n, "flag_rate_probe_only": by_probe.sum() / n,
            "flag_rate_without_probe": (cheap | by_distance).sum() / n,
            "reasons": "; ".join(f"{k}: {v}" for k, v in reasons.items())}


def gate_rows(non_lesion: pd.DataFrame, table: pd.DataFrame, gate: Gate) -> list[dict[str, Any]]:
    generated = non_lesion[non_lesion["kind"] != "skin_crop"]
    rows = [_flag_row("non_lesion", "all", non_lesion, gate),
            _flag_row("non_lesion", "generated + photographs (no skin crops)", generated, gate)]
    rows += [_flag_row("non_lesion", kind, part, gate) for kind, part in non_lesion.groupby("kind", sort=True)]
    rows += [_flag_row(name, "lesions", part, gate) for name, part in evaluation_sets(table).items()]
    calib = table[table["split"].isin(CALIBRATION_SPLITS)]
    rows += [_flag_row(f"{d}/calib+val", "lesions (thresholds chosen here)", part, gate)
             for d, part in calib.groupby("dataset", sort=True)]
    return rows


def targets(metrics: pd.DataFrame, loso: pd.DataFrame, gate: pd.DataFrame) -> pd.DataFrame:
    """The issue's targets, each measured and marked met or not."""
    rows = []
    for name, part in metrics.groupby("evaluation_set", sort=True):
        for rescue_name in SCORES:
            hybrid = part[part["model"] == f"hybrid_{rescue_name}"].iloc[0]
            here = part[part["model"] == f"classifier_at_hybrid_{rescue_name}_spec_on_this_set"].iloc[0]
            rows.append({"target": f"hybrid_{rescue_name} specificity within {TARGETS['hybrid_spec_loss_max']} of "
                         f"the classifier at its threshold", "where": name, "value": hybrid["spec_change"],
                         "met": hybrid["spec_change"] >= -TARGETS["hybrid_spec_loss_max"]})
            rows.append({"target": f"hybrid_{rescue_name} more sensitive than the classifier at equal specificity",
                         "where": name, "value": hybrid["sensitivity"] - here["sensitivity"],
                         "met": hybrid["sensitivity"] > here["sensitivity"]})
    for _, r in loso[loso["unseen"]].iterrows():
        rows.append({"target": f"leave-one-source-out specificity drop <= {TARGETS['loso_spec_drop_max']} "
                     f"({r['score']}, {r['mode']})", "where": f"{r['calibrated_on']} -> {r['applied_to']}",
                     "value": r["spec_drop"], "met": r["spec_drop"] <= TARGETS["loso_spec_drop_max"]})
    everything = gate[(gate["set"] == "non_lesion") & (gate["kind"] == "all")].iloc[0]
    rows.append({"target": f"gate flags >= {TARGETS['gate_non_lesion_min']} of >= 200 non-lesion images",
                 "where": f"non_lesion (n={everything['n']})", "value": everything["flag_rate"],
                 "met": everything["flag_rate"] >= TARGETS["gate_non_lesion_min"] and everything["n"] >= 200})
    for _, r in gate[gate["kind"] == "lesions"].iterrows():
        rows.append({"target": f"gate flags <= {TARGETS['gate_lesion_max']} of lesions", "where": r["set"],
                     "value": r["flag_rate"], "met": r["flag_rate"] <= TARGETS["gate_lesion_max"]})
    return pd.DataFrame(rows)


def gate_histogram(non_lesion: pd.DataFrame, table: pd.DataFrame, gate: Gate, path: str | os.PathLike) -> Path:
    """The gate's two learned scores (log10 feature distance; probe logit): evaluation lesions per set against the
    non-lesion images, each threshold marked (the cheap checks are not shown)."""
    groups = {f"{name} lesions": part for name, part in evaluation_sets(table).items()}
    groups["non-lesion: generated + photographs"] = non_lesion[non_lesion["kind"] != "skin_crop"]
    groups["non-lesion: skin crops"] = non_lesion[non_lesion["kind"] == "skin_crop"]
    panels = (("gate_distance", "log10 feature distance (sum of Mahalanobis distances)", np.log10(gate.threshold),
               lambda v: np.log10(np.maximum(v, 1e-9))),
              ("gate_probe", "non-lesion probe score (logit)", gate.meta.get("probe_threshold"), lambda v: v))
    fig, axes = plots.plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, (column, label, threshold, transform) in zip(axes, panels):
        values = {k: transform(part[column].to_numpy(dtype=float)) for k, part in groups.items() if len(part)}
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        bins = np.linspace(finite.min(), finite.max(), 60) if len(finite) else 10
        for name, v in values.items():
            ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.55, density=True, label=f"{name} (n={len(v)})")
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--", label="threshold (calib+val lesions, 99.7%)")
        ax.set(xlabel=label, ylabel="density")
        ax.legend(fontsize=7)
    fig.suptitle("Gate: lesions vs non-lesion images (cheap checks not shown)")
    return plots.save_figure(fig, path)


def contact_sheet(items: Sequence[NonLesion], gated: pd.DataFrame, path: str | os.PathLike, tile: int = 72,
                  columns: int = 15) -> Path:
    """The skin crops and every non-lesion image the gate let through, framed red (flagged) or green (passed)."""
    ok = dict(zip(gated["name"], gated["gate_ok"]))
    shown = [item for item in items if item.kind == "skin_crop" or ok[item.name]]
    rows = max(1, -(-len(shown) // columns))
    sheet = Image.new("RGB", (columns * tile, rows * tile), "white")
    for k, item in enumerate(shown):
        thumb = Image.fromarray(item.image).resize((tile - 6, tile - 6), Image.Resampling.BILINEAR)
        framed = Image.new("RGB", (tile - 2, tile - 2), (40, 160, 60) if ok[item.name] else (200, 40, 40))
        framed.paste(thumb, (2, 2))
        sheet.paste(framed, ((k % columns) * tile + 1, (k // columns) * tile + 1))
    atomic_write(path, lambda f: sheet.save(f, format="PNG", optimize=True))
    return Path(path)
