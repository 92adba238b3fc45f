"""Tensor-side preprocessing and batched augmentation.

`Preprocess` is built from a checkpoint's sidecar (`preprocess_meta`), so the resize rule, input size and
normalization are written once, at training time, and every later user (evaluation, inference, ONNX export, the
demo) derives them from the checkpoint instead of re-typing them.

`augment` works on a whole uint8 batch on the training device: flips and 90-degree rotations (dermoscopy has no
canonical orientation), a random resized crop, and brightness/contrast/saturation/hue-ish jitter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data.images import load_rgb, to_uint8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_meta(size: int, rule: str = "squash", normalization: str = "imagenet") -> dict[str, Any]:
    """The sidecar fields that define preprocessing. normalization: `imagenet` (mean/std) or `unit` ([0,1])."""
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)} if normalization == "imagenet" else "unit"
    return {"input_size": size, "resize": rule, "normalization": norm}


@dataclass(frozen=True)
class Preprocess:
    size: int
    rule: str
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocess:
        norm = meta["normalization"]
        if norm == "unit":
            return cls(meta["input_size"], meta["resize"], None, None)
        return cls(meta["input_size"], meta["resize"], tuple(norm["mean"]), tuple(norm["std"]))

    def pixels(self, path_or_image) -> np.ndarray:
        """File path or PIL image -> HxWx3 uint8 at the checkpoint's size, through the one decoder."""
        img = load_rgb(path_or_image) if not hasattr(path_or_image, "mode") else path_or_image.convert("RGB")
        return to_uint8(img, self.size, self.rule)

    def tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxHxW (any device) -> float input for the model."""
        x = batch.float().div_(255.0)
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def batch(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return self.tensor(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def augment(batch: torch.Tensor, generator: torch.Generator, crop_scale: tuple[float, float] = (0.6, 1.0),
            jitter: float = 0.2) -> torch.Tensor:
    """uint8 NxCxHxW -> augmented uint8 batch. All randomness comes from `generator` (CPU), so a seeded epoch
    is reproducible and a resumed run replays it exactly."""
    n, device = batch.shape[0], batch.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    x = batch.float() / 255.0
    # One affine grid per image: random resized crop (area scale, centre shift), flips and a 90-degree rotation.
    scale = (crop_scale[0] + (crop_scale[1] - crop_scale[0]) * rand(n)).sqrt()
    shift = (1 - scale).unsqueeze(1) * (rand(n, 2) * 2 - 1)
    k = torch.randint(0, 4, (n,), generator=generator).to(device)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[k]
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * scale * flip, -sin * scale
    theta[:, 1, 0], theta[:, 1, 1] = sin * scale * flip, cos * scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        brightness = 1 + jitter * (rand(n, 1, 1, 1) * 2 - 1)
        contrast = 1 + jitter * (rand(n, 1, 1, 1) * 2 - 1)
        saturation = 1 + jitter * (rand(n, 1, 1, 1) * 2 - 1)
        channel_gain = 1 + 0.25 * jitter * (rand(n, 3, 1, 1) * 2 - 1)
        x = x * brightness * channel_gain
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * saturation + grey
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
