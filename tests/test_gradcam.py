"""Grad-CAM for every architecture: a real map of the input's size, gradients even under no_grad/inference_mode,
token grids in the right orientation, and the CLI's overlays and gallery. Models are seeded random ones at 64 px,
barely trained: the test is that the machinery works, not that the maps are clinically meaningful."""
from __future__ import annotations

import copy
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from classifiers.gradcam import gallery_groups, gradcam_map, main, overlay, reshape_transform, to_input_frame
from classifiers.models import Classifier, create_model, list_models
from data.checkpoint import save_checkpoint
from data.images import load_rgb
from data.manifest import LABELS
from data.paths import ROOT, SHARED_DATA
from data.transforms import Preprocess, preprocess_meta

HAM = SHARED_DATA / "ham10000"
SIZE = 64
META = preprocess_meta(SIZE)


def synthetic_lesion(height: int = 90, width: int = 120, seed: int = 0) -> np.ndarray:
    """A dark, off-centre oval on skin tones with noise: structure for the map to vary over."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    r = np.hypot((yy - 0.55 * height) / (0.28 * height), (xx - 0.45 * width) / (0.22 * width))
    t = np.clip(1.2 - r, 0, 1)[..., None]
    img = np.array([225, 180, 160]) * (1 - t) + np.array([90, 55, 40]) * t + rng.normal(0, 8, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def ham_files() -> list[Path]:
    return sorted((HAM / "train" / "malignant").glob("*.jpg"))[:1]


def model_for(arch: str) -> Classifier:
    """A fresh copy of the nudged model below: a test may change its mode or hooks without reaching the next test."""
    return copy.deepcopy(_nudged_model(arch))


@functools.cache
def _nudged_model(arch: str) -> Classifier:
    """A seeded random model, nudged by a few Adam steps until it calls the test images malignant (p > 0.9).
    Grad-CAM keeps only positive evidence, and an untrained model often has none for a class (an all-zero map)."""
    torch.manual_seed(0)
    model = create_model(arch, img_size=SIZE).eval()
    images = [synthetic_lesion(seed=s) for s in range(3)] + [np.asarray(load_rgb(f)) for f in ham_files()]
    preprocess = Preprocess.from_meta(META)
    x = preprocess.batch([preprocess.pixels(Image.fromarray(img)) for img in images])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(30):
        logits = model(x)
        if logits.softmax(1)[:, 1].min() > 0.9:
            break
        optimizer.zero_grad()
        F.cross_entropy(logits, torch.ones(len(x), dtype=torch.long)).backward()
        optimizer.step()
    else:
        raise AssertionError(f"{arch} did not learn to call the test images malignant")
    model.zero_grad(set_to_none=True)
    return model


def assert_valid_map(cam: np.ndarray, image: np.ndarray) -> None:
    assert cam.shape == image.shape[:2] and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert cam.max() - cam.min() > 0.9, "constant map"


@pytest.mark.parametrize("source", [pytest.param("ham10000", marks=pytest.mark.real_data), "synthetic"])
@pytest.mark.parametrize("arch", list_models())
def test_gradcam_map(arch, source):
    image = np.asarray(load_rgb(ham_files()[0])) if source == "ham10000" else synthetic_lesion()
    cam = gradcam_map(model_for(arch), META, image)
    assert_valid_map(cam, image)
    blended = overlay(image, cam)
    assert blended.shape == image.shape and blended.dtype == np.uint8


CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
            "bf16_autocast": functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)}


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("arch", list_models())
def test_gradcam_inside_a_callers_context_and_no_side_effects(arch, context):
    model, image = model_for(arch).train(), synthetic_lesion(seed=1)
    reference = gradcam_map(model, META, image)
    with CONTEXTS[context]():
        cam = gradcam_map(model, META, image)
    assert_valid_map(reference, image)
    np.testing.assert_allclose(cam, reference, atol=1e-5)
    assert model.training, "the model's mode must be restored"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_gradcam_on_a_frozen_model():
    model, image = model_for("medvit"), synthetic_lesion(seed=2)
    reference = gradcam_map(model, META, image)
    model.requires_grad_(False)
    try:
        np.testing.assert_allclose(gradcam_map(model, META, image), reference, atol=1e-5)
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        model.requires_grad_(True)


@pytest.mark.parametrize("arch", ["vit", "biovit"])
def test_token_reshape_keeps_the_patch_grid_orientation(arch):
    """Patch tokens (after the class token) must land where the patch-embedding convolution put them."""
    assert model_for(arch).token_grid
    backbone = model_for(arch).backbone
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = backbone.patch_embed(x)
        prefixed = torch.cat([torch.zeros(1, backbone.num_prefix_tokens, tokens.shape[-1]), tokens], dim=1)
        torch.testing.assert_close(reshape_transform(model_for(arch))(prefixed), backbone.patch_embed.proj(x))


@pytest.mark.parametrize("arch", list_models())
def test_target_layer_becomes_a_channel_map(arch):
    model, seen = model_for(arch).eval(), []
    handle = model.cam_target_layer().register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    handle.remove()
    transform = reshape_transform(model)
    act = transform(seen[0]) if transform else seen[0]
    assert act.ndim == 4 and act.shape[0] == 1 and act.shape[2] == act.shape[3] >= 2
    if isinstance(model.cam_target_layer(), torch.nn.LayerNorm):
        assert act.shape[1] == model.cam_target_layer().normalized_shape[0]


def test_center_crop_maps_back_to_the_central_square():
    framed = to_input_frame(np.ones((8, 8), np.float32), 60, 100, "center_crop")
    assert framed.shape == (60, 100)
    assert (framed[:, :20] == 0).all() and (framed[:, 80:] == 0).all() and (framed[:, 20:80] == 1).all()
    assert to_input_frame(np.ones((8, 8), np.float32), 60, 100, "squash").min() == 1


def test_gallery_groups_pick_the_telling_cases():
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    prob = np.array([0.9, 0.7, 0.2, 0.4, 0.8, 0.6, 0.1])
    groups = gallery_groups(labels, prob, threshold=0.5, per_group=2)
    assert groups["true positives"].tolist() == [0, 1]
    assert groups["false negatives"].tolist() == [2, 3]  # the surest misses first
    assert groups["false positives"].tolist() == [4, 5]
    assert gallery_groups(labels, prob, threshold=0.75, per_group=5)["false positives"].tolist() == [4]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    meta = {"kind": "classifier", "arch": "medvit", "arch_kwargs": {}, "class_names": list(LABELS), **META,
            "malignant_threshold": 0.5}
    return save_checkpoint(tmp_path / "tiny", model_for("medvit"), meta)


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"lesion{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.fromarray(synthetic_lesion(70 + 10 * i, 100, seed=i)).save(path)
    return paths


def test_cli_writes_overlays(checkpoint, tmp_path):
    images = write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "classifiers" / "gradcam.py"), "--checkpoint", str(checkpoint),
                             "--images", *map(str, images), "--out-dir", str(out), "--device", "cpu", "--threads", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for image in images:
        with Image.open(out / f"{image.stem}_gradcam.png") as written:
            assert written.size == Image.open(image).size and written.mode == "RGB"
    missing = tmp_path / "missing.jpg"
    with pytest.raises(SystemExit, match="missing.jpg: file not found"):
        main(["--checkpoint", str(checkpoint), "--images", str(missing), "--out-dir", str(out)])


def test_cli_writes_a_gallery(checkpoint, tmp_path):
    images = write_images(tmp_path / "images", 5)
    preds = pd.DataFrame({"path": [f"images/{p.name}" for p in images],
                          "label": ["malignant", "malignant", "benign", "benign", "malignant"],
                          "prob_malignant": [0.9, 0.2, 0.7, 0.1, 0.6]})
    preds.to_csv(tmp_path / "preds.csv", index=False)
    [gallery] = main(["--checkpoint", str(checkpoint), "--predictions", str(tmp_path / "preds.csv"),
                      "--out-dir", str(tmp_path / "out"), "--per-group", "2", "--device", "cpu"])
    with Image.open(gallery) as png:
        assert png.format == "PNG" and png.width > 300 and png.height > 300

    no_threshold = save_checkpoint(tmp_path / "nothreshold", model_for("medvit"),
                                   {"kind": "classifier", "arch": "medvit", "arch_kwargs": {},
                                    "class_names": list(LABELS), **META})
    with pytest.raises(SystemExit, match="malignant_threshold"):
        main(["--checkpoint", str(no_threshold), "--predictions", str(tmp_path / "preds.csv"),
              "--out-dir", str(tmp_path / "out")])
