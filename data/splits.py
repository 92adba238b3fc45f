"""Seeded, lesion-grouped, dx-stratified splits of a training pool into fit / val / calib.

HAM10000 holds several images of one lesion; if they straddle fit and val, val AUC is inflated. Every split here is
made of whole lesion groups (StratifiedGroupKFold over folds, then folds assigned to splits), and
`assert_grouped` checks the result.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold


def grouped_split(pool: pd.DataFrame, fractions: dict[str, float], seed: int, stratify: str = "dx",
                  group: str = "lesion_id", n_folds: int = 20) -> pd.Series:
    """Return a split name per row of `pool`, e.g. fractions={"fit": .8, "val": .1, "calib": .1}."""
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    folds = grouped_folds(pool, n_folds, seed, stratify, group)
    names, bounds = list(fractions), np.cumsum([round(f * n_folds) for f in fractions.values()])
    bounds[-1] = n_folds
    fold_to_split = {k: names[int(np.searchsorted(bounds, k, side="right"))] for k in range(n_folds)}
    return pd.Series([fold_to_split[f] for f in folds], index=pool.index, name="split")


def grouped_folds(pool: pd.DataFrame, n_folds: int, seed: int, stratify: str = "dx",
                  group: str = "lesion_id") -> np.ndarray:
    """Fold index (0..n_folds-1) per row: whole groups per fold, strata as even as the groups allow."""
    folds = np.empty(len(pool), dtype=int)
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    strata = pool[stratify].fillna(pool["label"]) if stratify in pool else pool["label"]
    for k, (_, idx) in enumerate(cv.split(np.zeros(len(pool)), strata, pool[group])):
        folds[idx] = k
    return folds


def assert_grouped(df: pd.DataFrame, group: str = "lesion_id") -> None:
    """Raise if any group (lesion, patient) appears in more than one split."""
    for column in (group, "patient_id"):
        if column not in df or df[column].isna().all():
            continue
        spread = df.dropna(subset=[column]).groupby(column)["split"].nunique()
        crossing = spread[spread > 1]
        if len(crossing):
            raise AssertionError(f"{len(crossing)} {column} groups cross splits, e.g. {list(crossing.index[:3])}")
