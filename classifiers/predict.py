"""Batched prediction of P(malignant) (or class probabilities) from uint8 images, with optional flip TTA, and the
classifier wrapper a checkpoint that declares flip TTA in its sidecar (`tta: flips`) is loaded as."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from data.transforms import Preprocess

TTA_MODES = ("flips",)


def flip_views(x: torch.Tensor) -> list[torch.Tensor]:
    """A batch N x C x H x W and its horizontal, vertical and double flips."""
    return [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]


class FlipAverage(nn.Module):
    """A classifier whose logits are log(P averaged over `flip_views`), so that their softmax is the averaged
    probability: every consumer (evaluation, each serving backend, the ONNX export) gets the checkpoint's TTA from
    the loader alone. Its state dict is the wrapped model's, so the checkpoint saves and loads as before; Grad-CAM
    explains the wrapped model on the unflipped image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(v).float().softmax(1) for v in flip_views(x)]).mean(0).log()

    def state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module's signature
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module's signature
        return self.model.load_state_dict(*args, **kwargs)


def single_view(model: nn.Module) -> nn.Module:
    """The network itself, without a checkpoint's flip averaging (for its features and Grad-CAM)."""
    return model.model if isinstance(model, FlipAverage) else model


def model_inputs(images: np.ndarray, preprocess: Preprocess, device: torch.device,
                 batch_size: int) -> Iterator[torch.Tensor]:
    """N x H x W x 3 uint8 images -> the model's float inputs, `batch_size` at a time, on `device`."""
    for start in range(0, len(images), batch_size):
        yield preprocess.tensor(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
                                .permute(0, 3, 1, 2).to(device))


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, preprocess: Preprocess, device: torch.device,
                  batch_size: int = 64, tta: bool = False, autocast: bool = False) -> np.ndarray:
    """images: N x H x W x 3 uint8 at the checkpoint's size -> N x classes softmax probabilities (fp32)."""
    model = FlipAverage(model) if tta and not isinstance(model, FlipAverage) else model  # one TTA mechanism
    model.eval()
    out = []
    for x in model_inputs(images, preprocess, device, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            probs = model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)
        out.append(probs.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)


def decisions(probs: np.ndarray, meta: dict) -> np.ndarray:
    """Class names decided from `probs` by the checkpoint's own rule: P(malignant) >= its val-chosen threshold for a
    benign/malignant checkpoint, the argmax for one that records `decision: argmax` (seven-class)."""
    names = list(meta["class_names"])
    if "malignant_threshold" in meta:
        return np.where(probs[:, names.index("malignant")] >= meta["malignant_threshold"], "malignant", "benign")
    if meta.get("decision") != "argmax":
        raise ValueError(f"checkpoint records neither a malignant_threshold nor decision 'argmax': {names}")
    return np.asarray(names)[probs.argmax(axis=1)]
