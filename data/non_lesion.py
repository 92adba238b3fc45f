"""A deterministic test set of images that are NOT dermoscopic lesions, for the out-of-distribution gate.

`generated(n, seed)` cycles through kinds, each drawn from its own seeded stream:
- flat: one colour (some skin-like), any size;
- gradient: linear (any angle) or radial between two colours;
- noise: uniform, Gaussian, salt-and-pepper, or smooth (upsampled coarse) colour noise;
- pattern: checkerboards and stripes, random cell sizes and colours;
- text: random words in random sizes and colours on a coloured background;
- photo: the photographs that ship with scikit-image (`skimage.data`, no download), whole;
- photo_crop: random crops (10-70% of the side) of those photographs, rescaled; greyscale ones tinted with a random
  colour half the time, so they are not trivially greyscale;
- tiny: 8-48 px images of the kinds above.
`development_set` is what a gate may be trained on (seed 1, no scikit-image photographs, skin crops from `fit` images,
and crops of the few photographs that ship with scikit-learn and matplotlib: `development_photographs`); the
evaluation set is `generated(240, seed 0)` + skin crops of HAM10000 `test` images: no image is in both, and the
scikit-image photographs are never trained on.
`skin_crops(paths, n, seed)` makes heavy crops of non-lesion skin from dermoscopic images: a corner square a quarter
of the shorter side, kept only if no pixel group is much darker than the image's border skin (its 10th-percentile
luminance at least 0.8 of the border band's median, its mean within 15% of it), which drops crops holding lesion
pigment or the dark vignette of the dermoscope; kept crops are upscaled to 160 px so that the gate's size check does
not decide them. The filter is automatic and was not checked by hand crop by crop: a few crops may hold faint
pigment or hair (results/rescue_sources shows them all in a contact sheet).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.atomic import atomic_write
from data.images import load_rgb

KINDS = ("flat", "gradient", "noise", "pattern", "text", "photo", "photo_crop", "tiny")
EVALUATION_SEED, DEVELOPMENT_SEED = 0, 1
SKIN_CROP_SIDE = 160
WORDS = ("melanoma", "invoice", "hello", "total 42.50", "page 3", "lorem ipsum", "dermoscopy", "STOP", "2026-12-02",
         "the quick brown fox", "patient id", "EXIT", "scan", "ok")


@dataclass(frozen=True)
class NonLesion:
    name: str
    kind: str
    image: np.ndarray  # H x W x 3 uint8, any size


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(96, 401)), int(rng.integers(96, 401))


def _colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.3:  # skin-like tones are the hard case for a lesion gate
        return np.array([rng.uniform(180, 250), rng.uniform(120, 200), rng.uniform(100, 180)])
    return rng.uniform(0, 255, 3)


def flat(rng: np.random.Generator) -> np.ndarray:
    w, h = _size(rng)
    return np.broadcast_to(_colour(rng).round().astype(np.uint8), (h, w, 3)).copy()


def gradient(rng: np.random.Generator) -> np.ndarray:
    w, h = _size(rng)
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = xs * np.cos(angle) + ys * np.sin(angle)
    else:
        t = np.hypot(xs - rng.random() * w / max(h, w), ys - rng.random() * h / max(h, w))
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    a, b = _colour(rng), _colour(rng)
    return (a + t[..., None] * (b - a)).round().astype(np.uint8)


def noise(rng: np.random.Generator) -> np.ndarray:
    w, h = _size(rng)
    style = rng.integers(4)
    if style == 0:
        x = rng.uniform(0, 255, (h, w, 3))
    elif style == 1:
        x = _colour(rng) + rng.normal(0, rng.uniform(10, 60), (h, w, 3))
    elif style == 2:
        x = np.broadcast_to(_colour(rng), (h, w, 3)).copy()
        x[rng.random((h, w)) < rng.uniform(0.02, 0.2)] = rng.choice([0, 255])
    else:
        coarse = rng.uniform(0, 255, (int(rng.integers(3, 12)), int(rng.integers(3, 12)), 3)).astype(np.uint8)
        x = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=float)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def pattern(rng: np.random.Generator) -> np.ndarray:
    w, h = _size(rng)
    cell = int(rng.integers(4, 64))
    ys, xs = np.mgrid[0:h, 0:w] // cell
    mask = (xs + ys) % 2 == 0 if rng.random() < 0.6 else (xs if rng.random() < 0.5 else ys) % 2 == 0
    return np.where(mask[..., None], _colour(rng), _colour(rng)).round().astype(np.uint8)


def text(rng: np.random.Generator) -> np.ndarray:
    w, h = _size(rng)
    img = Image.fromarray(flat(rng)).resize((w, h))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 6))):
        font = ImageFont.load_default(size=int(rng.integers(12, 60)))
        xy = (int(rng.integers(0, max(1, w - 40))), int(rng.integers(0, max(1, h - 20))))
        draw.text(xy, str(rng.choice(WORDS)), fill=tuple(int(v) for v in _colour(rng)), font=font)
    return np.asarray(img, dtype=np.uint8)


def _rgb(array: np.ndarray) -> np.ndarray:
    """Any skimage.data array (bool, float, grey, RGBA) -> H x W x 3 uint8."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(np.ptp(a), 1e-9)).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
          "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page",
          "retina", "rocket", "shepp_logan_phantom", "text")


