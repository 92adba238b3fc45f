"""Build the manifests from the shipped datasets.

`original`: HAM10000 `train` is split into fit / val / calib (grouped by lesion, stratified by dx, seeded);
HAM10000 `test` stays `test`; all of ISIC 2017 is `external`.

`mixed` (multi-source training, see the generalisation section of the README): the HAM10000 rows keep their
`original` splits, so HAM10000 numbers stay comparable and the VAE's calib split is untouched; ISIC 2017 `train`
is split into fit / val, so model selection sees both sources; ISIC 2017 `val` stays `external`, a held-out test of
the second source that no choice is ever made on. ISIC 2017 has no lesion ids, so near-duplicate images (found by
`data/dedup.py`) form one group, and ISIC 2017 train images that copy an ISIC 2017 val image are dropped.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from data.dedup import find_duplicates
from data.manifest import read_ham10000, read_isic2017, write_manifest
from data.splits import assert_grouped, grouped_split

DEFAULT_FRACTIONS = {"fit": 0.8, "val": 0.1, "calib": 0.1}
ISIC_DX = {"melanoma": "mel", "nevus": "nv", "seborrheic_keratosis": "bkl"}


def build_manifest(data_root: str | os.PathLike, seed: int = 0,
                   fractions: dict[str, float] | None = None) -> pd.DataFrame:
    data_root = Path(data_root)
    fractions = fractions or DEFAULT_FRACTIONS
    ham = read_ham10000(data_root / "ham10000")
    pool = ham[ham["split"] == "train"].copy()
    pool["split"] = grouped_split(pool, fractions, seed, "dx")
    parts = [pool, ham[ham["split"] == "test"]]
    isic_root = data_root / "isic2017"
    if (isic_root / "labels.csv").is_file():
        parts.append(read_isic2017(isic_root).assign(split="external"))
    df = pd.concat(parts, ignore_index=True)
    assert_grouped(df)
    return df


def build_mixed_manifest(original: pd.DataFrame, seed: int = 0, isic_val_fraction: float = 0.15,
                         duplicates: pd.DataFrame | None = None) -> pd.DataFrame:
    """`original` with ISIC 2017 train split into fit/val. `duplicates`: near-duplicate pairs among the ISIC 2017
    rows (columns image_id_a, image_id_b); computed with `find_duplicates` when not given."""
    df = original.copy()
    isic = df["dataset"].eq("isic2017")
    if not isic.any():
        raise ValueError("the manifest has no ISIC 2017 rows to mix in")
    if duplicates is None:
        duplicates = find_duplicates(df[isic])
    official = dict(zip(df.loc[isic, "image_id"], df.loc[isic, "official_split"]))
    group = {image_id: image_id for image_id in official}

    def root(x: str) -> str:
        while group[x] != x:
            x = group[x]
        return x

    for a, b in zip(duplicates["image_id_a"], duplicates["image_id_b"]):
        if a in group and b in group:
            ra, rb = sorted((root(a), root(b)))
            group[rb] = ra
    groups = pd.Series({i: root(i) for i in official})
    val_groups = set(groups[[official[i] == "val" for i in groups.index]])
    leaked = [i for i in groups.index if official[i] == "train" and groups[i] in val_groups]
    df = df[~df["image_id"].isin(leaked) | ~isic].reset_index(drop=True)
    isic = df["dataset"].eq("isic2017")
    df.loc[isic, "lesion_id"] = df.loc[isic, "image_id"].map(groups)
    df.loc[isic, "dx"] = df.loc[isic, "diagnosis"].map(ISIC_DX)
    train = isic & df["official_split"].eq("train")
    df.loc[train, "split"] = grouped_split(df[train], {"fit": 1 - isic_val_fraction, "val": isic_val_fraction},
                                           seed, "dx")
    df.attrs["dropped_leaks"] = leaked
    assert_grouped(df)
    return df


def prepare(data_root: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
            fractions: dict[str, float] | None = None) -> tuple[pd.DataFrame, str]:
    df = build_manifest(data_root, seed, fractions)
    digest = write_manifest(df, out, {"seed": seed, "fractions": fractions or DEFAULT_FRACTIONS,
                                      "grouped_by": "lesion_id", "stratified_by": "dx",
                                      "data_root": os.path.relpath(Path(data_root).resolve(), Path(out).parent)})
    return df, digest


def prepare_mixed(original: pd.DataFrame, out: str | os.PathLike, seed: int = 0,
                  isic_val_fraction: float = 0.15) -> tuple[pd.DataFrame, str]:
    df = build_mixed_manifest(original, seed, isic_val_fraction)
    digest = write_manifest(df, out, {"seed": seed, "base": "original", "isic_val_fraction": isic_val_fraction,
                                      "grouped_by": "lesion_id (ISIC 2017: near-duplicate groups)",
                                      "stratified_by": "dx", "dropped_leaks": df.attrs["dropped_leaks"]})
    return df, digest
