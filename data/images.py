"""The project's one image decoder and its one resize rule.

`load_rgb` turns any JPEG/PNG/BMP/TIFF in any PIL mode (RGBA, LA, L, P, CMYK, I;16, ...) into an RGB image with its
EXIF orientation applied, and raises `ImageError` naming the file for anything it cannot read: a missing, empty,
truncated or corrupt file, a non-image, or a decompression bomb. `to_uint8(img, size)` is the resize used by the
training cache and by inference alike, so a checkpoint sees the same pixels in both.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 64_000_000  # ~8000x8000; larger inputs are rejected as possible decompression bombs
MIN_SIDE = 8
FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "MPO")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
RESIZE_RULES = ("squash", "center_crop")


class ImageError(ValueError):
    """An input file that is not a readable image; the message names the file."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode a file path (or raw bytes, e.g. an upload) into an RGB PIL image, or raise ImageError naming the
    file (`name`, for bytes, is what the message calls it)."""
    name = name or ("<bytes>" if isinstance(source, (bytes, bytearray)) else str(source))
    if not isinstance(source, (bytes, bytearray)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{name}: file not found")
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                if img.format not in FORMATS:
                    raise ImageError(f"{name}: unsupported format {img.format} (use JPEG, PNG, BMP or TIFF)")
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{name}: {img.width}x{img.height} exceeds the {MAX_PIXELS:,}-pixel limit")
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: rejected as a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError and truncation are OSErrors
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    if min(rgb.size) < MIN_SIDE:
        raise ImageError(f"{name}: {rgb.width}x{rgb.height} is too small (minimum side {MIN_SIDE} px)")
    return rgb


def resize(img: Image.Image, size: int, rule: str = "squash") -> Image.Image:
    """Resize to size x size. `squash` keeps the whole field of view; `center_crop` keeps the aspect ratio."""
    if rule == "center_crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    if rule == "squash":
        return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    raise ValueError(f"unknown resize rule {rule!r}; choose from {RESIZE_RULES}")


def to_uint8(img: Image.Image, size: int, rule: str = "squash") -> np.ndarray:
    """RGB image -> HxWx3 uint8 array at size x size: the only pixel path into every model."""
    return np.asarray(resize(img, size, rule), dtype=np.uint8)


def load_uint8(path: str | os.PathLike, size: int, rule: str = "squash") -> np.ndarray:
    return to_uint8(load_rgb(path), size, rule)


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under a folder, sorted; raises FileNotFoundError for a missing folder."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
