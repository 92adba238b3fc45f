"""Tensor-side preprocessing and batched augmentation.

`Preprocess` is built from a checkpoint's sidecar (`preprocess_meta`), so the resize rule, input size and
normalization (and the optional colour constancy) are written once, at training time, and every later user
(evaluation, inference, ONNX export, the demo) derives them from the checkpoint instead of re-typing them.

Colour constancy (Shades of Gray, Finlayson & Trezzi 2004; p=6 as in the top ISIC 2018/2019 entries) divides each
channel by its Minkowski p-norm, removing the colour cast of a camera/illuminant: the main difference between
dermoscopy sources. It runs on the uint8 batch, before augmentation in training and before normalization always.

`augment` works on a whole uint8 batch on the training device: flips and 90-degree rotations (dermoscopy has no
canonical orientation), a random resized crop, brightness/contrast/saturation/channel-gain jitter, and optionally
cutout (one mean-filled rectangle) and dermoscopy-like occlusions (a dark round vignette, a dark ruler/hair line),
and acquisition degradations (`degrade`): sensor noise, lost resolution and JPEG compression, the device differences
that studies/acquisition_shift.py measured to hurt the shipped classifier most.
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
# TensorFlow EfficientNet-Lite scaling, (x - 127) / 128 on 0-255 pixels, written as mean/std on [0, 1] pixels.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "tf_lite": (TF_LITE_MEAN, TF_LITE_STD), "unit": None}


COLOR_CONSTANCY = ("none", "shades_of_gray")


def preprocess_meta(size: int, rule: str = "squash", normalization: str = "imagenet",
                    color_constancy: str = "none", p: int = 6) -> dict[str, Any]:
    """The sidecar fields that define preprocessing. normalization: `imagenet` or `tf_lite` (stored as mean/std) or
    `unit` ([0,1]); color_constancy: `none` or `shades_of_gray` (Minkowski norm `p`)."""
    if color_constancy not in COLOR_CONSTANCY:
        raise ValueError(f"unknown colour constancy {color_constancy!r}; choose from {COLOR_CONSTANCY}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose from {sorted(NORMALIZATIONS)}")
    stats = NORMALIZATIONS[normalization]
    norm = {"mean": list(stats[0]), "std": list(stats[1])} if stats else "unit"
    meta: dict[str, Any] = {"input_size": size, "resize": rule, "normalization": norm}
    if color_constancy != "none":
        meta["color_constancy"] = {"method": color_constancy, "p": p}
    return meta


def shades_of_gray(batch: torch.Tensor, p: int = 6) -> torch.Tensor:
    """uint8 NxCxHxW -> uint8 batch whose channels have equal Minkowski p-norms (a grey image is unchanged)."""
    x = batch.float()
    norms = (x / 255.0).pow(p).mean(dim=(2, 3), keepdim=True).pow(1.0 / p).clamp(min=1e-6)
    gains = norms.pow(2).mean(dim=1, keepdim=True).sqrt() / norms  # as in the ISIC 2018 reference implementation
    return (x * gains).clamp(0, 255).round().to(torch.uint8)


@dataclass(frozen=True)
class Preprocess:
    size: int
    rule: str
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    color_p: int | None = None  # Shades-of-Gray norm; None: no colour constancy

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocess:
        norm, cc = meta["normalization"], meta.get("color_constancy")
        if cc is not None and cc.get("method") != "shades_of_gray":
            raise ValueError(f"unknown colour constancy {cc!r} in the checkpoint's sidecar")
        color_p = int(cc["p"]) if cc else None
        if norm == "unit":
            return cls(meta["input_size"], meta["resize"], None, None, color_p)
        return cls(meta["input_size"], meta["resize"], tuple(norm["mean"]), tuple(norm["std"]), color_p)

    def pixels(self, path_or_image) -> np.ndarray:
        """File path or PIL image -> HxWx3 uint8 at the checkpoint's size, through the one decoder."""
        img = load_rgb(path_or_image) if not hasattr(path_or_image, "mode") else path_or_image.convert("RGB")
        return to_uint8(img, self.size, self.rule)

    def standardize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxHxW -> uint8 after colour constancy (identity without it). Training applies it before
        augmentation; `tensor` applies it for everyone else."""
        return batch if self.color_p is None else shades_of_gray(batch, self.color_p)

    def tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxHxW (any device) -> float input for the model."""
        return self.normalize(self.standardize(batch))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxHxW -> float input, without colour constancy (training: after augmentation)."""
        x = batch.float().div_(255.0)
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def batch(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return self.tensor(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def resize_uint8(batch: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NxCxHxW -> uint8 NxCxsizexsize (antialiased bilinear); the batch itself when it already has that size."""
    if batch.shape[-2:] == (size, size):
        return batch
    x = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8)


