"""Generalisation across sources: Shades-of-Gray colour constancy, the occlusion augmentations, source/class
balanced sampling, the mixed manifest (HAM10000 splits unchanged, ISIC 2017 groups and leaks handled) and the
cross-dataset matrix CLI on a small real subset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_script

from classifiers.train import stratum_weights
from data.images import load_uint8
from data.manifest import read_manifest
from data.paths import CHECKPOINTS, MANIFESTS, RESULTS
from data.prepare import build_mixed_manifest
from data.splits import assert_grouped
from data.transforms import Preprocess, augment, degrade_acquisition, preprocess_meta, shades_of_gray

MIXED_MANIFEST = MANIFESTS / "mixed.csv"


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("level", [30, 128, 220])
def test_shades_of_gray_leaves_a_grey_image_unchanged(level: int):
    rng = np.random.default_rng(level)
    texture = np.clip(level + rng.normal(0, 20, (40, 40, 1)), 0, 255).astype(np.uint8)
    grey = as_batch(np.repeat(texture, 3, axis=2))
    assert torch.equal(shades_of_gray(grey), grey)


def test_shades_of_gray_equalises_a_colour_cast():
    flat = as_batch(np.broadcast_to(np.array([180, 120, 60], np.uint8), (16, 16, 3)))
    means = shades_of_gray(flat).float().mean(dim=(0, 2, 3))
    assert means.max() - means.min() <= 1


@pytest.mark.real_data
def test_shades_of_gray_undoes_a_channel_gain_on_a_real_lesion(original: pd.DataFrame):
    image = load_uint8(original[original["dataset"] == "ham10000"]["path"].iloc[0], 128).astype(np.float32)
    cast = as_batch((image * np.array([0.7, 0.9, 1.0])).round().astype(np.uint8))  # a bluish camera
    a, b = shades_of_gray(as_batch(image.astype(np.uint8))).float(), shades_of_gray(cast).float()
    spread = lambda x: float(x.mean(dim=(0, 2, 3)).std())  # noqa: E731
    k = float((a * b).sum() / (a * a).sum())  # the cast survives only as an overall brightness
    assert spread(b) < spread(cast.float()) and (a * k - b).abs().mean() < 2.5  # grey levels, out of 255


def test_preprocess_takes_colour_constancy_from_the_sidecar():
    batch = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with_cc = Preprocess.from_meta(preprocess_meta(16, color_constancy="shades_of_gray"))
    without = Preprocess.from_meta(preprocess_meta(16))
    assert with_cc.color_p == 6 and without.color_p is None
    assert torch.equal(with_cc.tensor(batch), without.tensor(shades_of_gray(batch)))
    assert torch.equal(without.standardize(batch), batch)
    with pytest.raises(ValueError, match="colour constancy"):
        Preprocess.from_meta({**preprocess_meta(16), "color_constancy": {"method": "grey_world", "p": 1}})
    with pytest.raises(ValueError, match="colour constancy"):
        preprocess_meta(16, color_constancy="retinex")


def test_cutout_and_occlusions_are_seeded_and_off_by_default():
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)

    def run(**kw) -> torch.Tensor:
        return augment(batch, torch.Generator().manual_seed(0), **kw)

    assert torch.equal(run(), run(cutout=0.0, occlusion=0.0))
    occluded = run(cutout=1.0, occlusion=1.0)
    assert occluded.dtype == torch.uint8 and occluded.shape == batch.shape
    assert torch.equal(occluded, run(cutout=1.0, occlusion=1.0)) and not torch.equal(occluded, run())


def test_acquisition_degradations_are_seeded_off_by_default_and_degrade():
    smooth = torch.linspace(40, 200, 64).repeat(3, 64, 1).to(torch.uint8)  # a gradient: any noise or blocking shows
    batch = smooth[None].repeat(6, 1, 1, 1)

    def run(p: float, seed: int = 0) -> torch.Tensor:
        return degrade_acquisition(batch, torch.Generator().manual_seed(seed), p)

    assert torch.equal(run(0.0), batch)
    degraded = run(1.0)
    assert degraded.dtype == torch.uint8 and degraded.shape == batch.shape and torch.equal(degraded, run(1.0))
    assert not torch.equal(degraded, run(1.0, seed=1))
    error = (degraded.float() - batch.float()).abs().mean(dim=(1, 2, 3))
    assert (error > 0.5).all()  # at this seed every image is visibly changed (p = 1: all three are applied)
    plain, degraded = (augment(batch, torch.Generator().manual_seed(0), degrade=p) for p in (0.0, 1.0))
    assert not torch.equal(plain, degraded)  # the training flag reaches the batch


def test_source_class_balancing_gives_every_stratum_its_share():
    df = pd.DataFrame({"dataset": ["a"] * 90 + ["b"] * 10, "label": (["benign"] * 80 + ["malignant"] * 10) +
                       (["benign"] * 8 + ["malignant"] * 2)})
    w = stratum_weights(df, "source_class", 1.0)
    shares = pd.Series(w.numpy()).groupby([df["dataset"], df["label"]]).sum()
    assert np.allclose(shares, shares.iloc[0])
    assert stratum_weights(df, "none", 1.0) is None
    natural = stratum_weights(df, "class", 0.0)
    assert torch.equal(natural, torch.ones(100, dtype=natural.dtype))


def toy_original() -> pd.DataFrame:
    ham = pd.DataFrame({"path": [f"/h{i}.jpg" for i in range(40)], "label": ["benign", "malignant"] * 20,
                        "split": ["fit", "val", "calib", "test"] * 10, "source": "real", "dataset": "ham10000",
                        "lesion_id": [f"H{i}" for i in range(40)], "image_id": [f"h{i}" for i in range(40)],
                        "official_split": "train", "dx": ["nv", "mel"] * 20})
    isic = pd.DataFrame({"path": [f"/i{i}.jpg" for i in range(60)], "label": (["benign"] * 4 + ["malignant"]) * 12,
                         "split": "external", "source": "real", "dataset": "isic2017",
                         "lesion_id": [f"i{i}" for i in range(60)], "image_id": [f"i{i}" for i in range(60)],
                         "official_split": ["train"] * 50 + ["val"] * 10,
                         "diagnosis": (["nevus"] * 4 + ["melanoma"]) * 12})
    return pd.concat([ham, isic], ignore_index=True)


def test_mixed_manifest_groups_duplicates_and_drops_copies_of_val_images():
    original = toy_original()
    duplicates = pd.DataFrame({"image_id_a": ["i1", "i2", "i3"], "image_id_b": ["i2", "i7", "i55"]})
    mixed = build_mixed_manifest(original, seed=0, isic_val_fraction=0.2, duplicates=duplicates)
    assert mixed.attrs["dropped_leaks"] == ["i3"] and "i3" not in set(mixed["image_id"])
    rows = mixed.set_index("image_id")
    assert rows.loc["i1", "split"] == rows.loc["i2", "split"] == rows.loc["i7", "split"]  # one group
    assert rows.loc["i1", "lesion_id"] == rows.loc["i7", "lesion_id"] == "i1"
    ham = mixed[mixed["dataset"] == "ham10000"]
    assert ham["split"].tolist() == original.loc[original["dataset"] == "ham10000", "split"].tolist()
    isic = mixed[mixed["dataset"] == "isic2017"]
    assert set(isic.loc[isic["official_split"] == "train", "split"]) == {"fit", "val"}
    assert set(isic.loc[isic["official_split"] == "val", "split"]) == {"external"}


@pytest.mark.real_data
def test_committed_mixed_manifest_keeps_groups_within_one_split(original: pd.DataFrame):
    mixed = read_manifest(MIXED_MANIFEST)
    for _, rows in mixed.groupby("dataset"):
        assert_grouped(rows)
    ham_before = original[original["dataset"] == "ham10000"].set_index("image_id")["split"]
    ham_after = mixed[mixed["dataset"] == "ham10000"].set_index("image_id")["split"]
    assert ham_after.sort_index().equals(ham_before.sort_index())
    isic = mixed[mixed["dataset"] == "isic2017"]
    assert set(isic.loc[isic["official_split"] == "val", "split"]) == {"external"}
    assert not {"ISIC_0012970", "ISIC_0000171"} & set(isic["image_id"])  # copies of ISIC 2017 val images
    assert set(isic.loc[isic["official_split"] == "train", "split"]) == {"fit", "val"}
    pairs = pd.read_csv(RESULTS / "data_checks" / "duplicates.csv")
    split = dict(zip(mixed["image_id"], mixed["split"]))
    both = [(a, b) for a, b in zip(pairs["image_id_a"], pairs["image_id_b"]) if a in split and b in split]
    assert len(both) > 50  # most of the 99 near-duplicate pairs are HAM10000 images, all in mixed.csv
    assert all(split[a] == split[b] for a, b in both), [(a, b) for a, b in both if split[a] != split[b]]


@pytest.mark.real_data
def test_matrix_cli_runs_on_a_small_real_subset(tmp_path: Path, original: pd.DataFrame):
    step9 = load_script("09_generalisation")
    quick = ["--set", "img_size=32", "epochs=1", "epoch_size=32", "batch_size=16", "--limit", "40",
             "--threads", "1", "--device", "cpu", "--no-progress", "--runs-dir", str(tmp_path / "runs"),
             "--out", str(tmp_path / "out")]
    step9.main(["--runs", "short/full", "short/no_cutout", "short/ham_only", "short/isic_only", *quick])
    matrix = pd.read_csv(tmp_path / "out" / "cross_dataset.csv")
    assert len(matrix) == 9 and set(matrix["train_on"]) == {"ham10000", "isic2017", "both"}
    assert set(matrix["eval_on"]) == {"ham10000_test", "isic2017_val", "both"}
    assert matrix["auc"].between(0, 1).all() and (matrix["ci_low"] <= matrix["auc"]).all()
    assert (tmp_path / "out" / "cross_dataset.png").stat().st_size > 10_000
    ablation = pd.read_csv(tmp_path / "out" / "ablation.csv")
    assert ablation["variant"].iloc[0].startswith("reference") and ablation["isic2017_val_change"].iloc[0] == 0
    assert "no ISIC 2017 training data (HAM10000 only)" in set(ablation["variant"])
    assert any("TTA" in v for v in ablation["variant"])
    ensemble = pd.read_csv(tmp_path / "out" / "ensemble.csv")
    assert ensemble["model"].iloc[0].startswith("best single by val AUC") and ensemble["isic2017_val_change"][0] == 0
    assert "short/full, short/no_cutout" in set(ensemble["members"])  # only runs trained on both sources
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert "all-malignant baseline" in set(runs["run"])
    trained_on = pd.read_json(tmp_path / "runs" / "short" / "isic_only" / "best.json", typ="series")["train_args"]
    assert trained_on["datasets"] == ["isic2017"] and trained_on["color_constancy"] == "shades_of_gray"
    shipped = tmp_path / "runs" / "short" / "ham_only" / "best.safetensors"
    step9.main(["--report-only", "--compare", f"shipped before={shipped}", *quick])  # re-reports without training
    rows = pd.read_csv(tmp_path / "out" / "runs.csv").set_index("run")
    assert rows.loc["shipped before", "ham10000_test_auc"] == pytest.approx(rows.loc["short/ham_only",
                                                                                     "ham10000_test_auc"], abs=1e-3)


@pytest.mark.real_data
def test_evaluation_refuses_images_the_checkpoint_was_trained_on(original: pd.DataFrame):
    from classifiers.evaluate import TrainingOverlap, check_no_training_overlap, training_manifest
    from data.manifest import file_sha256

    meta = {"manifest": "mixed.csv", "manifest_sha256": file_sha256(MIXED_MANIFEST)}
    isic_train_as_external = original[(original["split"] == "external") & (original["official_split"] == "train")]
    with pytest.raises(TrainingOverlap, match="fit/val splits of mixed.csv"):
        check_no_training_overlap(meta, isic_train_as_external)
    check_no_training_overlap(meta, original[original["split"].isin(["test"])])  # held-out rows pass
    check_no_training_overlap({**meta, "manifest_sha256": "0" * 64}, isic_train_as_external)  # unverifiable: skip
    # A manifest outside data/manifests (a grid's own folder) is found at the path its training command recorded.
    elsewhere = {"manifest": "renamed.csv", "manifest_sha256": meta["manifest_sha256"],
                 "train_args": {"manifest": str(MIXED_MANIFEST.resolve())}}
    with pytest.raises(TrainingOverlap, match="fit/val splits of mixed.csv"):
        check_no_training_overlap(elsewhere, isic_train_as_external)
    assert training_manifest(elsewhere) == MIXED_MANIFEST.resolve()  # and the CLIs evaluate on it by default


@pytest.mark.real_data
def test_model_card_names_the_training_sources_from_the_manifest(original: pd.DataFrame):
    ship = load_script("ship_models")
    both = ship.training_data({"manifest": "mixed.csv", "train_args": {}})
    assert both == "HAM10000 `fit` (6,408 images) + ISIC 2017 train `fit` (1,700 images)"
    assert ship.training_data({"manifest": "mixed.csv", "train_args": {"datasets": ["isic2017"]}}).startswith(
        "ISIC 2017 train `fit` (1,700")
    assert ship.training_data({"manifest": "original.csv"}) == "HAM10000 `fit` (6,408 images)"


def test_shipping_refuses_a_seven_class_classifier_before_writing_anything(tmp_path, capsys):
    from classifiers.models import create_model
    from data.checkpoint import save_checkpoint

    ship = load_script("ship_models")
    meta = {"kind": "classifier", "arch": "medvit", "arch_kwargs": {}, "class_names": list("abcdefg"),
            **preprocess_meta(32), "decision": "argmax"}
    save_checkpoint(tmp_path / "run" / "best", create_model("medvit", img_size=32, num_classes=7), meta)
    with pytest.raises(SystemExit) as info:
        ship.main(["--classifier", str(tmp_path / "run" / "best.safetensors"), "--vae", "unused",
                   "--out", str(tmp_path / "shipped"), "--results-dir", str(tmp_path / "results")])
    assert info.value.code == 2 and "expected ['benign', 'malignant']" in capsys.readouterr().err
    assert not (tmp_path / "shipped").exists() and not (tmp_path / "results").exists()


def test_model_card_describes_the_gate_from_its_sidecar_and_the_gate_targets(tmp_path):
    import shutil

    ship = load_script("ship_models")
    assert ship.gate_section(tmp_path, tmp_path) == ""  # nothing shipped, no section
    for name in ("gate.json", "feature_detector.json"):
        shutil.copy(CHECKPOINTS / name, tmp_path / name)
    (tmp_path / "rescue_sources").mkdir()
    (tmp_path / "rescue_sources" / "targets.csv").write_text(
        "target,where,value,met\ngate flags >= 0.99 of non-lesion images,non_lesion,0.95,False\n"
        "hybrid_vae specificity within 0.05,ham10000/test,-0.01,True\n")
    section = ship.gate_section(tmp_path, tmp_path)
    threshold = json.loads((CHECKPOINTS / "gate.json").read_text())["gate_threshold"]
    assert f"distance >= {threshold:.1f}" in section and "non_lesion: flags 0.950" in section
    assert "not met" in section and "specificity" not in section and "feature_detector.safetensors" in section


def test_shipping_copies_the_classifiers_training_log_and_refuses_a_run_without_one(tmp_path):
    ship = load_script("ship_models")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="no training log"):
        ship.copy_training_log(str(run / "best.safetensors"), tmp_path / "results", "densenet121")
    (run / "metrics.csv").write_text("epoch,train_loss,val_auc\n1,0.6,0.7\n2,0.5,0.75\n")
    out = ship.copy_training_log(str(run / "best.safetensors"), tmp_path / "results", "densenet121")
    assert out == tmp_path / "results" / "classifier_training" / "densenet121_metrics.csv"
    assert out.read_text() == (run / "metrics.csv").read_text()
    assert out.with_name("densenet121_curves.png").stat().st_size > 1000


@pytest.mark.real_data
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_inference_applies_the_checkpoints_colour_constancy(tiny_checkpoints, real_images, tmp_path, backend):
    from PIL import Image

    from anomaly_detection.hybrid import HybridPredictor
    from classifiers.models import create_model, load_classifier
    from data.checkpoint import save_checkpoint

    torch.manual_seed(0)
    meta = {"kind": "classifier", "arch": "medvit", "arch_kwargs": {}, "class_names": ["benign", "malignant"],
            **preprocess_meta(64, color_constancy="shades_of_gray"), "malignant_threshold": 0.5,
            "threshold_split": "val"}
    save_checkpoint(tmp_path / "cc", create_model("medvit", img_size=64), meta)
    predictor = HybridPredictor(tmp_path / "cc.safetensors", tiny_checkpoints[1], backend=backend)
    image = Image.open(real_images[0])
    prediction, _ = predictor.predict_image(image)
    model, _ = load_classifier(tmp_path / "cc.safetensors")
    pixels = as_batch(predictor.cls_prep.pixels(image))
    expected = model.eval()(Preprocess.from_meta(meta).normalize(shades_of_gray(pixels))).softmax(1)[0, 1]
    without = model(Preprocess.from_meta(meta).normalize(pixels)).softmax(1)[0, 1]
    assert prediction.prob_malignant == pytest.approx(float(expected), abs=1e-4)
    assert abs(float(expected) - float(without)) > 1e-4  # the check can tell the two apart


def test_a_failed_ship_puts_the_previous_model_and_results_back(tmp_path, tiny_checkpoints, tiny_manifest,
                                                               monkeypatch, capsys):
    from classifiers.models import create_model
    from data.checkpoint import save_checkpoint

    ship = load_script("ship_models")
    meta = {"kind": "classifier", "arch": "densenet121", "arch_kwargs": {}, "class_names": ["benign", "malignant"],
            **preprocess_meta(32), "malignant_threshold": 0.5, "threshold_split": "val"}
    save_checkpoint(tmp_path / "run" / "best", create_model("densenet121", img_size=32), meta)
    (tmp_path / "run" / "metrics.csv").write_text("epoch,train_loss,val_auc\n1,0.6,0.7\n")
    shipped, results = tmp_path / "shipped", tmp_path / "results"
    before = {shipped / "densenet121.safetensors": b"old weights", shipped / "MODEL_CARD.md": b"old card",
              results / "hybrid" / "densenet121" / "comparison_metrics.csv": b"old hybrid table"}
    for path, content in before.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    def hybrid_step_fails(argv):  # the last step, after calibration and evaluation have written their results
        assert (results / "vae_calibration" / "calibration.json").is_file()  # the earlier steps did write
        assert (results / "classifier" / "densenet121" / "metrics.csv").is_file()
        assert (shipped / "convvae.json").is_file()
        (results / "hybrid" / "densenet121" / "comparison_metrics.csv").write_text("half-written")
        raise ValueError("the hybrid evaluation broke")

    monkeypatch.setattr(ship.evaluate_hybrid, "main", hybrid_step_fails)
    with pytest.raises(SystemExit) as exit_info:
        ship.main(["--classifier", str(tmp_path / "run" / "best.safetensors"), "--vae", str(tiny_checkpoints[1]),
                   "--out", str(shipped), "--results-dir", str(results), "--manifest", str(tiny_manifest),
                   "--device", "cpu"])
    assert str(exit_info.value.code) == "error: the hybrid evaluation broke"
    assert "the previous model files and results are back in place" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in shipped.iterdir()) == ["MODEL_CARD.md", "densenet121.safetensors"]
    assert sorted(p.name for p in results.iterdir()) == ["hybrid"]  # the folders made for the new files are gone
