r"""Grad-CAM maps for every registry architecture (pytorch-grad-cam), as overlays or as a gallery of outcomes.

    # CPU: overlays for chosen images (written as <out-dir>/<image stem>_gradcam.png)
    python classifiers/gradcam.py --checkpoint runs/classifiers/densenet121_original_s0/best.safetensors \
        --images a.jpg b.jpg --out-dir runs/gradcam
    # a gallery of true positives, false negatives and false positives from an evaluation's predictions CSV
    python classifiers/gradcam.py --checkpoint best.safetensors --predictions predictions.csv --out-dir runs/gradcam
    # one GPU: add --device cuda. Several GPUs: the work is per image, so give each process its own images.

The target layer comes from `model.cam_target_layer()`; transformer layers emit tokens (ViT, BioViT: a class token
and a patch grid) or channels-last maps (Swin), which `reshape_transform` turns into the N x C x H x W maps that
Grad-CAM weighs. Preprocessing comes from the checkpoint's sidecar, and the map is returned on the input image's own
pixels. `gradcam_map` computes gradients even when the caller is inside `torch.no_grad()` or
`torch.inference_mode()`, and leaves the model's mode, flags and gradients as it found them.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from torch import nn

from classifiers.models import Classifier, load_classifier
from classifiers.predict import single_view
from data.images import ImageError, load_rgb
from data.manifest import LABELS
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from data.transforms import Preprocess

MALIGNANT = LABELS.index("malignant")
GROUPS = ("true positives", "false negatives", "false positives")


def reshape_transform(model: Classifier) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How to turn the target layer's output into N x C x H x W, or None when it already is."""
    if model.token_grid:
        prefix = model.backbone.num_prefix_tokens
        grid_h, grid_w = model.backbone.patch_embed.grid_size

        def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
            return x[:, prefix:].reshape(x.shape[0], grid_h, grid_w, x.shape[-1]).permute(0, 3, 1, 2)

        return tokens_to_map
    if isinstance(model.cam_target_layer(), nn.LayerNorm):
        # A LayerNorm on a 4-D map normalises its last axis: timm's Swin keeps maps as N x H x W x C.
        return lambda x: x.permute(0, 3, 1, 2)
    return None


def _resize(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(cam.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))


def to_input_frame(cam: np.ndarray, height: int, width: int, rule: str) -> np.ndarray:
    """Put a map of the model's input back on the original pixels: the model saw the whole image squashed, or
    only its central square (then the rest, unseen, gets 0)."""
    if rule == "squash":
        return _resize(cam, height, width)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    out = np.zeros((height, width), dtype=np.float32)
    out[top:top + side, left:left + side] = _resize(cam, side, side)
    return out


def log_odds(target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The score Grad-CAM explains: the class's log-odds, z_t - logsumexp(other logits) (for two classes z1 - z0,
    which is all that P(malignant) and its threshold depend on; a raw logit also carries a part shared by every
    class that changes no probability)."""
    def score(logits: torch.Tensor) -> torch.Tensor:
        return logits[target] - torch.logsumexp(torch.cat([logits[:target], logits[target + 1:]]), 0)

    return score


def gradcam_map(model: Classifier, meta: dict[str, Any], image_uint8: np.ndarray,
                target: int = MALIGNANT) -> np.ndarray:
    """H x W x 3 uint8 image (any size) -> H x W float32 Grad-CAM map in [0, 1] for the log-odds of class `target`
    (1: malignant). All zeros means no positive evidence for the class at the target layer."""
    model = single_view(model)
    preprocess = Preprocess.from_meta(meta)
    device = next(model.parameters()).device
    pixels = preprocess.pixels(Image.fromarray(np.ascontiguousarray(image_uint8)))
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    # inference_mode(False) and enable_grad() undo a caller's inference_mode/no_grad; autocast is switched off
    # because Grad-CAM reads the activations as fp32 numpy arrays.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        x = preprocess.batch([pixels]).to(device).requires_grad_(True)
        cam = GradCAM(model, [model.cam_target_layer()], reshape_transform=reshape_transform(model))
        try:
            # Gradients flow to the input, not the weights: frozen models work and no .grad is left behind.
            model.requires_grad_(False)
            grayscale = cam(x, targets=[log_odds(target)])[0]
        finally:  # not `with GradCAM(...)`: its __exit__ swallows IndexErrors
            cam.activations_and_grads.release()
            for p, flag in zip(model.parameters(), requires_grad):
                p.requires_grad_(flag)
            model.train(was_training)
    height, width = image_uint8.shape[:2]
    return np.clip(to_input_frame(grayscale, height, width, preprocess.rule), 0.0, 1.0)


def overlay(image_uint8: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map as a jet heat map blended half-and-half with the image: H x W x 3 uint8 RGB."""
    return show_cam_on_image(image_uint8.astype(np.float32) / 255.0, cam, use_rgb=True)