def augment(batch: torch.Tensor, generator: torch.Generator, crop_scale: tuple[float, float] = (0.6, 1.0),
            jitter: float = 0.2, cutout: float = 0.0, occlusion: float = 0.0, degrade: float = 0.0) -> torch.Tensor:
    """uint8 NxCxHxW -> augmented uint8 batch. All randomness comes from `generator` (CPU), so a seeded epoch
    is reproducible and a resumed run replays it exactly. `cutout`, `occlusion` and `degrade` are per-image
    probabilities."""
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
    x = x.clamp(0, 1)
    if cutout > 0 or occlusion > 0:
        x = occlude(x, rand, cutout, occlusion)
    x = (x * 255).round().to(torch.uint8)
    return degrade_acquisition(x, generator, degrade) if degrade > 0 else x


def degrade_acquisition(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """uint8 NxCxHxW -> the batch with, per image and each with probability `p`: lost resolution (down to 1/4-1 of
    the side and back up, bilinear), Gaussian sensor noise (sd 0-15 grey levels) and JPEG compression (quality
    15-90), in that order, as a device would. Every draw comes from `generator` (CPU)."""
    from torchvision.io import decode_jpeg, encode_jpeg  # here: the only torchvision use in this module

    n, _, h, w = x.shape
    use = torch.rand(3, n, generator=generator) < p
    factor, sigma = 1 + 3 * torch.rand(n, generator=generator), 15 * torch.rand(n, generator=generator)
    quality = (15 + 75 * torch.rand(n, generator=generator)).round().int()
    out = []
    for i in range(n):
        img = x[i].float()
        if use[0, i]:
            small = (max(1, round(h / factor[i].item())), max(1, round(w / factor[i].item())))
            img = F.interpolate(img[None], size=small, mode="bilinear", antialias=True, align_corners=False)
            img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)[0]
        if use[1, i]:
            img = img + sigma[i] * torch.randn(img.shape, generator=generator).to(img.device)
        img = img.clamp(0, 255).round().to(torch.uint8)
        if use[2, i]:
            img = decode_jpeg(encode_jpeg(img.cpu(), quality=int(quality[i]))).to(img.device)
        out.append(img)
    return torch.stack(out)


def occlude(x: torch.Tensor, rand, cutout: float, occlusion: float) -> torch.Tensor:
    """Float NxCxHxW in [0, 1] -> the batch with, per image: a cutout rectangle (side 10-35% of the image, filled
    with the image mean) with probability `cutout`; a dark circular vignette and a dark straight line 1-3% of the
    side thick (ruler, hair) each with probability `occlusion`. rand(*shape) draws uniforms from the seeded stream."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, w)
    use_cut, use_vignette, use_line = rand(n) < cutout, rand(n) < occlusion, rand(n) < occlusion
    centre, half = rand(n, 2) * 2 - 1, 0.1 + 0.25 * rand(n)
    box = ((ys - centre[:, 1, None, None]).abs() < half[:, None, None]) & (
        (xs - centre[:, 0, None, None]).abs() < half[:, None, None])
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = torch.where((box & use_cut[:, None, None])[:, None], mean, x)
    radius = 0.8 + 0.5 * rand(n)  # 1.41 reaches the corners: larger radii darken little or nothing
    soft = ((radius[:, None, None] - (xs**2 + ys**2).sqrt()) / 0.1).clamp(0, 1)
    x = x * torch.where(use_vignette[:, None, None], soft, torch.ones_like(soft))[:, None]
    angle, offset, width = rand(n) * torch.pi, rand(n) * 1.6 - 0.8, 0.02 + 0.04 * rand(n)
    dist = (xs * angle.cos()[:, None, None] + ys * angle.sin()[:, None, None] - offset[:, None, None]).abs()
    line = (dist < width[:, None, None] / 2) & use_line[:, None, None]
    shade = 0.15 * rand(n, 1, 1, 1)
    return torch.where(line[:, None], shade.expand_as(x), x)
