"""Seven-class HAM10000: multi-class metrics, dx-conditioned generators and classifiers, and the experiment CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, precision_score, recall_score, roc_auc_score

import data.cache
from classifiers.models import create_model, load_classifier
from classifiers.predict import decisions
from data import configs
from data.checkpoint import CheckpointError, save_checkpoint
from data.manifest import DX_CLASSES, MALIGNANT_DX, ManifestError, class_index, read_manifest, write_manifest
from data.transforms import preprocess_meta
from evaluation.metrics import balanced_accuracy, bootstrap_indices, multiclass_bootstrap, proportion_ci
from generators import sample
from generators import train as gen_train
from studies import fit_probe, seven_class


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(data.cache, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), [5, 9, 20, 3, 20, 80, 4])
    logits = rng.normal(size=(len(y), 7)) + 1.5 * np.eye(7)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_bootstrap(y, probs, n_boot=50)
    pred = probs.argmax(1)
    np.testing.assert_allclose(m["recall"], recall_score(y, pred, average=None))
    np.testing.assert_allclose(m["precision"], precision_score(y, pred, average=None, zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["boot_f1"].shape == (50, 7) and m["boot_macro_auc"].shape == (50,)
    lo, hi = np.quantile(m["boot_macro_auc"], [0.025, 0.975])
    assert lo < m["macro_auc"] < hi
    # paired resamples: the same seed draws the same images for any model (here sharper probabilities, same argmax)
    sharp = probs ** 3 / (probs ** 3).sum(1, keepdims=True)
    other = multiclass_bootstrap(y, sharp, 50)
    assert np.array_equal(other["boot_recall"], m["boot_recall"])
    assert not np.array_equal(other["boot_macro_auc"], m["boot_macro_auc"])
    with pytest.raises(ValueError, match="classes \\[3\\] have no images"):
        multiclass_bootstrap(y[y != 3], probs[y != 3], 10)


def test_binary_bootstrap_resamples_are_unchanged():
    """The multi-class stratification draws malignant first, as the binary one always did: committed CIs hold."""
    y = np.array([0, 1, 0, 0, 1, 0, 1, 0])
    rng = np.random.default_rng(3)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    expected = np.concatenate([rng.choice(pos, (20, len(pos))), rng.choice(neg, (20, len(neg)))], axis=1)
    assert np.array_equal(bootstrap_indices(y, 20, 3), expected)


def test_class_index_and_dx_balancing(original):
    ham = original[original["dataset"] == "ham10000"]
    idx = class_index(ham, "dx")
    assert sorted(idx.unique()) == list(range(7))
    assert (ham["dx"].to_numpy() == np.array(DX_CLASSES)[idx.to_numpy()]).all()
    with pytest.raises(ManifestError, match="'dx' value on every row"):
        class_index(original, "dx")  # ISIC 2017 rows have no dx
    fit_counts = ham.loc[ham["split"] == "fit", "dx"].value_counts()
    need = configs.needed(ham, 0.5, "dx")
    assert need["nv"] == 0
    for dx, n in need.items():
        assert n == max(0, int(np.ceil(0.5 * fit_counts.max())) - fit_counts[dx])


def test_dx_generator_samples_dx_and_the_label_that_follows(original, tmp_path):
    ham = original[(original["dataset"] == "ham10000")]
    small = pd.concat([ham[ham["split"] != "fit"].groupby("dx").head(2),
                       ham[ham["split"] == "fit"].groupby("dx").head(3)])
    manifest = tmp_path / "m.csv"
    write_manifest(small, manifest)
    result = gen_train.main(["--model", "dcgan", "--preset", "smoke", "--target", "dx", "--manifest", str(manifest),
                             "--out", str(tmp_path / "g"), "--limit", "21", "--threads", "1", "--no-progress"])
    assert result["meta"]["class_names"] == list(DX_CLASSES) and result["meta"]["target"] == "dx"
    out = tmp_path / "syn"
    df = sample.main(["--checkpoint", str(tmp_path / "g" / "model.safetensors"), "--n", "2", "--classes", "mel", "df",
                      "--out", str(out), "--threads", "1", "--no-progress"])
    back = read_manifest(out / "samples.csv")
    assert len(df) == 4 and set(back["dx"]) == {"mel", "df"}
    assert (back["label"] == np.where(back["dx"].isin(MALIGNANT_DX), "malignant", "benign")).all()
    with pytest.raises(SystemExit, match="not \\['malignant'\\]"):
        sample.main(["--checkpoint", str(tmp_path / "g" / "model.safetensors"), "--n", "1", "--classes", "malignant",
                     "--out", str(out), "--threads", "1", "--no-progress"])


def test_binary_consumers_refuse_a_seven_class_checkpoint(tmp_path):
    model = create_model("medvit", num_classes=7, img_size=32)
    meta = {"kind": "classifier", "arch": "medvit", "arch_kwargs": {}, **preprocess_meta(32, "squash", "imagenet"),
            "class_names": list(DX_CLASSES), "decision": "argmax"}
    save_checkpoint(tmp_path / "dx7", model, meta)
    with pytest.raises(CheckpointError, match="expected \\['benign', 'malignant'\\]"):
        load_classifier(tmp_path / "dx7.safetensors")
    loaded, back = load_classifier(tmp_path / "dx7.safetensors", classes=DX_CLASSES)
    assert back["class_names"] == list(DX_CLASSES)


def test_decisions_follow_the_checkpoints_own_rule():
    probs = np.array([[0.7, 0.3], [0.8, 0.2], [0.4, 0.6]])
    binary = {"class_names": ["benign", "malignant"], "malignant_threshold": 0.25}
    assert decisions(probs, binary).tolist() == ["malignant", "benign", "malignant"]  # the threshold, not the argmax
    argmax = {"class_names": ["akiec", "bcc"], "decision": "argmax"}
    assert decisions(probs, argmax).tolist() == ["akiec", "akiec", "bcc"]
    with pytest.raises(ValueError, match="neither a malignant_threshold nor decision 'argmax'"):
        decisions(probs, {"class_names": ["akiec", "bcc"]})


def test_fit_probe_recall_and_where_the_misses_go():
    rows = pd.DataFrame({"target": ["df"] * 4 + ["df"] * 2, "origin": ["synthetic"] * 4 + ["real"] * 2})
    predicted = np.array(["df", "df", "df", "vasc", "nv", "nv"])
    table = fit_probe.recall_by_origin(rows, predicted).set_index("source")
    assert table.loc["synthetic", "recall"] == 0.75 and table.loc["real", "recall"] == 0.0
    assert table.loc["real", "predicted_most"] == "nv" and table.loc["real", "predicted_most_share"] == 1.0
    assert table.loc["synthetic", "recall_ci_low"] < 0.75 < table.loc["synthetic", "recall_ci_high"]
    assert table.loc["real", "recall_ci_low"] == 0.0 < table.loc["real", "recall_ci_high"]  # 0 of 2: not zero-width
    assert proportion_ci(0, 2)[1] == pytest.approx(1 - 0.025 ** 0.5)  # Clopper-Pearson, exact at 0 successes
    fit = pd.DataFrame({"target": ["df"] * 5 + ["nv"] * 5, "source": ["dcgan"] * 3 + ["real"] * 7})
    picked = fit_probe.probe_rows(fit, per_class=2, seed=0)
    assert picked.groupby(["target", "origin"]).size().to_dict() == {("df", "real"): 2, ("df", "synthetic"): 2,
                                                                     ("nv", "real"): 2}


@pytest.mark.real_data
def test_seven_class_cli_on_real_images(original, tmp_path):
    """Both arms train on a real subset, are scored on all of HAM10000 test, and the tables hold every class."""
    ham = original[original["dataset"] == "ham10000"]
    fit = ham[ham["split"] == "fit"]
    fit = pd.concat([fit.groupby("dx").head(4), fit[fit["dx"] == "nv"][4:10]])
    val = ham[ham["split"] == "val"].groupby("dx").head(2)
    test = ham[ham["split"] == "test"].groupby("dx").head(4)
    manifest = tmp_path / "original.csv"
    write_manifest(pd.concat([fit, val, test]), manifest)
    gen_train.main(["--model", "dcgan", "--preset", "smoke", "--target", "dx", "--manifest", str(manifest),
                    "--out", str(tmp_path / "g"), "--threads", "1", "--no-progress"])
    args = ["--original", str(manifest), "--generator", f"dcgan={tmp_path / 'g' / 'model.safetensors'}",
            "--ratio", "1.0", "--arch", "medvit", "--img-size", "32", "--epochs", "1", "--epoch-size", "32",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results"), "--threads", "1",
            "--no-progress", "--n-boot", "50"]
    summary, per_class = seven_class.main(args)
    assert list(summary["arm"]) == ["baseline", "baseline_seed1", "dcgan", seven_class.MAJORITY_RULE]
    assert (summary["n_test"] == 28).all() and len(per_class) == 4 * 7
    majority = summary.set_index("arm").loc[seven_class.MAJORITY_RULE]
    assert majority["balanced_accuracy"] == pytest.approx(1 / 7) and majority["macro_auc"] == pytest.approx(0.5)
    assert summary.set_index("arm")["macro_auc_change"].notna().tolist() == [False, True, True, False]
    records = [json.loads((tmp_path / "work" / a / "grid.json").read_text()) for a in ("baseline", "baseline_seed1")]
    assert [r["seed"] for r in records] == [0, 1]
    arm = read_manifest(tmp_path / "work" / "manifests" / "dx7_dcgan.csv")
    synthetic = arm[arm["source"] != "real"]
    assert (synthetic["split"] == "fit").all() and (synthetic["dx"] != "nv").all()
    assert arm.query("split == 'fit'")["dx"].value_counts().nunique() == 1  # ratio 1: every diagnosis as nv
    counts = pd.read_csv(tmp_path / "results" / "fit_counts.csv").set_index(["arm", "dx"])
    assert counts.loc["baseline", "real"].sum() == len(fit) and counts.loc["baseline", "synthetic"].sum() == 0
    assert "baseline_seed1" not in counts.index.get_level_values("arm")  # it trains on the baseline's manifest
    assert counts.loc["dcgan", "synthetic"].sum() == len(synthetic) and counts.loc[("dcgan", "nv"), "synthetic"] == 0
    for name in ("summary.csv", "per_class.csv", "tables.md", "confusion.png", "per_class_f1.png"):
        assert (tmp_path / "results" / name).is_file()
    sidecar = json.loads((tmp_path / "work" / "baseline" / "best.json").read_text())
    assert sidecar["class_names"] == list(DX_CLASSES) and sidecar["decision"] == "argmax"
    assert "malignant_threshold" not in sidecar
    # the fit probe: recall on the arm's own real and synthetic fit images, class by class
    probe_args = ["--run", str(tmp_path / "work" / "dcgan"), "--out", str(tmp_path / "probe.csv"), "--threads", "1",
                  "--per-class", "3"]
    probe = fit_probe.main(probe_args)
    assert set(zip(probe["class"], probe["source"])) == {(dx, "real") for dx in DX_CLASSES} | {
        (dx, "synthetic") for dx in DX_CLASSES if dx != "nv"}
    assert (probe["n"] == 3).all() and probe["recall"].between(0, 1).all()
    assert probe["predicted_most"].isin(DX_CLASSES).all() and (tmp_path / "probe.png").is_file()
    real_only = fit_probe.main([*probe_args[:1], str(tmp_path / "work" / "baseline"), *probe_args[2:]])
    assert set(zip(real_only["class"], real_only["source"])) == {(dx, "real") for dx in DX_CLASSES}
    with pytest.raises(SystemExit) as wrong:  # another manifest than the run's own: a usage error
        fit_probe.main([*probe_args, "--manifest", str(manifest)])
    assert wrong.value.code == 2
    # a second call trains nothing (both arms are done) and reports the same numbers
    again, _ = seven_class.main(args)
    pd.testing.assert_frame_equal(again, summary)
    record = json.loads((tmp_path / "work" / "dcgan" / "grid.json").read_text())
    record["train_config"]["epochs"] = 2  # as if trained with --epochs 2
    (tmp_path / "work" / "dcgan" / "grid.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="arm dcgan was trained with another recipe"):
        seven_class.main([*args, "--report-only"])


@pytest.mark.real_data
def test_ddpm_arm_samples_in_bf16_when_asked_and_never_mixes_settings(original, tmp_path):
    fit = original[(original["dataset"] == "ham10000") & (original["split"] == "fit")]
    fit = pd.concat([fit.groupby("dx").head(1), fit[fit["dx"] == "nv"][1:3]])  # nv 3, every other diagnosis 1
    manifest = tmp_path / "original.csv"
    write_manifest(fit, manifest)
    gen_train.main(["--model", "ddpm", "--preset", "smoke", "--target", "dx", "--manifest", str(manifest),
                    "--out", str(tmp_path / "g"), "--threads", "1", "--no-progress"])
    arm = [manifest, "ddpm", tmp_path / "g" / "model.safetensors", tmp_path / "work", 1.0, 0, torch.device("cpu"),
           False]
    path = seven_class.arm_manifest(*arm, bf16=True)
    provenance = json.loads((tmp_path / "work" / "synthetic" / "ddpm" / "provenance.json").read_text())
    assert provenance["autocast"] is True and provenance["source"] == "ddpm"
    added = read_manifest(path).query("source != 'real'")["dx"].value_counts()
    assert len(added) == 6 and (added == 2).all()  # every diagnosis but nv topped up to nv's 3
    with pytest.raises(sample.SampleFolderError, match="autocast differ"):  # fp32 samples never join bf16 ones
        seven_class.arm_manifest(*arm, bf16=False)
