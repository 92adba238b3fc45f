"""Manifests and splits: the two shipped labels.csv, the folder reader, the contract's validation, the write/read
round trip, the committed original manifest (leak-free, test split untouched), and the grouped splitter."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ORIGINAL_MANIFEST, load_script
from PIL import Image

from data.manifest import (
    DX_CLASSES,
    LABELS,
    MALIGNANT_DX,
    SPLITS,
    ManifestError,
    file_sha256,
    read_folder,
    read_ham10000,
    read_isic2017,
    read_manifest,
    validate,
    write_manifest,
)
from data.splits import assert_grouped, grouped_folds, grouped_split


def test_ham10000_labels_load(real_data: Path):
    ham = read_ham10000(real_data / "ham10000")
    assert len(ham) == 10015 and ham["image_id"].is_unique
    assert set(ham["split"]) == {"train", "test"} and set(ham["label"]) == set(LABELS)
    assert set(ham["dx"]) == set(DX_CLASSES)
    assert ((ham["label"] == "malignant") == ham["dx"].isin(MALIGNANT_DX)).all()
    assert all(os.path.isfile(p) for p in ham["path"])
    assert (ham.groupby("lesion_id")["split"].nunique() == 1).all()  # the shipped split is grouped by lesion


def test_isic2017_labels_load(real_data: Path):
    isic = read_isic2017(real_data / "isic2017")
    assert len(isic) == 2150 and isic["image_id"].is_unique
    assert set(isic["split"]) == {"train", "val"}
    assert ((isic["label"] == "malignant") == (isic["diagnosis"] == "melanoma")).all()
    assert all(os.path.isfile(p) for p in isic["path"])


def test_missing_labels_csv_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        read_ham10000(tmp_path)


def touch_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(path)


def test_read_folder_with_split_folders(tmp_path: Path):
    for rel in ("fit/benign/a.png", "fit/malignant/b.jpg", "test/benign/c.png", "fit/unsure/d.png"):
        touch_image(tmp_path / rel)
    (tmp_path / "fit" / "benign" / "notes.txt").write_text("not an image")
    df = read_folder(tmp_path).sort_values("lesion_id", ignore_index=True)
    assert list(df["lesion_id"]) == ["a", "b", "c"]  # d sits in no label folder; the text file is no image
    assert list(df["label"]) == ["benign", "malignant", "benign"] and list(df["split"]) == ["fit", "fit", "test"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    validate(df)


def test_read_folder_with_split_argument_and_errors(tmp_path: Path):
    touch_image(tmp_path / "flat" / "malignant" / "x.png")
    assert list(read_folder(tmp_path / "flat", split="external")["split"]) == ["external"]
    with pytest.raises(ManifestError, match="split folder None is not one of"):
        read_folder(tmp_path / "flat")
    touch_image(tmp_path / "bad" / "train" / "benign" / "y.png")
    with pytest.raises(ManifestError, match="'train'"):
        read_folder(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images"):
        read_folder(tmp_path / "empty")


def good_rows() -> pd.DataFrame:
    return pd.DataFrame({"path": ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"], "label": ["benign", "malignant", "benign"],
                         "split": ["test", "val", "fit"], "source": ["real", "real", "dcgan"],
                         "dx": ["nv", "mel", "nv"]})


@pytest.mark.parametrize("column,value,message", [
    ("label", "maybe", "column 'label' has 1 invalid values, e.g. 'maybe'"),
    ("split", "train", "column 'split' has 1 invalid values, e.g. 'train'"),
    ("source", "gan", "column 'source' has 1 invalid values, e.g. 'gan'"),
    ("dx", "lentigo", "unknown dx values \\['lentigo'\\]")])
def test_validate_rejects_bad_values(column: str, value: str, message: str):
    validate(good_rows())
    df = good_rows()
    df.loc[0, column] = value
    with pytest.raises(ManifestError, match=message):
        validate(df, "m.csv")


def test_validate_rejects_synthetic_rows_outside_fit_and_missing_columns():
    df = good_rows()
    df.loc[2, "split"] = "val"  # the dcgan row
    with pytest.raises(ManifestError, match="synthetic rows outside the fit split"):
        validate(df)
    with pytest.raises(ManifestError, match="missing columns"):
        validate(good_rows().drop(columns=["source"]))


def test_write_read_round_trip(tmp_path: Path):
    images = tmp_path / "images"
    for name in ("a.png", "b.png", "c.png"):
        touch_image(images / name)
    df = good_rows().assign(path=[str(images / n) for n in ("a.png", "b.png", "c.png")], lesion_id=["1", "2", "3"])
    out = tmp_path / "manifests" / "m.csv"
    digest = write_manifest(df, out, {"seed": 7})
    raw = pd.read_csv(out)
    assert list(raw["path"]) == ["../images/a.png", "../images/b.png", "../images/c.png"]
    back = read_manifest(out)
    assert list(back["path"]) == list(df["path"]) and list(back["lesion_id"]) == ["1", "2", "3"]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["sha256"] == digest == file_sha256(out)
    assert info["rows"] == 3 and info["seed"] == 7
    assert info["counts"] == {"fit": {"benign": 1, "malignant": 0}, "test": {"benign": 1, "malignant": 0},
                              "val": {"benign": 0, "malignant": 1}}
    assert not list(out.parent.glob("*.tmp"))


def test_original_manifest_is_intact(original: pd.DataFrame):
    info = json.loads(ORIGINAL_MANIFEST.with_suffix(".json").read_text())
    assert info["sha256"] == file_sha256(ORIGINAL_MANIFEST) and info["rows"] == len(original)
    assert set(original["split"]) == set(SPLITS)
    assert original["path"].is_unique and all(os.path.isfile(p) for p in original["path"])
    assert_grouped(original)


def test_original_manifest_keeps_the_shipped_test_split(original: pd.DataFrame, real_data: Path):
    ham = read_ham10000(real_data / "ham10000")
    shipped_test = set(ham.loc[ham["split"] == "test", "image_id"])
    manifest_test = original[original["split"] == "test"]
    assert set(manifest_test["dataset"]) == {"ham10000"} and set(manifest_test["image_id"]) == shipped_test
    ham_rows = original[original["dataset"] == "ham10000"]
    assert set(ham_rows["image_id"]) == set(ham["image_id"])  # every HAM10000 image, once
    assert set(ham_rows.loc[ham_rows["split"] != "test", "split"]) == {"fit", "val", "calib"}


def test_original_manifest_isic_is_external(original: pd.DataFrame, real_data: Path):
    isic = original[original["dataset"] == "isic2017"]
    assert len(isic) == len(read_isic2017(real_data / "isic2017")) and set(isic["split"]) == {"external"}
    assert set(original.loc[original["split"] == "external", "dataset"]) == {"isic2017"}


def synthetic_pool(n_lesions: int = 1500, seed: int = 0) -> pd.DataFrame:
    """Lesions with 1-4 images each and an imbalanced dx, like HAM10000."""
    rng = np.random.default_rng(seed)
    dx = rng.choice(["nv", "mel", "bkl", "bcc"], n_lesions, p=[0.65, 0.15, 0.12, 0.08])
    sizes = rng.integers(1, 5, n_lesions)
    rows = [{"lesion_id": f"L{i}", "dx": d, "label": "malignant" if d in MALIGNANT_DX else "benign"}
            for i, (d, k) in enumerate(zip(dx, sizes)) for _ in range(k)]
    return pd.DataFrame(rows)


def test_grouped_split_is_seeded_grouped_and_stratified():
    pool = synthetic_pool()
    fractions = {"fit": 0.8, "val": 0.1, "calib": 0.1}
    a, b, c = (grouped_split(pool, fractions, seed) for seed in (0, 0, 1))
    assert a.equals(b) and not a.equals(c)
    assert_grouped(pool.assign(split=a))
    share = a.value_counts(normalize=True)
    for name, f in fractions.items():
        assert abs(share[name] - f) < 0.02, share
        per_dx = pool.loc[a == name, "dx"].value_counts(normalize=True)
        overall = pool["dx"].value_counts(normalize=True)
        assert (per_dx - overall).abs().max() < 0.04, (name, per_dx, overall)


def test_grouped_folds_keep_lesions_whole_and_cover_every_row():
    pool = synthetic_pool()
    folds = grouped_folds(pool, 5, seed=0)
    assert set(folds) == set(range(5)) and np.array_equal(folds, grouped_folds(pool, 5, seed=0))
    assert (pool.assign(fold=folds).groupby("lesion_id")["fold"].nunique() == 1).all()
    sizes = np.bincount(folds) / len(pool)
    assert np.abs(sizes - 0.2).max() < 0.02


def test_grouped_split_rejects_fractions_not_summing_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        grouped_split(synthetic_pool(50), {"fit": 0.8, "val": 0.1}, 0)


def test_assert_grouped_raises_on_a_crossing_group():
    df = pd.DataFrame({"lesion_id": ["a", "a", "b"], "split": ["fit", "fit", "val"]})
    assert_grouped(df)
    with pytest.raises(AssertionError, match="lesion_id"):
        assert_grouped(df.assign(split=["fit", "val", "val"]))
    with pytest.raises(AssertionError, match="patient_id"):
        assert_grouped(df.assign(lesion_id=["a", "b", "c"], patient_id=["p", "q", "p"]))


def test_data_subset_keeps_whole_lesions_and_loads_like_the_full_data(real_data: Path, tmp_path: Path):
    from data.prepare import build_manifest

    subset = load_script("make_data_subset")
    out = tmp_path / "subset"
    subset.main(["--data-root", str(real_data), "--out", str(out), "--ham-train", "60", "--ham-test", "20",
                 "--isic-train", "4", "--isic-val", "6"])
    full = pd.read_csv(real_data / "ham10000" / "labels.csv")
    ham = pd.read_csv(out / "ham10000" / "labels.csv")
    assert list(ham.columns) == list(full.columns)
    for split, rows in ham.groupby("split"):
        whole = full[(full["split"] == split) & full["lesion_id"].isin(rows["lesion_id"])]
        assert sorted(rows["image_id"]) == sorted(whole["image_id"])  # every image of each chosen lesion
    assert 40 <= (ham["split"] == "train").sum() <= 90
    for split in ("train", "test"):  # every diagnosis keeps at least one lesion, even at 20 images
        assert set(ham.loc[ham["split"] == split, "dx"]) == set(full.loc[full["split"] == split, "dx"])
    df = build_manifest(out)  # the loaders read it like the full data (md5 and all)
    assert len(df) == len(ham) + 10 and set(df["split"]) == {"fit", "val", "calib", "test", "external"}
    with pytest.raises(SystemExit, match="exists"):
        subset.main(["--data-root", str(real_data), "--out", str(out)])
