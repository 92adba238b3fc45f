"""The out-of-distribution gate: "is this a dermoscopic lesion at all?", asked before any verdict.

An image the gate does not pass gets "cannot assess" with a reason, never benign or malignant. In order:
1. too small: a side under `MIN_SIDE` pixels (64) in the original image;
2. near-constant: every channel's pixel standard deviation under `MIN_SPREAD` (4 grey levels of 255) at the
   backbone's size, before colour constancy (a flat colour, a blank frame);
3. greyscale: mean colour spread max(R, G, B) - min(R, G, B) under `MIN_CHROMA` (3 grey levels): dermoscopy is in
   colour, and every model here was trained on colour;
3b. too noisy: the original image's sensor-noise estimate (`noise_sd`) over `MAX_NOISE_SD` grey levels. Under heavy
   noise the classifier's probabilities collapse towards benign (studies/acquisition_shift.py: sensitivity 0.90 ->
   0.24 with noise of sd 12), a silent failure that only this check turns into "cannot assess";
4. unlike any lesion: the Mahalanobis distance of the ImageNet EfficientNet-Lite0 features (anomaly_detection/
   feature_detector.py: the same preprocessing and backbone pass as the feature detector) to a Gaussian of ALL
   lesion images (both classes, both sources, `fit` split) at or above `gate_threshold`;
5. like a non-lesion image: a linear probe on the same (standardised) features, trained to tell `fit` lesions from
   a development set of non-lesion images (data/non_lesion.py `development_set`: generated images with their own
   seed, crops of the photographs bundled with scikit-learn and matplotlib (none of scikit-image's, which the
   evaluation uses), and skin crops of `fit` images; an "outlier exposure" check) and from degraded copies of `fit`
   lesions (lost resolution, noise, JPEG: a worse camera's lesion is still a lesion), scores at or above
   `probe_threshold`. Check 4 models what lesions look like and cannot see that a plain patch of skin is not one
   (a one-class model put such crops between the lesions and the threshold); check 5 learns that from examples.
Checks 1-3b are fixed constants (`check_constants` records the margin they leave on the calibration lesions). The
thresholds of checks 4 and 5 are calibrated on lesions only: the largest, over sources, of each source's 99.7th
percentile of the `calib` + `val` lesion scores (`test` and `external` are never read), rounded so that each flags at
most 0.3% of every source's calibration lesions (feature_detector.upper_quantile), then loosened by the margin that a
leave-one-source-out gate needs to refuse at most 1% of an unseen source's lesions (fit_feature_detector.py). A gate
without a fitted probe (no `probe_threshold`) skips check 5.

API for a predictor: `LesionScreen.load(gate_path, detector_path)` then `screen.run(pixels, originals)` with both
from `screen.inputs(pil_image)`; one backbone pass gives the gate's verdicts and the feature detector's anomaly
scores. `Gate.check_batch(images, originals)` runs the gate alone.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from torch import nn

from anomaly_detection.feature_detector import (
    MULTI_SCALE,
    FeatureDetector,
    FeatureExtractor,
    Features,
    FittedGaussian,
    GaussianModel,
    extractor_for,
)
from data.images import load_rgb, to_uint8

MIN_SIDE = 64
MIN_SPREAD = 4.0
MIN_CHROMA = 3.0
# Grey levels. Fixed from calib+val lesions: every one of 1,898 measures under it but a dense-hair image (9.1); their
# 99.7th percentile is 2.0, and the same images with noise of sd 12 per channel measure 7.2-10.
MAX_NOISE_SD = 6.0
# Larger images are measured area-averaged to this short side, near the models' scale. Shrinking packs texture into
# the finest scale: ISIC 2017 calib+val lesions read a 99.7th percentile of 2.0 at 256 px and 4.5 at 150 px, so a
# full-size image, shrunk less than the 200x150 HAM10000 copies the constant was fixed on, reads lower, not higher.
NOISE_SIDE = 256
NOISE_QUANTILE = 0.2  # of |finest diagonal Haar coefficients|: hair and edges cover fewer pixels than that
GATE_QUANTILE = 0.997
UNSEEN_TOLERANCE = 0.01  # at most this share of a source's lesions refused by a gate that never saw that source
PROBE_C = 0.1  # the probe's inverse L2 strength: fixed, not tuned on any evaluation image
# Fixed in advance, not tuned on any non-lesion image: every stage from stride 8 to the head, since an image can be
# unlike a lesion in texture (early stages) as well as in content (late stages).
GATE_LEVELS = (*MULTI_SCALE, "head")


@dataclass(frozen=True)
class GateResult:
    """One image's gate verdict: `ok` False means "cannot assess", and `reason` says why. The scores are given
    whatever the verdict (a cheap check does not skip them)."""

    ok: bool
    reason: str
    distance: float
    threshold: float
    probe_score: float = float("nan")
    probe_threshold: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Original(NamedTuple):
    """What the gate needs of an image before it is resized: its size and its noise (NaN: not measured)."""

    width: int
    height: int
    noise_sd: float = float("nan")


def noise_sd(image: Image.Image) -> float:
    """Sensor noise in grey levels, from the luminance's finest diagonal Haar wavelet coefficients, which are pure
    noise wherever the image is smooth: their NOISE_QUANTILE quantile, scaled to a Gaussian's sd (a robust
    estimate in the style of Donoho & Johnstone's median one, with a lower quantile so that dense hair does not read
    as noise). Measured at the original resolution, or area-averaged to a short side of NOISE_SIDE px when larger:
    noise averages out as an image is shrunk, so a large image is judged near the scale the models see it at."""
    if min(image.size) > NOISE_SIDE:
        k = NOISE_SIDE / min(image.size)
        image = image.resize((round(image.width * k), round(image.height * k)), Image.Resampling.BOX)
    grey = np.asarray(image.convert("RGB"), dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    g = grey[: grey.shape[0] // 2 * 2, : grey.shape[1] // 2 * 2]
    if not g.size:
        return float("nan")
    diagonal = (g[0::2, 0::2] - g[0::2, 1::2] - g[1::2, 0::2] + g[1::2, 1::2]) / 2
    return float(np.quantile(np.abs(diagonal), NOISE_QUANTILE) / norm.ppf(0.5 + NOISE_QUANTILE / 2))


def original(image: Image.Image) -> Original:
    return Original(image.width, image.height, noise_sd(image))


def pixel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 -> (largest per-channel standard deviation, mean of max - min over channels) per image."""
    x = np.asarray(images, dtype=np.float32)
    spread = x.std(axis=(1, 2)).max(axis=1)
    chroma = (x.max(axis=3) - x.min(axis=3)).mean(axis=(1, 2))
    return spread, chroma


