"""AdaBN (classifiers/adapt_bn.py): the adapted checkpoint's BatchNorm statistics are the mean and variance of each
layer's inputs on the new images, nothing else changes, it loads strictly with its sidecar's TTA and threshold, and
bad requests (too few images, no BatchNorm, a missing folder, overwriting the source) are one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from classifiers import adapt_bn
from classifiers.models import create_model, load_classifier
from classifiers.predict import model_inputs, single_view
from data.checkpoint import save_checkpoint
from data.images import load_uint8
from data.transforms import Preprocess, preprocess_meta

SIZE = 64


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", img_size=SIZE)
    meta = {"kind": "classifier", "arch": "efficientnet_lite0", "arch_kwargs": {}, **preprocess_meta(SIZE),
            "class_names": ["benign", "malignant"], "malignant_threshold": 0.3, "threshold_split": "val",
            "tta": "flips"}
    return save_checkpoint(tmp_path_factory.mktemp("lite0") / "model", model, meta)


def clinic_images(folder: Path, n: int) -> Path:
    """`n` reddish, brighter-than-ImageNet images: a camera whose statistics differ from the source's."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        pixels = np.clip(rng.normal((200, 120, 110), 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def test_adapted_statistics_are_the_new_images_layer_inputs_and_nothing_else_changes(lite0, tmp_path):
    folder = clinic_images(tmp_path / "clinic", 40)
    sidecar = adapt_bn.adapt_checkpoint(str(lite0), str(folder), tmp_path / "adapted", torch.device("cpu"))
    source, meta = load_classifier(lite0)
    adapted, new_meta = load_classifier(tmp_path / "adapted.safetensors")  # strict load
    assert new_meta["tta"] == "flips" and new_meta["malignant_threshold"] == 0.3
    assert sidecar["adapted_bn"]["images"] == 40 and sidecar["adapted_bn"]["layers"] > 10

    network = single_view(source).eval()
    first_bn = next(m for m in network.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    first_bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    images = np.stack([load_uint8(p, SIZE) for p in sorted(folder.iterdir())])
    with torch.no_grad():
        network(next(model_inputs(images, Preprocess.from_meta(meta), torch.device("cpu"), 64)))
    name = next(n for n, m in network.named_modules() if m is first_bn)
    state, new_state = network.state_dict(), single_view(adapted).state_dict()
    x = seen[0].double()
    assert torch.allclose(new_state[f"{name}.running_mean"].double(), x.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(new_state[f"{name}.running_var"].double(), x.var((0, 2, 3)), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(state[f"{name}.running_mean"], new_state[f"{name}.running_mean"])
    for key, value in state.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, new_state[key]), key


def test_adaptation_refuses_bad_requests(lite0, tmp_path):
    few = clinic_images(tmp_path / "few", 5)
    with pytest.raises(SystemExit, match="5 images decoded.*at least 32"):
        adapt_bn.main(["--checkpoint", str(lite0), "--folder", str(few), "--out", str(tmp_path / "x"),
                       "--device", "cpu"])
    with pytest.raises(SystemExit, match="folder not found"):
        adapt_bn.main(["--checkpoint", str(lite0), "--folder", str(tmp_path / "nowhere"),
                       "--out", str(tmp_path / "x"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--out must differ"):
        adapt_bn.main(["--checkpoint", str(lite0), "--folder", str(few), "--out", str(lite0.with_suffix("")),
                       "--device", "cpu"])
    assert not list(tmp_path.glob("*.safetensors"))  # nothing half-written
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        adapt_bn.adapt_batchnorm(nn.Conv2d(3, 4, 3), np.zeros((2, SIZE, SIZE, 3), np.uint8),
                                 Preprocess.from_meta(preprocess_meta(SIZE)), torch.device("cpu"))
