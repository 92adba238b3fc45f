"""The out-of-distribution gate: its cheap checks, the non-lesion test set, a gate fitted from scratch on a few real
lesions, and the shipped gate on generated non-lesion images and on real lesions through the one-pass screen."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from PIL import Image

from anomaly_detection.feature_detector import (
    FeatureExtractor,
    benign_percentile_threshold,
    calibration_rows,
    feature_spec,
    fit_rows,
    source_weights,
    upper_quantile,
)
from anomaly_detection.fit_feature_detector import degraded_lesions, fit_lesion_gate, unseen_source_margins
from anomaly_detection.gate import (
    GATE_QUANTILE,
    MAX_NOISE_SD,
    MIN_SIDE,
    Gate,
    LesionScreen,
    cheap_reasons,
    noise_sd,
    original,
)
from data.images import load_rgb, to_uint8
from data.manifest import read_manifest
from data.non_lesion import (
    KINDS,
    PHOTOS,
    development_photographs,
    development_set,
    generated,
    photographs,
    skin_crops,
)

SHIPPED_GATE = ROOT / "checkpoints" / "gate.safetensors"
SHIPPED_DETECTOR = ROOT / "checkpoints" / "feature_detector.safetensors"
LEVELS = ("block2", "block3", "block4", "block5", "block6")


def colour_noise(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_cheap_checks_name_the_reason():
    grey = np.repeat(colour_noise(1)[..., :1], 3, axis=3)
    flat = np.full((1, 224, 224, 3), (200, 150, 140), dtype=np.uint8)
    images = np.concatenate([colour_noise(2), grey, flat])
    reasons = cheap_reasons(images, [(20, 20), (300, 200), (300, 200), (300, 200)])
    assert reasons[0].startswith("image too small") and f"at least {MIN_SIDE} px" in reasons[0]
    assert reasons[1] == ""
    assert reasons[2].startswith("greyscale image")
    assert reasons[3].startswith("near-constant image")


def test_noise_estimate_reads_added_noise_and_ignores_smooth_structure():
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:300, 0:400]
    smooth = np.stack([120 + 60 * np.sin(xs / 30), 90 + 40 * np.cos(ys / 25), 80 + 0 * xs], axis=-1)
    assert noise_sd(Image.fromarray(smooth.round().astype(np.uint8))) < 1
    for sd in (4, 12):
        noisy = np.clip(smooth + rng.normal(0, sd, smooth.shape), 0, 255).round().astype(np.uint8)
        luminance_sd = sd * np.sqrt(0.299 ** 2 + 0.587 ** 2 + 0.114 ** 2)  # independent noise per channel
        assert noise_sd(Image.fromarray(noisy)) == pytest.approx(luminance_sd, rel=0.15)
    # A large image is judged area-averaged to NOISE_SIDE: the same noise per pixel reads as less.
    big = np.clip(128 + rng.normal(0, 12, (1024, 1024, 3)), 0, 255).round().astype(np.uint8)
    assert noise_sd(Image.fromarray(big)) < noise_sd(Image.fromarray(big[:256, :256])) / 2
    assert original(Image.fromarray(big)) == (1024, 1024, noise_sd(Image.fromarray(big)))


def test_the_noise_check_refuses_a_noisy_real_lesion_and_skips_unmeasured_originals(real_data):
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    image = load_rgb(df.loc[df["split"] == "calib", "path"].iloc[0])
    clean = np.asarray(image, dtype=float)
    noisy = Image.fromarray(np.clip(clean + np.random.default_rng(0).normal(0, 12, clean.shape), 0, 255)
                            .round().astype(np.uint8))
    pixels = np.stack([to_uint8(image, 224), to_uint8(noisy, 224), to_uint8(noisy, 224)])
    reasons = cheap_reasons(pixels, [original(image), original(noisy), noisy.size])
    assert original(image).noise_sd < MAX_NOISE_SD < original(noisy).noise_sd
    assert reasons[0] == "" and reasons[1].startswith("image too noisy to assess") and reasons[2] == ""


def test_non_lesion_set_is_deterministic_and_covers_every_kind():
    first, again, other = generated(240, seed=0), generated(48, seed=0), generated(24, seed=1)
    assert len(first) == 240 >= 200
    assert {item.kind for item in first} == set(KINDS)
    # Every image has its own seeded stream: a shorter set is the same images as the start of a longer one.
    assert all(a.name == b.name and np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert not np.array_equal(first[0].image, other[0].image)
    assert all(item.image.dtype == np.uint8 and item.image.ndim == 3 and item.image.shape[2] == 3 for item in first)
    assert len(photographs()) >= 15  # skimage.data ships these inside its wheel
    assert all(min(item.image.shape[:2]) <= 48 for item in first if item.kind == "tiny")


@pytest.fixture(scope="module")
def spec() -> dict:
    return feature_spec(LEVELS)


def test_gate_verdicts_from_features(spec):
    rng = np.random.default_rng(0)
    dims = {"block2": 40, "block3": 80, "block4": 112, "block5": 192, "block6": 320}
    lesions = {level: rng.normal(0, 1, (300, d)) for level, d in dims.items()}
    gate = Gate.fit(lesions, spec)
    gate.set_threshold(float(np.quantile(gate.score(lesions), 0.99)))
    probe = {level: np.r_[value[:2], value[:1] + 25] for level, value in lesions.items()}
    pixels = colour_noise(3)
    verdicts = gate.check_features(probe, pixels, [(300, 200), (40, 300), (300, 200)])
    assert verdicts[0].ok and verdicts[0].reason == "" and np.isnan(verdicts[0].probe_score)  # no probe fitted
    assert not verdicts[1].ok and verdicts[1].reason.startswith("image too small")
    assert not verdicts[2].ok and verdicts[2].reason.startswith("does not look like a dermoscopic lesion")
    assert verdicts[2].distance > verdicts[2].threshold == gate.threshold
    with pytest.raises(ValueError, match="2 originals for 3 images"):
        gate.check_features(probe, pixels, [(300, 200)] * 2)
    # The probe learns a direction the Gaussian barely sees: a small shift of a few block2 features.
    shifted = {level: value[:100].copy() for level, value in lesions.items()}
    shifted["block2"][:, :4] += 2.5
    gate.fit_probe(lesions, shifted)
    gate.set_threshold(float(gate.score(lesions).max()) + 10)  # the distance alone passes all of these
    gate.set_probe_threshold(float(np.quantile(gate.probe_score(lesions), 0.99)))
    mixed = {level: np.r_[lesions[level][:1], shifted[level][:1]] for level in dims}
    ok, flagged = gate.check_features(mixed, colour_noise(2), [(300, 200)] * 2)
    assert ok.ok and not flagged.ok and flagged.reason.startswith("looks like a non-lesion image")
    assert flagged.distance < gate.threshold and flagged.probe_score >= flagged.probe_threshold


def lesion_pixels(rows) -> np.ndarray:
    return np.stack([to_uint8(load_rgb(p), 224) for p in rows["path"]])


@pytest.mark.real_data
def test_a_gate_fitted_on_few_real_lesions_flags_non_lesions(real_data, spec, tmp_path):
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    fit = fit_rows(df, benign_only=False).groupby("dataset").sample(50, random_state=0)
    calib = calibration_rows(df, benign_only=False).groupby("dataset").sample(25, random_state=0)
    held_out = df[df["split"].isin(["test", "external"])].groupby("dataset").sample(10, random_state=0)
    extractor = FeatureExtractor(spec)
    fit_features = extractor(lesion_pixels(fit))
    gate = Gate.fit(fit_features, spec, source_weights(fit["dataset"]))
    calib_features = extractor(lesion_pixels(calib))
    gate.set_threshold(benign_percentile_threshold(gate.score(calib_features), calib["dataset"], GATE_QUANTILE)[0])
    fit_paths = {d: list(part["path"]) for d, part in fit_rows(df, benign_only=False).groupby("dataset")}
    development = development_set(fit_paths, n=24, skin_per_source=4)
    gate.fit_probe(fit_features, extractor(np.stack(
        [to_uint8(Image.fromarray(i.image), 224) for i in development])))
    gate.set_probe_threshold(benign_percentile_threshold(gate.probe_score(calib_features), calib["dataset"],
                                                         GATE_QUANTILE)[0])
    loaded = Gate.load(gate.save(tmp_path / "gate"))  # strict round trip: the same verdicts after loading
    non_lesion = [item for item in generated(48, seed=3) if item.kind not in ("flat", "tiny")]
    pixels = np.stack([to_uint8(Image.fromarray(i.image), 224) for i in non_lesion])
    flagged = [not v.ok for v in loaded.check_batch(pixels)]
    assert np.mean(flagged) >= 0.8, [i.name for i, f in zip(non_lesion, flagged) if not f]
    lesions = loaded.check_batch(lesion_pixels(held_out))
    assert sum(not v.ok for v in lesions) <= 2
    again = gate.check_batch(lesion_pixels(held_out), extractor=extractor)
    assert [v.distance for v in lesions] == pytest.approx([v.distance for v in again], rel=1e-5)
    assert [v.probe_score for v in lesions] == pytest.approx([v.probe_score for v in again], rel=1e-4, abs=1e-4)


@pytest.mark.real_data
def test_the_development_set_shares_no_image_with_the_evaluation_set(real_data):
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    fit = df[df["split"] == "fit"]
    development = development_set({d: list(p["path"][:30]) for d, p in fit.groupby("dataset")}, n=60,
                                  skin_per_source=5)
    assert "photo" not in {i.kind for i in development}
    crops = {i.name.split("photo_crop_", 1)[1] for i in development if i.kind == "photo_crop"}
    assert crops and crops <= set(development_photographs()) and not crops & set(PHOTOS)  # scikit-image's stay unseen
    assert {i.kind for i in development} >= {"flat", "noise", "text", "skin_crop", "photo_crop"}
    evaluation = generated(240) + skin_crops(list(df.loc[df["split"] == "test", "path"][:60]), 20)
    digest = {hashlib.sha256(i.image.tobytes()).hexdigest() for i in evaluation}
    assert not digest & {hashlib.sha256(i.image.tobytes()).hexdigest() for i in development}


@pytest.mark.real_data
def test_degraded_lesions_are_seeded_fit_lesions_at_the_backbone_size(real_data):
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    fit = df[df["split"] == "fit"]
    paths = {d: list(p["path"][:20]) for d, p in fit.groupby("dataset")}
    images, again = degraded_lesions(paths, 6, 64, "squash"), degraded_lesions(paths, 6, 64, "squash")
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8 and np.array_equal(images, again)
    assert not np.array_equal(images, degraded_lesions(paths, 6, 64, "squash", seed=5))
    assert degraded_lesions(paths, 0, 64, "squash").shape == (0, 64, 64, 3)


@pytest.mark.real_data
def test_skin_crops_are_deterministic_upscaled_corners(real_data):
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    paths = list(df.loc[(df["dataset"] == "ham10000") & (df["split"] == "test"), "path"][:40])
    crops, again = skin_crops(paths, 10, seed=0), skin_crops(paths, 10, seed=0)
    assert 5 <= len(crops) <= 10
    assert all(c.image.shape == (160, 160, 3) and c.kind == "skin_crop" for c in crops)
    assert [c.name for c in crops] == [c.name for c in again]


@pytest.mark.real_data
@pytest.mark.skipif(not SHIPPED_GATE.is_file(), reason="run anomaly_detection/fit_feature_detector.py first")
def test_shipped_gate_flags_generated_non_lesions_and_passes_real_lesions(real_data):
    screen = LesionScreen.load(SHIPPED_GATE, SHIPPED_DETECTOR)
    items = generated(64, seed=0)
    pixels = np.stack([to_uint8(Image.fromarray(i.image), screen.input_size) for i in items])
    sizes = [(i.image.shape[1], i.image.shape[0]) for i in items]
    result = screen.run(pixels, sizes)
    flagged = [not v.ok for v in result.gate]
    assert np.mean(flagged) >= 0.95, [i.name for i, f in zip(items, flagged) if not f]
    assert all(v.reason for v in result.gate if not v.ok)
    assert all(np.isfinite(v.probe_score) for v in result.gate)
    df = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    lesions = df[df["split"].isin(["test", "external"])].groupby("dataset").sample(20, random_state=0)
    decoded = [load_rgb(p) for p in lesions["path"]]
    lesion_pixels_, originals = zip(*[screen.inputs(img) for img in decoded])
    lesion_result = screen.run(np.stack(lesion_pixels_), originals)
    assert sum(not v.ok for v in lesion_result.gate) <= 1
    assert lesion_result.anomaly_score.shape == (40,) and np.isfinite(lesion_result.anomaly_score).all()
    # One pass serves both: the gate alone gives the same verdicts as the screen.
    alone = screen.gate.check_batch(pixels, sizes, screen.extractor)
    assert [v.ok for v in alone] == [v.ok for v in result.gate]


@pytest.mark.real_data
def test_unseen_source_margin_lets_a_single_source_gate_pass_the_other_source(real_data):
    """Two sources whose lesion features differ by a shift (a new device): a gate fitted and calibrated on one alone
    refuses many of the other's lesions; the margin found on calib+val brings that down to the tolerance."""
    mixed = read_manifest(ROOT / "data" / "manifests" / "mixed.csv")
    rows = []
    for source in ("ham10000", "isic2017"):
        fit = mixed[(mixed["split"] == "fit") & (mixed["dataset"] == source)].sample(300, random_state=0)
        rows += [fit, fit.assign(split="calib")]  # calib rows only need a dataset and a split here
    df = pd.concat(rows, ignore_index=True)
    rng = np.random.default_rng(0)
    shift = np.where(df["dataset"] == "isic2017", 0.6, 0.0)[:, None]
    features = {"block2": rng.normal(size=(len(df), 40)) + shift}

    def far_away(pixels: np.ndarray) -> dict[str, np.ndarray]:  # the development non-lesions' features
        return {"block2": rng.normal(4.0, 1.0, size=(len(pixels), 40))}

    spec = feature_spec(("block2",))
    found = unseen_source_margins(df, features, spec, GATE_QUANTILE, True, far_away, tolerance=0.01,
                                  degraded_per_source=0)
    pair = found["pairs"]["ham10000 -> isic2017"]
    assert pair["flagged_at_calibrated_thresholds"] > 0.05 and found["distance_margin"] == max(
        p["distance_margin"] for p in found["pairs"].values()) > 1
    single = fit_lesion_gate(df, features, spec, True, far_away, 5, ["ham10000"])
    assert single.meta["probe"]["n_lesions"] == 300 + 5 and single.meta["probe"]["degraded_lesions"]["per_source"] == 5
    calib = df["split"] == "calib"
    own, other = (calib & (df["dataset"] == "ham10000")).to_numpy(), (calib & (df["dataset"] == "isic2017")).to_numpy()
    distance = single.score(features)
    threshold = upper_quantile(distance[own], GATE_QUANTILE)
    assert np.mean(distance[other] >= threshold) > 0.05
    assert np.mean(distance[other] >= found["distance_margin"] * threshold) <= 0.01 + 1 / other.sum()