def cheap_reasons(images: np.ndarray, originals: Sequence[Original | tuple[int, int]]) -> list[str]:
    """Checks 1-3b for uint8 N x H x W x 3 images and their `originals` (an Original, or a (width, height) whose
    noise was not measured); "" where all pass."""
    spread, chroma = pixel_statistics(images)
    reasons = []
    for (w, h, noise), s, c in zip((Original(*o) for o in originals), spread, chroma):
        if min(w, h) < MIN_SIDE:
            reasons.append(f"image too small to assess ({w}x{h} px; a side needs at least {MIN_SIDE} px)")
        elif s < MIN_SPREAD:
            reasons.append(f"near-constant image (pixel spread {s:.1f} of 255)")
        elif c < MIN_CHROMA:
            reasons.append("greyscale image (dermoscopic images are in colour)")
        elif noise > MAX_NOISE_SD:
            reasons.append(f"image too noisy to assess (estimated noise {noise:.1f} grey levels; at most "
                           f"{MAX_NOISE_SD:.0f})")
        else:
            reasons.append("")
    return reasons


def check_constants(spread: np.ndarray, chroma: np.ndarray, noise: np.ndarray) -> dict[str, float]:
    """The fixed checks and the smallest spread/chroma and largest noise seen on (lesion) images: their margins."""
    return {"min_side": MIN_SIDE, "min_spread": MIN_SPREAD, "min_chroma": MIN_CHROMA, "max_noise_sd": MAX_NOISE_SD,
            "lesion_min_spread": float(np.min(spread)), "lesion_min_chroma": float(np.min(chroma)),
            "lesion_max_noise_sd": float(np.nanmax(noise))}


