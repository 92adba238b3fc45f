r"""Adapt a classifier's BatchNorm statistics to a new clinic's unlabelled images (AdaBN, Li et al. 2016).

    python classifiers/adapt_bn.py --checkpoint checkpoints/efficientnet_lite0.safetensors \
        --folder my_clinic/unlabelled/ --out my_clinic/efficientnet_lite0_adabn
    python inference.py --classifier my_clinic/efficientnet_lite0_adabn.safetensors --folder new_patients/
    # then, with some labelled images of the clinic, its own threshold (see classifiers/recalibrate.py):
    python classifiers/recalibrate.py --checkpoint my_clinic/efficientnet_lite0_adabn.safetensors \
        --folder my_clinic/labelled/ --out my_clinic/efficientnet_lite0_adabn_recal
    # one GPU: add --device cuda. Several GPUs: not needed (one pass over the clinic's images).

Why: a new dermoscope changes the colour and contrast of every image, and a network with BatchNorm normalises each
layer with the mean and variance it saw in training. AdaBN recomputes those running statistics on the new clinic's
own images (no labels needed; every learned weight unchanged), so each layer sees inputs standardised as in
training. The result is a new checkpoint: the same architecture, preprocessing and threshold, new BatchNorm buffers,
and a sidecar recording where they came from. The threshold was chosen on the source's `val` before adaptation and
the scores move with it: choose it again on labelled images of the clinic (recalibrate.py). Measured here (README, "A
clinic it never saw"), it did not help: the HAM10000-only Lite0 adapted to ISIC 2017 ranks ISIC 2017 images worse
(AUC -0.044, CI -0.071 to -0.017), so compare both checkpoints on labelled images of the clinic before using it
(classifiers/evaluate.py --folder). Networks without BatchNorm (ViT, Swin, BioViT) are refused.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from classifiers.models import load_classifier
from classifiers.predict import model_inputs, single_view
from data.cache import build_cache
from data.checkpoint import CheckpointError, save_checkpoint
from data.images import list_images
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from data.transforms import Preprocess

MIN_IMAGES = 32  # fewer images than this give BatchNorm statistics noisier than the ones they replace


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray, preprocess: Preprocess, device: torch.device,
                    batch_size: int = 64, progress: bool = False) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over `images` (N x H x W x 3
    uint8 at the model's size), in one pass with everything else in eval mode; returns how many layers changed."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ValueError("the classifier has no BatchNorm layer to adapt")
    model.eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch, not an exponential one
        m.train()
    batches = model_inputs(images, preprocess, device, batch_size)
    for x in tqdm(batches, total=-(-len(images) // batch_size), desc="adapting BatchNorm", disable=not progress):
        model(x.contiguous(memory_format=torch.channels_last))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
        m.eval()
    return len(layers)


def adapt_checkpoint(checkpoint: str, folder: str, out: Path, device: torch.device,
                     progress: bool = False) -> dict[str, Any]:
    """Load `checkpoint`, adapt its BatchNorm statistics to every image under `folder`, save it to `out`; returns the
    new sidecar."""
    if Path(out).with_suffix(".safetensors").resolve() == Path(checkpoint).with_suffix(".safetensors").resolve():
        raise UserError("--out must differ from --checkpoint: the original keeps its own statistics")
    model, meta = load_classifier(checkpoint)
    network = single_view(model).to(device)
    cache = build_cache([str(p) for p in list_images(folder)], meta["input_size"], meta["resize"])
    images = cache.images[np.flatnonzero(cache.ok)]
    if len(images) < MIN_IMAGES:
        raise UserError(f"{folder}: {len(images)} images decoded ({len(cache.errors)} could not be); at least "
                        f"{MIN_IMAGES} are needed to estimate BatchNorm statistics")
    layers = adapt_batchnorm(network, images, Preprocess.from_meta(meta), device, progress=progress)
    sidecar = {**meta, "adapted_bn": {"from": str(checkpoint), "folder": str(folder), "images": len(images),
                              "skipped": len(cache.errors), "layers": layers,
                              "threshold": "chosen on the source's val before adaptation"}}
    save_checkpoint(out, network.cpu(), sidecar)
    return sidecar


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="classifier checkpoint (.safetensors with its .json sidecar)")
    p.add_argument("--folder", required=True, help="the clinic's images, labelled or not (searched recursively)")
    p.add_argument("--out", required=True,
                   help="path of the adapted checkpoint, without suffix (writes .safetensors and .json)")
    add_runtime_options(p, progress=True)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    try:
        sidecar = adapt_checkpoint(a.checkpoint, a.folder, Path(a.out), device, progress=not a.no_progress)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise UserError(f"{a.checkpoint}: {exc}" if isinstance(exc, ValueError) else str(exc)) from None
    info = sidecar["adapted_bn"]
    print(f"adapted {info['layers']} BatchNorm layers on {info['images']} images of {a.folder} "
          f"({info['skipped']} skipped) -> {Path(a.out).with_suffix('.safetensors')}; its threshold is the "
          "source's: choose one for this clinic with classifiers/recalibrate.py")
    return sidecar


if __name__ == "__main__":
    main()
