"""Build the `original` manifest from the shipped datasets.

HAM10000 `train` is split into fit / val / calib (grouped by lesion, stratified by dx, seeded); HAM10000 `test`
stays `test`; ISIC 2017 `val` (or train+val) becomes `external`. ISIC 2017 `train` can instead join the training
pool (`isic_train_into_pool=True`, for multi-source training), split by image since it has no lesion ids.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from data.manifest import read_ham10000, read_isic2017, write_manifest
from data.splits import assert_grouped, grouped_split

DEFAULT_FRACTIONS = {"fit": 0.8, "val": 0.1, "calib": 0.1}


def build_manifest(data_root: str | os.PathLike, seed: int = 0, fractions: dict[str, float] | None = None,
                   isic_train_into_pool: bool = False) -> pd.DataFrame:
    data_root = Path(data_root)
    fractions = fractions or DEFAULT_FRACTIONS
    ham = read_ham10000(data_root / "ham10000")
    isic_root = data_root / "isic2017"
    isic = read_isic2017(isic_root) if (isic_root / "labels.csv").is_file() else None
    pool = ham[ham["split"] == "train"].copy()
    if isic is not None and isic_train_into_pool:
        isic_train = isic[isic["split"] == "train"].copy()
        isic_train["dx"] = isic_train["diagnosis"].map({"melanoma": "mel", "nevus": "nv",
                                                        "seborrheic_keratosis": "bkl"})
        pool = pd.concat([pool, isic_train], ignore_index=True)
    pool["split"] = grouped_split(pool, fractions, seed, stratify_by(pool))
    parts = [pool, ham[ham["split"] == "test"]]
    if isic is not None:
        external = isic[isic["split"] == "val"] if isic_train_into_pool else isic
        parts.append(external.assign(split="external"))
    df = pd.concat(parts, ignore_index=True)
    df.loc[df["dataset"] == "ham10000", "split"] = df.loc[df["dataset"] == "ham10000", "split"].replace(
        {"train": "fit"})
    assert_grouped(df)
    return df


def stratify_by(pool: pd.DataFrame) -> str:
    if "dataset" in pool and pool["dataset"].nunique() > 1:
        pool["_stratum"] = pool["dataset"] + ":" + pool["dx"].fillna(pool["label"])
        return "_stratum"
    return "dx"


def prepare(data_root: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
            fractions: dict[str, float] | None = None, isic_train_into_pool: bool = False) -> tuple[pd.DataFrame, str]:
    df = build_manifest(data_root, seed, fractions, isic_train_into_pool).drop(columns=["_stratum"], errors="ignore")
    digest = write_manifest(df, out, {"seed": seed, "fractions": fractions or DEFAULT_FRACTIONS,
                                      "grouped_by": "lesion_id", "stratified_by": "dx",
                                      "isic_train_into_pool": isic_train_into_pool,
                                      "data_root": os.path.relpath(Path(data_root).resolve(), Path(out).parent)})
    return df, digest
