"""Flip test-time augmentation declared by a checkpoint (`tta: flips`): the loader wraps the model so that its
probability is the flip average everywhere (evaluation, every serving backend, the export), the weights save and load
as before, Grad-CAM still works, and shipping with --tta chooses the threshold again on `val`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import load_script

from anomaly_detection.hybrid import HybridPredictor
from classifiers.gradcam import gradcam_map
from classifiers.models import load_classifier
from classifiers.predict import FlipAverage, flip_views, predict_proba, single_view
from data.checkpoint import CheckpointError, read_sidecar, save_checkpoint, write_sidecar
from data.images import load_rgb
from data.transforms import Preprocess


def with_tta(tiny_checkpoints, folder, tta="flips"):
    """A copy of the tiny classifier whose sidecar declares `tta`."""
    folder.mkdir(exist_ok=True)
    path = folder / "classifier.safetensors"
    shutil.copy(tiny_checkpoints[0], path)
    write_sidecar(path, {**read_sidecar(tiny_checkpoints[0]), "tta": tta})
    return path


def test_flip_average_is_the_mean_probability_over_the_four_flips():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(3, 3, 16, 16)
    expected = torch.stack([net(v).softmax(1) for v in flip_views(x)]).mean(0)
    with torch.no_grad():
        assert torch.allclose(FlipAverage(net)(x).softmax(1), expected, atol=1e-6)
        assert not torch.allclose(net(x).softmax(1), expected, atol=1e-4)  # the check can tell the two apart
    assert FlipAverage(net).state_dict().keys() == net.state_dict().keys()


def test_a_tta_checkpoint_loads_wrapped_saves_the_same_weights_and_refuses_unknown_modes(tiny_checkpoints, tmp_path):
    path = with_tta(tiny_checkpoints, tmp_path / "tta")
    model, meta = load_classifier(path)
    plain, _ = load_classifier(tiny_checkpoints[0])
    assert isinstance(model, FlipAverage) and not isinstance(plain, FlipAverage)
    save_checkpoint(tmp_path / "again", model, meta)  # what ship_models does: the state dict is the wrapped model's
    again, _ = load_classifier(tmp_path / "again.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(single_view(again).state_dict().values(),
                                                 plain.state_dict().values()))
    with pytest.raises(CheckpointError, match="unknown test-time augmentation 'rotations'"):
        load_classifier(with_tta(tiny_checkpoints, tmp_path / "bad", "rotations"))


@pytest.mark.real_data
@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
def test_every_backend_averages_the_flips_of_a_tta_checkpoint(tiny_checkpoints, real_images, tmp_path, monkeypatch,
                                                              backend):
    import anomaly_detection.serving as serving

    monkeypatch.setattr(serving, "DEFAULT_CACHE_DIR", tmp_path)
    path = with_tta(tiny_checkpoints, tmp_path / "tta")
    model, meta = load_classifier(tiny_checkpoints[0])
    predictor = HybridPredictor(path, tiny_checkpoints[1], backend=backend)
    pixels = np.stack([predictor.cls_prep.pixels(load_rgb(p)) for p in real_images])
    prep = Preprocess.from_meta(meta)
    averaged = predict_proba(model, pixels, prep, torch.device("cpu"), tta=True)[:, 1]
    single = predict_proba(model, pixels, prep, torch.device("cpu"))[:, 1]
    got = np.array([r.prob_malignant for r in predictor.predict_paths(real_images)])
    assert np.abs(got - averaged).max() < 1e-3 and np.abs(single - averaged).max() > 1e-4


@pytest.mark.real_data
def test_gradcam_explains_the_wrapped_model(tiny_checkpoints, real_images, tmp_path):
    model, meta = load_classifier(with_tta(tiny_checkpoints, tmp_path / "tta"))
    image = np.asarray(load_rgb(real_images[0]))
    cam = gradcam_map(model, meta, image)
    assert cam.shape == image.shape[:2] and np.isfinite(cam).all()
    assert np.allclose(cam, gradcam_map(single_view(model), meta, image))


@pytest.mark.real_data
def test_shipping_with_tta_chooses_the_threshold_again_on_val(tiny_checkpoints, tiny_manifest, tmp_path):
    from data.cache import CachedImages
    from data.manifest import label_index, read_manifest
    from evaluation.metrics import choose_threshold

    ship = load_script("ship_models")
    path = tmp_path / "shipped.safetensors"
    shutil.copy(tiny_checkpoints[0], path)
    write_sidecar(path, {**read_sidecar(tiny_checkpoints[0]), "threshold_rule": "youden",
                         "metrics": {"val": {"auc": 0.5}}})
    meta = ship.declare_flip_tta(path, tiny_manifest, torch.device("cpu"))
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(meta)) and saved["tta"] == "flips"
    assert saved["without_tta"] == {"malignant_threshold": 0.5, "val_auc": 0.5}
    model, _ = load_classifier(path)
    val = CachedImages(read_manifest(tiny_manifest).query("split == 'val'"), saved["input_size"], saved["resize"])
    probs = predict_proba(model, val.images, Preprocess.from_meta(saved), torch.device("cpu"))[:, 1]
    y = label_index(val.df["label"]).to_numpy()
    assert saved["malignant_threshold"] == pytest.approx(choose_threshold(y, probs, "youden", "val"))
    with pytest.raises(ValueError, match="already declares tta"):
        ship.declare_flip_tta(path, tiny_manifest, torch.device("cpu"))


def test_shipping_drops_the_sources_shipping_fields_and_refuses_a_tta_source(tiny_checkpoints, tmp_path):
    from classifiers.models import load_classifier as loader

    ship = load_script("ship_models")
    source = tmp_path / "earlier.safetensors"
    shutil.copy(tiny_checkpoints[0], source)
    write_sidecar(source, {**read_sidecar(tiny_checkpoints[0]), "shipped_from": "runs/old/best.safetensors",
                           "shipped_by": "old command"})
    ship.ship(str(source), tmp_path / "new", loader, "new command")
    saved = read_sidecar(tmp_path / "new.safetensors")
    assert saved["shipped_by"] == "new command" and saved["shipped_from"].endswith("earlier.safetensors")
    tta_source = with_tta(tiny_checkpoints, tmp_path / "tta")
    with pytest.raises(ValueError, match="declares tta 'flips'.*add --tta"):
        ship.ship(str(tta_source), tmp_path / "again", loader, "command")
    assert not (tmp_path / "again.safetensors").exists()


def test_stage_only_writes_the_classifier_as_shipped_and_evaluates_nothing(tiny_checkpoints, tmp_path, capsys):
    from safetensors import safe_open

    ship = load_script("ship_models")
    out, results = tmp_path / "staged", tmp_path / "results"
    ship.main(["--classifier", str(tiny_checkpoints[0]), "--stage-only", "--out", str(out),
               "--results-dir", str(results)])
    arch = read_sidecar(tiny_checkpoints[0])["arch"]
    staged = out / f"{arch}.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [f"{arch}.json", f"{arch}.safetensors"] and not results.exists()
    with safe_open(staged, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    assert read_sidecar(staged)["shipped_from"].endswith(tiny_checkpoints[0].name)
    assert f"staged {staged}: val AUC" in capsys.readouterr().out


def test_stage_only_refuses_the_shipped_folder_and_a_vae(tiny_checkpoints, tmp_path, capsys):
    ship = load_script("ship_models")
    for extra, message in ((["--out", "checkpoints"], "give --out outside checkpoints/"),
                           (["--out", str(tmp_path), "--vae", str(tiny_checkpoints[1])], "drop --vae"),
                           (["--out", str(tmp_path), "--card-only"], "contradict each other")):
        with pytest.raises(SystemExit):
            ship.main(["--classifier", str(tiny_checkpoints[0]), "--stage-only", *extra])
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
