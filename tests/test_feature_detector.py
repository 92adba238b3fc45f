"""The feature detector: Ledoit-Wolf, Mahalanobis scores, the threshold rule, the checkpoint round trip, the
backbone's features, the splits it is fitted and calibrated on, the shipped detector on real lesions, and the rescue
evaluation's rules (studies/rescue_sources.py) on synthetic scores."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from anomaly_detection.feature_detector import (
    BENIGN_QUANTILE,
    FeatureDetector,
    FeatureExtractor,
    GaussianModel,
    benign_percentile_threshold,
    calibration_rows,
    feature_spec,
    fit_rows,
    ledoit_wolf,
    source_weights,
    upper_quantile,
)
from anomaly_detection.gate import Gate
from anomaly_detection.hybrid import rescue
from data.checkpoint import CheckpointError, write_sidecar
from data.images import load_uint8
from data.manifest import file_sha256, read_manifest
from data.splits import assert_grouped
from evaluation.metrics import auc
from studies.rescue_sources import Rules, rescue_change, rescue_threshold, source_rows

LEVELS = ("block2", "block3")
DIMS = {"block2": 40, "block3": 80}
SHIPPED = ROOT / "checkpoints" / "feature_detector.safetensors"


@pytest.fixture(scope="module")
def spec() -> dict:
    return feature_spec(LEVELS)


def random_features(n: int, shift: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {level: rng.normal(shift, 1.0, (n, d)).astype(np.float32) for level, d in DIMS.items()}


def test_ledoit_wolf_matches_sklearn_and_weights_balance_sources():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 25)) @ rng.normal(size=(25, 25))
    mean, cov, shrinkage = ledoit_wolf(x)
    expected_cov, expected_shrinkage = sklearn_ledoit_wolf(x)
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-10, atol=1e-10)
    assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-10)
    np.testing.assert_allclose(mean, x.mean(0))
    # 90 rows of one source at 0, 10 of another at 10: balanced weights put the mean half-way.
    y = np.r_[np.zeros((90, 3)), np.full((10, 3), 10.0)] + rng.normal(0, 0.1, (100, 3))
    weights = source_weights(["a"] * 90 + ["b"] * 10)
    assert ledoit_wolf(y, weights)[0] == pytest.approx(np.full(3, 5.0), abs=0.1)
    assert ledoit_wolf(y)[0] == pytest.approx(np.full(3, 1.0), abs=0.1)


def test_mahalanobis_score_is_the_sum_over_stages():
    model = GaussianModel({"a": 2, "b": 3})  # zero means, identity precisions: Euclidean norms
    features = {"a": np.array([[3.0, 4.0]]), "b": np.array([[0.0, 0.0, 2.0]])}
    assert model.distances(features)["a"] == pytest.approx([5.0])
    assert model.score(features) == pytest.approx([7.0])


def test_a_fitted_gaussian_separates_shifted_rows():
    model, shrinkage = GaussianModel.fit(random_features(400))
    assert all(0 <= s <= 1 for s in shrinkage.values())
    normal, shifted = model.score(random_features(100, seed=1)), model.score(random_features(100, 1.0, seed=2))
    assert auc(np.r_[np.zeros(100), np.ones(100)], np.r_[normal, shifted]) > 0.99


def test_threshold_rule_bounds_every_source():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(10, 1, 2000), rng.normal(14, 2, 300)]  # the small source scores higher
    sources = np.array(["ham"] * 2000 + ["isic"] * 300)
    threshold, per_source = benign_percentile_threshold(scores, sources)
    assert threshold == max(per_source.values()) == per_source["isic"]
    for name in ("ham", "isic"):
        assert (scores[sources == name] >= threshold).mean() <= 1 - BENIGN_QUANTILE + 1e-9
    pooled = np.quantile(scores, BENIGN_QUANTILE)  # what a pooled quantile would let through on the small source
    assert (scores[sources == "isic"] >= pooled).mean() > 1 - BENIGN_QUANTILE


def test_upper_quantile_never_flags_more_than_its_share():
    rng = np.random.default_rng(1)
    for n in (50, 243, 1000):
        scores = rng.normal(size=n).round(1)  # rounding makes ties
        t = upper_quantile(scores, BENIGN_QUANTILE)
        assert (scores >= t).sum() <= int(np.floor((1 - BENIGN_QUANTILE) * n + 1e-9))
        assert (scores >= np.quantile(scores, BENIGN_QUANTILE) - 1e-12).sum() >= (scores >= t).sum()
    assert upper_quantile(np.arange(10.0), 0.95) > 9.0  # none of 10 may be flagged at 5%


def test_detector_save_and_strict_load_round_trip(tmp_path, spec):
    detector = FeatureDetector.fit(random_features(200), spec, trained_on="test")
    detector.set_threshold(12.5, anomaly_threshold_rule="test")
    path = detector.save(tmp_path / "det")
    meta = json.loads((tmp_path / "det.json").read_text())
    assert meta["kind"] == "feature_detector" and meta["anomaly_threshold"] == 12.5
    assert meta["backbone"]["weights_sha256"] == spec["backbone"]["weights_sha256"]
    assert meta["color_constancy"]["method"] == "shades_of_gray" and meta["input_size"] == 224
    loaded = FeatureDetector.load(path)
    probe = random_features(5, 0.5, seed=3)
    np.testing.assert_allclose(loaded.score(probe), detector.score(probe), rtol=1e-5)
    assert loaded.anomalous(np.array([12.4, 12.5])).tolist() == [False, True]
    with pytest.raises(CheckpointError, match="expected 'gate'"):
        Gate.load(path)
    state = load_file(str(path))
    state.pop("block3_precision")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="sha256 does not match"):  # the recorded hash catches the change
        FeatureDetector.load(path)
    write_sidecar(path, {**meta, "weights_sha256": file_sha256(path)})  # consistent, but a stage is missing
    with pytest.raises(CheckpointError, match="weights do not match"):
        FeatureDetector.load(path)


def test_extractor_refuses_other_backbone_weights(spec):
    forged = {**spec, "backbone": {**spec["backbone"], "weights_sha256": "0" * 64}}
    with pytest.raises(CheckpointError, match="sha256 differs"):
        FeatureExtractor(forged)


def test_extractor_features_are_pooled_per_stage_and_batch_independent(spec):
    torch.manual_seed(0)
    extractor = FeatureExtractor(spec)
    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    batch = extractor(images)
    assert {k: v.shape for k, v in batch.items()} == {"block2": (3, 40), "block3": (3, 80)}
    alone = extractor(images[1:2])
    np.testing.assert_allclose(alone["block3"][0], batch["block3"][1], rtol=1e-4, atol=1e-5)
    small = extractor(images[:, :100, :120])  # another size is resized to the backbone's first
    assert small["block2"].shape == (3, 40)


@pytest.mark.real_data
def test_fit_and_calibration_rows_keep_lesion_groups_apart(real_data):
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    assert_grouped(df)
    evaluation = df[df["split"].isin(["test", "external"])]
    for datasets in (None, ["ham10000"], ["isic2017"]):
        fit, calib = fit_rows(df, True, datasets), calibration_rows(df, False, datasets)
        assert set(fit["split"]) == {"fit"} and (fit["label"] == "benign").all()
        assert set(calib["split"]) <= {"calib", "val"}
        if datasets:
            assert set(fit["dataset"]) == set(calib["dataset"]) == set(datasets)
        groups = [set(part["lesion_id"]) for part in (fit, calib, evaluation)]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    # Leave-one-source-out: one source's calibration lesions never appear in the other's evaluation rows.
    for seen, unseen in (("ham10000", "isic2017"), ("isic2017", "ham10000")):
        calib = set(calibration_rows(df, False, [seen])["lesion_id"])
        assert not calib & set(evaluation.loc[evaluation["dataset"] == unseen, "lesion_id"])
    assert set(calibration_rows(df, False)["dataset"]) == {"ham10000", "isic2017"}


@pytest.mark.real_data
@pytest.mark.skipif(not SHIPPED.is_file(), reason="run anomaly_detection/fit_feature_detector.py first")
def test_shipped_detector_scores_real_lesions(real_data):
    detector = FeatureDetector.load(SHIPPED)
    assert detector.meta["anomaly_threshold_split"] == "calib+val"
    assert set(detector.meta["fit_counts"]) == {"ham10000", "isic2017"}
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    benign = df[(df["split"] == "val") & (df["label"] == "benign")].groupby("dataset").sample(20, random_state=0)
    extractor = FeatureExtractor(detector.meta)
    pixels = np.stack([load_uint8(p, 224) for p in benign["path"]])
    scores = detector.score(extractor(pixels))
    assert np.isfinite(scores).all()
    # The threshold flags 2% of each source's benign calib+val images; 40 of them: at most a few.
    assert detector.anomalous(scores).sum() <= 4
    noise = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    assert detector.score(extractor(noise)).min() > np.median(scores)


def test_rescue_change_is_the_rescued_share_of_each_class():
    y = np.array([0, 0, 0, 0, 1, 1])
    classifier = np.array([0, 0, 1, 0, 0, 1], dtype=bool)
    hybrid = np.array([1, 0, 1, 0, 1, 1], dtype=bool)
    change = rescue_change(y, classifier, hybrid)
    assert change["spec_change"] == pytest.approx(-0.25) and change["sens_change"] == pytest.approx(0.5)
    assert change["spec_change_ci_low"] < -0.25 < change["spec_change_ci_high"] <= 0
    assert 0 <= change["sens_change_ci_low"] < 0.5 < change["sens_change_ci_high"]


def test_rescue_rule_costs_at_most_two_percent_specificity_on_each_calibration_source():
    rng = np.random.default_rng(0)
    parts = []
    for dataset, n, shift in (("ham10000", 1500, 0.0), ("isic2017", 300, 1.5)):  # isic's scores run higher
        y = (rng.random(n) < 0.2).astype(int)
        parts.append(pd.DataFrame({"dataset": dataset, "split": "val", "y": y,
                                   "prob_malignant": np.clip(0.3 + 0.3 * y + rng.normal(0, 0.15, n), 0.001, 0.999),
                                   "vae_score": rng.normal(shift + y, 1.0),
                                   "feature_score": rng.normal(shift, 1.0, n)}))
    calib = pd.concat(parts, ignore_index=True)
    rules = Rules.fit(calib, malignant_threshold=0.5, vae_shipped_threshold=0.0)
    for column, name in (("feature_score", "feature"), ("vae_score", "vae")):
        assert rules.anomaly_thresholds[name] == rescue_threshold(calib, column)
        for _, part in calib.groupby("dataset"):
            y, prob = part["y"].to_numpy(), part["prob_malignant"].to_numpy()
            hybrid = rescue(prob, part[column], 0.5, rules.anomaly_thresholds[name])["pred_hybrid"]
            assert -rescue_change(y, prob >= 0.5, hybrid)["spec_change"] <= 0.02 + 1e-9
    rows = {r["model"]: r for r in source_rows(calib.assign(split="test"), rules, "both/test")}
    assert {"classifier", "hybrid_feature", "hybrid_vae", "learned_fusion", "all_malignant_baseline",
            "classifier_at_hybrid_vae_spec_on_this_set"} <= set(rows)
    # At the hybrid's specificity on the same images, the classifier's curve point is at least as specific.
    assert rows["classifier_at_hybrid_vae_spec_on_this_set"]["specificity"] >= rows["hybrid_vae"]["specificity"]
    assert rows["all_malignant_baseline"]["sensitivity"] == 1.0


def test_step10_readme_describes_the_vae_it_was_given():
    from conftest import load_script

    step10 = load_script("10_rescue_across_sources")
    empty = pd.DataFrame(columns=["x"])
    loso = pd.DataFrame(columns=["score", "mode", "calibrated_on", "applied_to", "threshold",
                                 "benign_flag_rate_calibration", "benign_flag_rate", "spec_classifier", "spec_hybrid",
                                 "spec_drop", "spec_drop_ci_high"])
    metrics = pd.DataFrame(columns=["evaluation_set", "model", "auc", "auc_ci_low", "auc_ci_high", "sensitivity",
                                    "specificity", "spec_change", "sens_change"])
    gate = pd.DataFrame(columns=["set", "kind", "n", "flagged", "flag_rate", "flag_rate_ci_low", "flag_rate_ci_high",
                                 "flag_rate_distance_only", "flag_rate_probe_only", "flag_rate_without_probe"])
    vae_meta = {"anomaly_threshold": 0.1234567, "anomaly_threshold_rule": "source_percentile",
                "anomaly_threshold_split": "calib+val", "anomaly_threshold_manifest": "mixed.csv",
                "trained_on": "benign images of the fit split", "manifest": "mixed.csv"}
    text = step10.readme("python scripts/10_rescue_across_sources.py", metrics, loso, gate, empty, empty,
                         "checkpoints/x.safetensors", vae_meta)
    assert "0.1235, rule `source_percentile` on calib+val of mixed.csv" in text
    assert "trained on the benign images of the fit split of mixed.csv" in text and "HAM10000 only" not in text