class GateModel(nn.Module):
    """What the gate's checkpoint holds: the lesions' Gaussian and the non-lesion probe (standardisation + linear)."""

    def __init__(self, gaussian: GaussianModel):
        super().__init__()
        self.gaussian = gaussian
        width = sum(gaussian.dims.values())
        self.register_buffer("probe_center", torch.zeros(width))
        self.register_buffer("probe_scale", torch.ones(width))
        self.probe = nn.Linear(width, 1)

    def stacked(self, features: Features) -> np.ndarray:
        return np.concatenate([np.asarray(features[level], dtype=np.float64) for level in self.gaussian.dims], axis=1)

    @torch.no_grad()
    def probe_score(self, features: Features) -> np.ndarray:
        """The probe's logit of "not a lesion" per row."""
        x = (self.stacked(features) - self.probe_center.double().numpy()) / self.probe_scale.double().numpy()
        return x @ self.probe.weight.double().numpy()[0] + float(self.probe.bias)


class Gate(FittedGaussian):
    """All lesions' Gaussian + the non-lesion probe + the cheap checks (module docstring)."""

    kind = "gate"
    threshold_key = "gate_threshold"

    @property
    def gaussian(self) -> GaussianModel:
        return self.model.gaussian

    @classmethod
    def wrap(cls, gaussian: GaussianModel) -> GateModel:
        return GateModel(gaussian)

    def fit_probe(self, lesions: Features, non_lesions: Features, c: float = PROBE_C) -> None:
        """Train the probe: logistic regression (L2, inverse strength `c`, classes weighted equally) on standardised
        features, non-lesion = 1. Its threshold is set separately, on lesions (`set_probe_threshold`)."""
        x = np.r_[self.model.stacked(lesions), self.model.stacked(non_lesions)]
        y = np.r_[np.zeros(len(next(iter(lesions.values())))), np.ones(len(next(iter(non_lesions.values()))))]
        center, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        fitted = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit((x - center) / scale, y)
        with torch.no_grad():
            self.model.probe_center.copy_(torch.from_numpy(center))
            self.model.probe_scale.copy_(torch.from_numpy(scale))
            self.model.probe.weight.copy_(torch.from_numpy(fitted.coef_))
            self.model.probe.bias.copy_(torch.from_numpy(fitted.intercept_))
        self.meta["probe"] = {"model": "logistic regression on standardised gate features", "C": c,
                              "class_weight": "balanced", "n_lesions": int(np.sum(y == 0)),
                              "n_non_lesions": int(np.sum(y == 1))}

    def set_probe_threshold(self, value: float, **record: Any) -> None:
        self.meta.update({"probe_threshold": float(value), **record})

    def probe_score(self, features: Features) -> np.ndarray:
        return self.model.probe_score(features)

    def check_features(self, features: Features, pixels: np.ndarray,
                       originals: Sequence[Original | tuple[int, int]] | None = None) -> list[GateResult]:
        """Verdicts from already-extracted features and the pixels they came from (uint8 N x H x W x 3 at the
        backbone's size); `originals` describe the images before resizing (`original(image)`; a (width, height)
        skips the noise check), default the pixels' own size."""
        originals = originals if originals is not None else [(pixels.shape[2], pixels.shape[1])] * len(pixels)
        if len(originals) != len(pixels):
            raise ValueError(f"{len(originals)} originals for {len(pixels)} images")
        distances, threshold = self.score(features), self.threshold
        use_probe = self.meta.get("probe_threshold") is not None
        probe_threshold = float(self.meta["probe_threshold"]) if use_probe else float("nan")
        probes = self.probe_score(features) if use_probe else np.full(len(pixels), np.nan)
        results = []
        for reason, d, q in zip(cheap_reasons(pixels, originals), distances, probes):
            if not reason and d >= threshold:
                reason = f"does not look like a dermoscopic lesion (feature distance {d:.0f} >= {threshold:.0f})"
            elif not reason and use_probe and q >= probe_threshold:
                reason = f"looks like a non-lesion image (probe score {q:.1f} >= {probe_threshold:.1f})"
            results.append(GateResult(not reason, reason, float(d), threshold, float(q), probe_threshold))
        return results

    def check_batch(self, images: np.ndarray, originals: Sequence[Original | tuple[int, int]] | None = None,
                    extractor: FeatureExtractor | None = None) -> list[GateResult]:
        """uint8 N x H x W x 3 (any one size; resized to the backbone's) -> one GateResult per image; without
        `originals`, the images are their own originals."""
        extractor = extractor or extractor_for([self.meta])
        pixels = extractor.fit_size(np.asarray(images, dtype=np.uint8))
        if originals is None:
            originals = [original(Image.fromarray(image)) for image in np.asarray(images, dtype=np.uint8)]
        return self.check_features(extractor(pixels), pixels, originals)


