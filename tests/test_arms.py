"""Seeded-arms studies (studies/arms.py): the summary's change, CI and noise floor against hand computations, and the
synthetic-data study end to end on real images (train, score, resume into a report)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.images import load_rgb
from data.manifest import read_manifest, write_manifest
from data.runtime import UserError
from evaluation.metrics import auc
from studies import arms, filter_synthetic, synthetic_data


def test_summary_reads_changes_against_the_reference_and_the_seed_floor():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300, int), np.ones(100, int)]
    noise = {("ref", 0): 1.0, ("ref", 1): 1.2, ("new", 0): 0.5, ("new", 1): 0.6}  # less noise: a better arm
    preds, rows = {}, []
    for (arm, seed), sd in noise.items():
        score = y + rng.normal(0, sd, len(y))
        row = {"arm": arm, "seed": seed}
        for prefix in arms.SETS:
            preds[arm, seed, prefix] = pd.DataFrame({"y": y, "prob_malignant": score})
            row |= {f"{prefix}_auc": auc(y, score), f"{prefix}_sensitivity": seed, f"{prefix}_specificity": 1 - sd}
        rows.append(row)
    table = arms.summary(pd.DataFrame(rows), preds, ["ref", "new"], [0, 1], n_boot=200)
    aucs = {key: auc(y, preds[(*key, "ham10000_test")]["prob_malignant"]) for key in noise}
    new = table[(table["set"] == "ham10000_test") & (table["arm"] == "new")].iloc[0]
    ref = table[(table["set"] == "ham10000_test") & (table["arm"] == "ref")].iloc[0]
    expected_change = (aucs["new", 0] + aucs["new", 1] - aucs["ref", 0] - aucs["ref", 1]) / 2
    floor = max(abs(aucs["ref", 0] - aucs["ref", 1]), abs(aucs["new", 0] - aucs["new", 1]))
    assert new["change"] == pytest.approx(expected_change) and expected_change > 0.05
    assert new["change_ci_low"] < new["change"] < new["change_ci_high"] and new["change_ci_low"] > 0
    assert new["seed_noise_floor"] == pytest.approx(floor) and ref["change"] == 0 == ref["change_ci_low"]
    assert new["sensitivity_mean"] == 0.5 and new["specificity_mean"] == pytest.approx(0.45)


def tiny_configurations(original: pd.DataFrame, folder: Path) -> None:
    """original.csv (a few real images of every split and both test sets; `fit` 6 benign, 3 malignant) and
    dcgan_aug.csv (the same plus the three synthetic malignant `fit` images that balance it: PNG copies of real ones,
    as the configuration builder would list them)."""
    ham, isic = original[original["dataset"] == "ham10000"], original[original["dataset"] == "isic2017"]
    fit = ham[ham["split"] == "fit"]
    picks = [fit[fit["label"] == label].sample(n, random_state=0) for label, n in (("benign", 6), ("malignant", 3))]
    picks += [ham[ham["split"] == split].groupby("label").sample(4, random_state=0) for split in ("val", "test")]
    picks.append(isic[isic["official_split"] == "val"].groupby("label").sample(4, random_state=0))
    real = pd.concat(picks, ignore_index=True)
    folder.mkdir()
    write_manifest(real, folder / "original.csv")
    synthetic = []
    for i, row in enumerate(real[(real["split"] == "fit") & (real["label"] == "malignant")].head(3).itertuples()):
        path = folder / f"dcgan_malignant_{i}.png"
        load_rgb(row.path).resize((64, 64)).save(path)
        synthetic.append({"path": str(path), "label": "malignant", "split": "fit", "source": "dcgan",
                          "lesion_id": path.stem, "dataset": "synthetic"})
    write_manifest(pd.concat([real, pd.DataFrame(synthetic)], ignore_index=True), folder / "dcgan_aug.csv")


@pytest.mark.real_data
def test_synthetic_data_study_trains_scores_and_reports(original, tmp_path):
    tiny_configurations(original, tmp_path / "manifests")
    argv = ["--manifests", str(tmp_path / "manifests"), "--arms", "original", "dcgan_aug", "--seeds", "0", "1",
            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--n-boot", "50",
            "--set", "img_size=32", "epochs=1", "epoch_size=8", "batch_size=4", "--threads", "1", "--no-progress"]
    synthetic_data.main(argv)
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert list(runs["arm"]) == ["original"] * 2 + ["dcgan_aug"] * 2 + ["all_malignant_baseline"]
    assert runs.loc[:3, "ham10000_test_auc"].between(0, 1).all() and runs["isic2017_val_auc"].iloc[-1] == 0.5
    assert runs["ham10000_test_sensitivity"].iloc[-1] == 1 and runs["ham10000_test_specificity"].iloc[-1] == 0
    config = pd.read_json(tmp_path / "runs" / "dcgan_aug_s1" / "config.json", typ="series")
    assert config["manifest"].endswith("dcgan_aug.csv") and config["config"] == "dcgan_aug" and config["seed"] == 1
    report = (tmp_path / "report" / "summary.csv").read_text()
    synthetic_data.main([*argv, "--report-only"])  # the finished runs are reported again, not retrained
    assert (tmp_path / "report" / "summary.csv").read_text() == report
    assert (tmp_path / "report" / "synthetic_data.png").stat().st_size > 0


def test_a_missing_configuration_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="arm original: .*original.csv not found; build the configurations"):
        synthetic_data.main(["--manifests", str(tmp_path), "--seeds", "0", "--threads", "1"])


def test_filter_keeps_the_most_confident_samples_of_each_class():
    scored = pd.DataFrame({"label": ["malignant"] * 4 + ["benign"] * 2, "prob_own_class": [.2, .9, .5, .7, .3, .8]})
    kept = filter_synthetic.keep_best(scored, {"malignant": 2, "benign": 1})
    assert sorted(kept["prob_own_class"]) == [.7, .8, .9]
    with pytest.raises(UserError, match="3 benign samples are needed and only 2"):
        filter_synthetic.keep_best(scored, {"benign": 3})


@pytest.mark.real_data
def test_filtered_configuration_adds_only_the_kept_samples(original, tmp_path, tiny_checkpoints):
    folder = tmp_path / "manifests"
    tiny_configurations(original, folder)
    pool = read_manifest(folder / "dcgan_aug.csv").query("source == 'dcgan'").assign(source="ldm")
    pool = pd.concat([pool, pool.assign(lesion_id=pool["lesion_id"] + "_again")], ignore_index=True)  # 6 samples
    write_manifest(pool, tmp_path / "samples.csv")
    filter_synthetic.main(["--samples", str(tmp_path / "samples.csv"), "--classifier", str(tiny_checkpoints[0]),
                           "--original", str(folder / "original.csv"), "--out", str(folder), "--threads", "1"])
    config = read_manifest(folder / "ldm_filtered.csv")
    scores = pd.read_csv(folder / "ldm_filtered_scores.csv")
    added = config[config["source"] == "ldm_filtered"]
    assert len(config) == len(read_manifest(folder / "original.csv")) + 3 and len(scores) == 6
    assert set(added["split"]) == {"fit"} and set(added["label"]) == {"malignant"}
    best = scores.nlargest(3, "prob_own_class")
    assert set(added["lesion_id"]) == set(best["lesion_id"]) == set(scores.loc[scores["kept"], "lesion_id"])