def gallery_groups(labels: np.ndarray, prob: np.ndarray, threshold: float, per_group: int) -> dict[str, np.ndarray]:
    """Row indices of the surest true positives, the most confident misses and the most confident false alarms."""
    pred = prob >= threshold
    up = np.argsort(prob, kind="stable")
    down = up[::-1]
    tp = down[(labels[down] == 1) & pred[down]]
    fn = up[(labels[up] == 1) & ~pred[up]]
    fp = down[(labels[down] == 0) & pred[down]]
    return {name: rows[:per_group] for name, rows in zip(GROUPS, (tp, fn, fp))}


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions CSV (path,label,prob_malignant); labels benign|malignant or 0|1; relative paths are taken
    relative to the CSV's folder."""
    df = pd.read_csv(path)
    missing = [c for c in ("path", "label", "prob_malignant") if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing columns {missing} (need path,label,prob_malignant)")
    y = df["label"].map({LABELS[0]: 0, LABELS[1]: 1, 0: 0, 1: 1})
    if y.isna().any():
        raise UserError(f"{path}: label must be benign|malignant or 0|1, got {df['label'][y.isna()].iloc[0]!r}")
    df["y"] = y.astype(int)
    df["path"] = [str(p if Path(p).is_absolute() else path.parent / p) for p in df["path"]]
    return df


def _write_atomic(path: Path, save: Callable[[Path], Any]) -> Path:
    """save(tmp) then rename; tmp keeps the suffix so PIL and matplotlib infer the format from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp" + path.suffix)
    save(tmp)
    os.replace(tmp, path)
    return path


def write_overlays(model: Classifier, meta: dict[str, Any], images: list[Path], out_dir: Path) -> list[Path]:
    stems = [p.stem for p in images]
    if len(set(stems)) < len(stems):
        raise UserError("two --images share a file name; their overlays would overwrite each other")
    written = []
    for path in images:
        image = np.asarray(load_rgb(path))
        picture = Image.fromarray(overlay(image, gradcam_map(model, meta, image)))
        written.append(_write_atomic(out_dir / f"{path.stem}_gradcam.png", picture.save))
    return written


def write_gallery(model: Classifier, meta: dict[str, Any], df: pd.DataFrame, threshold: float, per_group: int,
                  out: Path) -> Path:
    groups = gallery_groups(df["y"].to_numpy(), df["prob_malignant"].to_numpy(), threshold, per_group)
    fig, axes = plt.subplots(len(GROUPS), per_group, figsize=(2.3 * per_group, 2.6 * len(GROUPS)), squeeze=False)
    for row, (name, rows) in zip(axes, groups.items()):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
        row[0].set_ylabel(f"{name}\n({len(rows)} shown)", fontsize=10)
        if len(rows) == 0:
            row[0].text(0.5, 0.5, "none", ha="center", va="center", transform=row[0].transAxes)
        for ax, i in zip(row, rows):
            image = np.asarray(load_rgb(df["path"].iloc[i]))
            ax.imshow(overlay(image, gradcam_map(model, meta, image)))
            ax.set_title(f"{Path(df['path'].iloc[i]).stem}\np={df['prob_malignant'].iloc[i]:.3f}", fontsize=8)
    fig.suptitle(f"Grad-CAM (malignant) at threshold {threshold:.3f}: {meta['arch']}", fontsize=11)
    fig.tight_layout()
    _write_atomic(out, partial(fig.savefig, dpi=110))
    plt.close(fig)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="classifier checkpoint (.safetensors with its .json sidecar)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", type=Path, help="images to explain, one overlay PNG each")
    what.add_argument("--predictions", type=Path,
                      help="predictions CSV (path,label,prob_malignant): write a gallery of TP, FN and FP")
    p.add_argument("--threshold", type=float, default=None,
                   help="malignant threshold for the gallery (default: the sidecar's malignant_threshold)")
    p.add_argument("--per-group", type=int, default=6, help="gallery images per outcome (columns)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/gradcam"), help="folder for the PNGs")
    add_runtime_options(p)
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    device = init_device(args.device, args.threads)
    model, meta = load_classifier(args.checkpoint)
    model.to(device)
    try:
        if args.images:
            written = write_overlays(model, meta, args.images, args.out_dir)
        else:
            threshold = args.threshold if args.threshold is not None else meta.get("malignant_threshold")
            if threshold is None:
                raise SystemExit(f"error: {args.checkpoint}: sidecar has no malignant_threshold; pass --threshold")
            df = read_predictions(args.predictions)
            written = [write_gallery(model, meta, df, threshold, args.per_group,
                                     args.out_dir / f"{args.predictions.stem}_gradcam_gallery.png")]
    except ImageError as exc:
        raise SystemExit(f"error: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
