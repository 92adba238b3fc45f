"""Generators of synthetic lesions (DCGAN, DDPM) and the learned upscaler, trained on real `fit` images only.

The pixel conventions every generator module shares live here: images travel as uint8 NxCxHxW tensors (as the
preprocessing cache serves them); DCGAN and DDPM work in [-1, 1], the upscaler in [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.atomic import tmp_path


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def from_signed(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8 (rounded, clamped)."""
    return x.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] -> uint8 (rounded, clamped)."""
    return x.float().mul(255.0).round().clamp(0, 255).to(torch.uint8)


def save_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """One uint8 CxHxW tensor or HxWx3 array -> PNG, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else image
    tmp = tmp_path(path)
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, pad: int = 2) -> Path:
    """uint8 NxCxHxW -> one PNG grid (rows of `nrow`, white padding)."""
    from torchvision.utils import make_grid
    return save_png(make_grid(images.cpu(), nrow=nrow, padding=pad, pad_value=255), path)