def check_paths(gate: Gate, features: Features, paths: Sequence[str], size: int, rule: str,
                chunk: int = 256) -> tuple[list[GateResult], np.ndarray, np.ndarray, np.ndarray]:
    """Verdicts for image files whose features are already extracted (row-aligned with `paths`), decoding the files
    in chunks for the cheap checks (pixels at `size` by `rule`, originals); also each image's pixel spread and
    chroma (pixel_statistics) and noise (noise_sd)."""
    verdicts, spreads, chromas, noises = [], [], [], []
    for start in range(0, len(paths), chunk):
        decoded = [load_rgb(path) for path in paths[start:start + chunk]]
        pixels = np.stack([to_uint8(img, size, rule) for img in decoded])
        rows = np.arange(start, start + len(decoded))
        originals = [original(img) for img in decoded]
        verdicts += gate.check_features({k: v[rows] for k, v in features.items()}, pixels, originals)
        spread, chroma = pixel_statistics(pixels)
        spreads.append(spread)
        chromas.append(chroma)
        noises.append([o.noise_sd for o in originals])
    return verdicts, np.concatenate(spreads), np.concatenate(chromas), np.concatenate(noises)


@dataclass
class ScreenResult:
    """What one backbone pass gives a predictor: the gate's verdicts and the feature detector's scores."""

    gate: list[GateResult]
    anomaly_score: np.ndarray       # N feature-detector scores (NaN without a detector)
    anomalous: np.ndarray           # N bools: anomaly_score >= the detector's anomaly_threshold
    anomaly_threshold: float


class LesionScreen:
    """The gate and (optionally) the feature detector over one shared backbone pass."""

    def __init__(self, gate: Gate, detector: FeatureDetector | None = None, device: str | torch.device = "cpu"):
        self.gate, self.detector = gate, detector
        self.extractor = extractor_for([gate.meta] + ([detector.meta] if detector else []), device)

    @classmethod
    def load(cls, gate_path: str | os.PathLike, detector_path: str | os.PathLike | None = None,
             device: str | torch.device = "cpu") -> LesionScreen:
        """Strict loads of checkpoints/gate.safetensors (+ checkpoints/feature_detector.safetensors)."""
        return cls(Gate.load(gate_path), FeatureDetector.load(detector_path) if detector_path else None, device)

    @property
    def input_size(self) -> int:
        return self.extractor.preprocess.size

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded PIL image -> H x W x 3 uint8 at the backbone's size."""
        return self.extractor.pixels(image)

    def inputs(self, image: Image.Image) -> tuple[np.ndarray, Original]:
        """What `run` needs of one decoded image: its pixels at the backbone's size and its Original."""
        return self.pixels(image), original(image)

    def run(self, pixels: np.ndarray, originals: Sequence[Original | tuple[int, int]] | None = None) -> ScreenResult:
        """uint8 N x H x W x 3 (ideally from `pixels`) + each image's `original` -> ScreenResult."""
        pixels = self.extractor.fit_size(np.asarray(pixels, dtype=np.uint8))
        features = self.extractor(pixels)
        verdicts = self.gate.check_features(features, pixels, originals)
        if self.detector is None:
            nan = np.full(len(pixels), np.nan)
            return ScreenResult(verdicts, nan, np.zeros(len(pixels), dtype=bool), float("nan"))
        scores = self.detector.score(features)
        return ScreenResult(verdicts, scores, self.detector.anomalous(scores), self.detector.threshold)
