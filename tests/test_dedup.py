"""The near-duplicate finder: its block-wise search equals brute force, it catches copies on generated images, and on
the full real datasets it finds every documented duplicate and no pair crossing HAM10000 train/test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from data.dedup import find_duplicates, similar_pairs, thumbnail_features
from data.manifest import read_ham10000, read_isic2017


def test_blockwise_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16))
    f = np.concatenate([base, base[:10] + rng.normal(scale=0.05, size=(10, 16))]).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sims = f @ f.T
    expected = {(i, j) for i in range(len(f)) for j in range(i + 1, len(f)) if sims[i, j] >= 0.95}
    assert len(expected) >= 10
    for block in (1, 7, 64):
        i, j = similar_pairs(f, 0.95, block=block)
        assert set(zip(i.tolist(), j.tolist())) == expected


def test_flat_images_match_nothing():
    flat = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    assert not thumbnail_features(flat).any()


def blob(seed: int) -> Image.Image:
    """A random smooth 'lesion-like' image."""
    noise = np.random.default_rng(seed).random((6, 8, 3)) * 255
    return Image.fromarray(noise.astype(np.uint8)).resize((160, 120), Image.Resampling.BICUBIC)


def test_finds_copies_in_generated_images(tmp_path: Path):
    rows = []

    def add(name: str, img_or_bytes, split: str, quality: int = 95) -> None:
        path = tmp_path / name
        if isinstance(img_or_bytes, bytes):
            path.write_bytes(img_or_bytes)
        else:
            img_or_bytes.save(path, quality=quality)
        rows.append({"path": str(path), "split": split})

    for k in range(6):
        add(f"u{k}.jpg", blob(k), "fit")
    add("copy_of_u0.jpg", (tmp_path / "u0.jpg").read_bytes(), "test")                      # byte-identical
    add("reencoded_u1.jpg", Image.open(tmp_path / "u1.jpg"), "fit", quality=60)           # same split
    add("brighter_u2.jpg", ImageEnhance.Brightness(blob(2)).enhance(1.2), "val")            # colour-shifted
    add("broken.jpg", b"\xff\xd8\xff not really a jpeg", "fit")
    rows.append({"path": str(tmp_path / "missing.jpg"), "split": "fit"})
    pairs = find_duplicates(pd.DataFrame(rows), cache_dir=tmp_path / "cache", workers=1)

    found = {frozenset((a, b)): r for a, b, r in zip(pairs["image_id_a"], pairs["image_id_b"],
                                                     pairs.itertuples())}
    assert set(found) == {frozenset(p) for p in (("u0", "copy_of_u0"), ("u1", "reencoded_u1"), ("u2", "brighter_u2"))}
    assert found[frozenset(("u0", "copy_of_u0"))].exact and found[frozenset(("u0", "copy_of_u0"))].crosses_split
    assert not found[frozenset(("u1", "reencoded_u1"))].exact
    assert not found[frozenset(("u1", "reencoded_u1"))].crosses_split
    assert found[frozenset(("u2", "brighter_u2"))].crosses_split
    assert list(pairs["crosses_split"]) == sorted(pairs["crosses_split"], reverse=True)  # crossing pairs first
    assert list(pairs.attrs["errors"]) == [str(tmp_path / "broken.jpg"), str(tmp_path / "missing.jpg")]


KNOWN_EXACT = [("ISIC_0024366", "ISIC_0029861"), ("ISIC_0024777", "ISIC_0029938"), ("ISIC_0012970", "ISIC_0012127")]
KNOWN_NEAR = [("ISIC_0012290", "ISIC_0013594"), ("ISIC_0012672", "ISIC_0012673"), ("ISIC_0012756", "ISIC_0013184")]


@pytest.fixture(scope="module")
def official(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both datasets with their official splits (HAM10000 train/test, ISIC 2017 train/val) and all their pairs."""
    df = pd.concat([read_ham10000(real_data / "ham10000"), read_isic2017(real_data / "isic2017")],
                   ignore_index=True)
    return df, find_duplicates(df, cache_dir=tmp_path_factory.mktemp("thumbnails"))


def test_finds_the_documented_duplicates(official, real_data: Path):
    df, pairs = official
    found = {frozenset((a, b)): r for a, b, r in zip(pairs["image_id_a"], pairs["image_id_b"], pairs.itertuples())}
    md5 = pd.concat([pd.read_csv(real_data / name / "labels.csv") for name in ("ham10000", "isic2017")]) \
        .set_index("image_id")["md5"]
    for a, b in KNOWN_EXACT + KNOWN_NEAR:
        pair = found.get(frozenset((a, b)))
        assert pair is not None, f"{a} ~ {b} not found"
        assert pair.exact == (md5[a] == md5[b]) == ((a, b) in KNOWN_EXACT)  # against labels.csv's own md5
    isic_across = found[frozenset(KNOWN_EXACT[2])]
    assert isic_across.crosses_split and {isic_across.split_a, isic_across.split_b} == {"train", "val"}
    assert pairs.loc[~pairs["exact"], "similarity"].min() >= 0.99


def test_no_pair_crosses_ham10000_train_test_or_the_original_manifest_splits(official, original: pd.DataFrame):
    df, pairs = official
    ham = pairs[(pairs["dataset_a"] == "ham10000") | (pairs["dataset_b"] == "ham10000")]
    assert len(ham) >= 2 and not ham["crosses_split"].any(), ham[ham["crosses_split"]]
    split = original.set_index("image_id")["split"]
    crossing = pairs[pairs["image_id_a"].map(split) != pairs["image_id_b"].map(split)]
    assert crossing.empty, crossing[["image_id_a", "image_id_b", "similarity"]]
