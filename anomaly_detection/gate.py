"""The out-of-distribution gate: "is this a dermoscopic lesion at all?", asked before any verdict.

An image the gate does not pass gets "cannot assess" with a reason, never benign or malignant. In order:
1. too small: a side under `MIN_SIDE` pixels (64) in the original image;
2. near-constant: every channel's pixel standard deviation under `MIN_SPREAD` (4 grey levels of 255) at the
   backbone's size, before colour constancy (a flat colour, a blank frame);
3. greyscale: mean colour spread max(R, G, B) - min(R, G, B) under `MIN_CHROMA` (3 grey levels): dermoscopy is in
   colour, and every model here was trained on colour;
4. unlike any lesion: the Mahalanobis distance of the ImageNet EfficientNet-Lite0 features (anomaly_detection/
   feature_detector.py: the same preprocessing and backbone pass as the feature detector) to a Gaussian of ALL
   lesion images (both classes, both sources, `fit` split) at or above `gate_threshold`;
5. like a non-lesion image: a linear probe on the same (standardised) features, trained to tell `fit` lesions from
   a development set of non-lesion images (data/non_lesion.py `development_set`: generated images with their own
   seed, no photographs, and skin crops of `fit` images; an "outlier exposure" check), scores at or above
   `probe_threshold`. Check 4 models what lesions look like and cannot see that a plain patch of skin is not one
   (a one-class model put such crops between the lesions and the threshold); check 5 learns that from examples.
Checks 1-3 are fixed constants (`check_constants` records the margin they leave on the calibration lesions). The
thresholds of checks 4 and 5 are calibrated on lesions only: the largest, over sources, of each source's 99.7th
percentile of the `calib` + `val` lesion scores (`test` and `external` are never read), rounded so that each flags at
most 0.3% of every source's calibration lesions (feature_detector.upper_quantile), then loosened by the margin that a
leave-one-source-out gate needs to refuse at most 1% of an unseen source's lesions (fit_feature_detector.py). A gate
without a fitted probe (no `probe_threshold`) skips check 5.

API for a predictor: `LesionScreen.load(gate_path, detector_path)` then `screen.run(pixels, sizes)` with pixels from
`screen.pixels(pil_image)`; one backbone pass gives the gate's verdicts and the feature detector's anomaly scores.
`Gate.check_batch(images, sizes)` runs the gate alone.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
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


def pixel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 -> (largest per-channel standard deviation, mean of max - min over channels) per image."""
    x = np.asarray(images, dtype=np.float32)
    spread = x.std(axis=(1, 2)).max(axis=1)
    chroma = (x.max(axis=3) - x.min(axis=3)).mean(axis=(1, 2))
    return spread, chroma


def cheap_reasons(images: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[str]:
    """Checks 1-3 for uint8 N x H x W x 3 images whose originals were `sizes` (width, height); "" where all pass."""
    spread, chroma = pixel_statistics(images)
    reasons = []
    for (w, h), s, c in zip(sizes, spread, chroma):
        if min(w, h) < MIN_SIDE:
            reasons.append(f"image too small to assess ({w}x{h} px; a side needs at least {MIN_SIDE} px)")
        elif s < MIN_SPREAD:
            reasons.append(f"near-constant image (pixel spread {s:.1f} of 255)")
        elif c < MIN_CHROMA:
            reasons.append("greyscale image (dermoscopic images are in colour)")
        else:
            reasons.append("")
    return reasons


def check_constants(spread: np.ndarray, chroma: np.ndarray) -> dict[str, float]:
    """The fixed checks and the smallest spread/chroma seen on (lesion) images: the margin they leave."""
    return {"min_side": MIN_SIDE, "min_spread": MIN_SPREAD, "min_chroma": MIN_CHROMA,
            "lesion_min_spread": float(np.min(spread)), "lesion_min_chroma": float(np.min(chroma))}


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
                       sizes: Sequence[tuple[int, int]] | None = None) -> list[GateResult]:
        """Verdicts from already-extracted features and the pixels they came from (uint8 N x H x W x 3 at the
        backbone's size); `sizes` are the original (width, height), default the pixels' own size."""
        sizes = sizes if sizes is not None else [(pixels.shape[2], pixels.shape[1])] * len(pixels)
        if len(sizes) != len(pixels):
            raise ValueError(f"{len(sizes)} sizes for {len(pixels)} images")
        distances, threshold = self.score(features), self.threshold
        use_probe = self.meta.get("probe_threshold") is not None
        probe_threshold = float(self.meta["probe_threshold"]) if use_probe else float("nan")
        probes = self.probe_score(features) if use_probe else np.full(len(pixels), np.nan)
        results = []
        for reason, d, q in zip(cheap_reasons(pixels, sizes), distances, probes):
            if not reason and d >= threshold:
                reason = f"does not look like a dermoscopic lesion (feature distance {d:.0f} >= {threshold:.0f})"
            elif not reason and use_probe and q >= probe_threshold:
                reason = f"looks like a non-lesion image (probe score {q:.1f} >= {probe_threshold:.1f})"
            results.append(GateResult(not reason, reason, float(d), threshold, float(q), probe_threshold))
        return results

    def check_batch(self, images: np.ndarray, sizes: Sequence[tuple[int, int]] | None = None,
                    extractor: FeatureExtractor | None = None) -> list[GateResult]:
        """uint8 N x H x W x 3 (any one size; resized to the backbone's) -> one GateResult per image."""
        extractor = extractor or extractor_for([self.meta])
        pixels = extractor.fit_size(np.asarray(images, dtype=np.uint8))
        if sizes is None:
            sizes = [(images.shape[2], images.shape[1])] * len(images)
        return self.check_features(extractor(pixels), pixels, sizes)


def check_paths(gate: Gate, features: Features, paths: Sequence[str], size: int, rule: str,
                chunk: int = 256) -> tuple[list[GateResult], np.ndarray, np.ndarray]:
    """Verdicts for image files whose features are already extracted (row-aligned with `paths`), decoding the files
    in chunks for the cheap checks (pixels at `size` by `rule`, original sizes); also each image's pixel spread and
    chroma (pixel_statistics)."""
    verdicts, spreads, chromas = [], [], []
    for start in range(0, len(paths), chunk):
        decoded = [load_rgb(path) for path in paths[start:start + chunk]]
        pixels = np.stack([to_uint8(img, size, rule) for img in decoded])
        rows = np.arange(start, start + len(decoded))
        verdicts += gate.check_features({k: v[rows] for k, v in features.items()}, pixels, [i.size for i in decoded])
        spread, chroma = pixel_statistics(pixels)
        spreads.append(spread)
        chromas.append(chroma)
    return verdicts, np.concatenate(spreads), np.concatenate(chromas)


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
        """A decoded PIL image -> H x W x 3 uint8 at the backbone's size (pass image.size as its size to `run`)."""
        return self.extractor.pixels(image)

    def run(self, pixels: np.ndarray, sizes: Sequence[tuple[int, int]] | None = None) -> ScreenResult:
        """uint8 N x H x W x 3 (ideally from `pixels`) + original (width, height) per image -> ScreenResult."""
        pixels = self.extractor.fit_size(np.asarray(pixels, dtype=np.uint8))
        features = self.extractor(pixels)
        verdicts = self.gate.check_features(features, pixels, sizes)
        if self.detector is None:
            nan = np.full(len(pixels), np.nan)
            return ScreenResult(verdicts, nan, np.zeros(len(pixels), dtype=bool), float("nan"))
        scores = self.detector.score(features)
        return ScreenResult(verdicts, scores, self.detector.anomalous(scores), self.detector.threshold)