def photographs() -> dict[str, np.ndarray]:
    """The 2-D images bundled inside the scikit-image wheel (`skimage.data`, no download), as RGB uint8. Names that
    need the optional download are skipped, so an installation without it still gives the rest."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        try:
            out[name] = _rgb(getattr(skimage.data, name)())
        except (ModuleNotFoundError, OSError, ValueError):
            continue
    return out


@functools.cache
def development_photographs() -> dict[str, np.ndarray]:
    """Colour photographs bundled with scikit-learn (`load_sample_images`) and matplotlib (its sample_data folder),
    none of them in scikit-image: non-lesion photographs a gate may train on while the scikit-image ones stay
    unseen for evaluation. Cached: do not modify the arrays."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    out = {Path(f).stem: _rgb(a) for f, a in zip(sample.filenames, sample.images)}
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        if (folder / name).is_file():
            out[Path(name).stem] = np.asarray(load_rgb(folder / name), dtype=np.uint8)
    return out


def photo_crop(rng: np.random.Generator, photos: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    name = str(rng.choice(sorted(photos)))
    a = photos[name]
    h, w = a.shape[:2]
    side = int(min(h, w) * rng.uniform(0.1, 0.7))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = a[y:y + side, x:x + side].astype(float)
    if (crop.max(axis=2) == crop.min(axis=2)).all() and rng.random() < 0.5:
        crop = crop * rng.uniform(0.4, 1.0, 3)  # tint a greyscale crop
    out = int(rng.integers(96, 321))
    return name, np.asarray(Image.fromarray(crop.round().astype(np.uint8)).resize((out, out),
                                                                                    Image.Resampling.BICUBIC))


def tiny(rng: np.random.Generator) -> np.ndarray:
    maker: Callable[[np.random.Generator], np.ndarray] = [flat, gradient, noise, pattern][int(rng.integers(4))]
    side = int(rng.integers(8, 49))
    return np.asarray(Image.fromarray(maker(rng)).resize((side, int(rng.integers(8, 49)))), dtype=np.uint8)


def generated(n: int = 240, seed: int = EVALUATION_SEED, kinds: Sequence[str] = KINDS) -> list[NonLesion]:
    """n non-lesion images cycling through `kinds` (the `photo` kind takes each bundled photograph once, then its
    turns go to `photo_crop`). The same (n, seed, kinds) gives the same images."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    photos = photographs() if {"photo", "photo_crop"} & set(kinds) else {}
    whole = iter(sorted(photos))
    makers = {"flat": flat, "gradient": gradient, "noise": noise, "pattern": pattern, "text": text, "tiny": tiny}
    items = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rng = np.random.default_rng([seed, i])
        if kind == "photo":
            name = next(whole, None)
            if name is not None:
                items.append(NonLesion(f"{i:04d}_photo_{name}", "photo", photos[name]))
                continue
            kind = "photo_crop"
        if kind == "photo_crop":
            name, image = photo_crop(rng, photos)
            items.append(NonLesion(f"{i:04d}_photo_crop_{name}", kind, image))
        else:
            items.append(NonLesion(f"{i:04d}_{kind}", kind, makers[kind](rng)))
    return items


def development_set(fit_paths_by_source: dict[str, Sequence[str]], n: int = 240, skin_per_source: int = 60,
                    photo_crops: int = 60, seed: int = DEVELOPMENT_SEED) -> list[NonLesion]:
    """Non-lesion images for TRAINING a gate (its non-lesion probe), kept apart from the evaluation set: generated
    kinds with another seed and without the scikit-image photographs (so those stay unseen), crops of the
    development photographs, and skin crops from `fit` images of each source (the evaluation crops come from
    HAM10000 `test` images)."""
    items = generated(n, seed, [k for k in KINDS if k not in ("photo", "photo_crop")])
    photos = development_photographs()
    for i in range(photo_crops if photos else 0):
        name, image = photo_crop(np.random.default_rng([seed, n + i]), photos)
        items.append(NonLesion(f"dev_{i:04d}_photo_crop_{name}", "photo_crop", image))
    for paths in fit_paths_by_source.values():
        items += skin_crops(paths, skin_per_source, seed)
    return items


def _luminance(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).mean(axis=2)


def skin_crops(paths: Sequence[str | os.PathLike], n: int, seed: int = 0, fraction: float = 0.25) -> list[NonLesion]:
    """Up to n corner crops of non-lesion skin (see the module docstring for the rule), from `paths` in a seeded
    order, at most one per image."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    items: list[NonLesion] = []
    for k in order:
        if len(items) >= n:
            break
        a = np.asarray(load_rgb(paths[k]), dtype=np.uint8)
        h, w = a.shape[:2]
        side, band = max(8, int(min(h, w) * fraction)), max(2, min(h, w) // 10)
        lum = _luminance(a)
        border = np.concatenate([lum[:band].ravel(), lum[-band:].ravel(), lum[:, :band].ravel(),
                                 lum[:, -band:].ravel()])
        skin = float(np.median(border))
        for corner in rng.permutation(4):
            y = 0 if corner < 2 else h - side
            x = 0 if corner % 2 == 0 else w - side
            crop = a[y:y + side, x:x + side]
            crop_lum = _luminance(crop)
            if np.percentile(crop_lum, 10) >= 0.8 * skin and abs(crop_lum.mean() / skin - 1) <= 0.15:
                big = Image.fromarray(crop).resize((SKIN_CROP_SIDE, SKIN_CROP_SIDE), Image.Resampling.BICUBIC)
                items.append(NonLesion(f"skin_{Path(paths[k]).stem}_c{corner}", "skin_crop", np.asarray(big)))
                break
    return items


def write_folder(items: Sequence[NonLesion], folder: str | os.PathLike) -> list[Path]:
    """Save each image as <folder>/<name>.png (atomically), e.g. to run `inference.py --folder` on them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for item in items:
        path = folder / f"{item.name}.png"
        atomic_write(path, lambda f: Image.fromarray(item.image).save(f, format="PNG"))
        written.append(path)
    return written
