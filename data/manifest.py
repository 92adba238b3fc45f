"""Manifests: one CSV per dataset configuration, the contract every trainer and evaluator reads.

Columns: `path,label,split,source` plus optional `dx,lesion_id,patient_id,age,sex,site,dataset`.
`label` is benign|malignant (class 0|1), `split` is fit|val|calib|test|external, `source` is real or a generator.
Paths are stored relative to the manifest's folder and resolved to absolute paths on load.
Readers for the two layouts users have: folders `root/<split>/<benign|malignant>/*` and the shipped `labels.csv`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from data.atomic import tmp_path
from data.images import list_images

LABELS = ("benign", "malignant")
SPLITS = ("fit", "val", "calib", "test", "external")
SOURCES = ("real", "dcgan", "ddpm", "dcgan_up", "ddpm_up", "ldm", "ldm_up", "ldm_filtered")
DX_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT_DX = ("mel", "bcc", "akiec")
REQUIRED = ("path", "label", "split", "source")
# What a classifier or generator can be trained to predict: the manifest column and its class names, in index order.
TARGETS = {"label": LABELS, "dx": DX_CLASSES}
OPTIONAL = ("dx", "lesion_id", "patient_id", "age", "sex", "site", "dataset")


class ManifestError(ValueError):
    """A manifest that breaks the contract; the message says which file and which rows."""


def label_index(labels: pd.Series) -> pd.Series:
    return (labels == "malignant").astype(int)


def class_index(df: pd.DataFrame, target: str = "label") -> pd.Series:
    """Class indices of `target` (a TARGETS key): benign|malignant -> 0|1, or the seven dx classes -> 0..6."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {sorted(TARGETS)}")
    if target not in df or df[target].isna().any():
        raise ManifestError(f"target {target!r} needs a {target!r} value on every row")
    return df[target].map({name: i for i, name in enumerate(TARGETS[target])}).astype(int)


def validate(df: pd.DataFrame, name: str = "manifest") -> pd.DataFrame:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{name}: missing columns {missing} (need {list(REQUIRED)})")
    for column, allowed in (("label", LABELS), ("split", SPLITS), ("source", SOURCES)):
        bad = df.loc[~df[column].isin(allowed), column]
        if len(bad):
            raise ManifestError(f"{name}: column {column!r} has {len(bad)} invalid values, e.g. {bad.iloc[0]!r}; "
                                f"allowed {list(allowed)}")
    synthetic_outside_fit = df[(df["source"] != "real") & (df["split"] != "fit")]
    if len(synthetic_outside_fit):
        raise ManifestError(f"{name}: {len(synthetic_outside_fit)} synthetic rows outside the fit split")
    if "dx" in df.columns:
        bad = df["dx"].dropna()
        bad = bad[~bad.isin(DX_CLASSES)]
        if len(bad):
            raise ManifestError(f"{name}: unknown dx values {sorted(set(bad))[:5]}")
    return df


def split_label(split: str, official_split: object = None) -> str:
    """How evaluation outputs name a split: `external` rows keep ISIC's official split apart (external-val)."""
    return f"{split}-{official_split}" if split == "external" and isinstance(official_split, str) else split


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Load and validate a manifest CSV; relative paths become absolute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (build one with scripts/01_prepare_data.py)")
    df = pd.read_csv(path, dtype={"lesion_id": str, "patient_id": str, "sex": str, "site": str, "dx": str})
    df = validate(df, str(path))
    df["path"] = [str((path.parent / p).resolve()) if not os.path.isabs(p) else p for p in df["path"]]
    return df.reset_index(drop=True)


def write_manifest(df: pd.DataFrame, path: str | os.PathLike, info: dict | None = None) -> str:
    """Write a manifest (paths relative to its folder) and a JSON beside it; returns the manifest's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = validate(df.copy(), str(path))
    df["path"] = [os.path.relpath(p, path.parent) if os.path.isabs(p) else p for p in df["path"]]
    columns = list(REQUIRED) + [c for c in OPTIONAL if c in df.columns]
    columns += [c for c in df.columns if c not in columns]
    tmp = tmp_path(path)
    df[columns].to_csv(tmp, index=False)
    os.replace(tmp, path)
    digest = file_sha256(path)
    counts = df.groupby(["split", "label"]).size().unstack(fill_value=0)
    summary = {"manifest": path.name, "sha256": digest, "rows": len(df),
               "counts": {s: {k: int(v) for k, v in row.items()} for s, row in counts.iterrows()},
               "sources": {k: int(v) for k, v in df["source"].value_counts().items()}, **(info or {})}
    tmp_json = tmp_path(path.with_suffix(".json"))
    tmp_json.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp_json, path.with_suffix(".json"))
    return digest


def stratified_subset(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded subset of about n rows stratified by label (and by dataset when there are several), keeping at
    least one row of every stratum; all rows when there are fewer than n."""
    if len(df) <= n:
        return df
    keys = ["dataset", "label"] if "dataset" in df and df["dataset"].nunique() > 1 else ["label"]
    return pd.concat([g.sample(n=min(len(g), max(1, round(len(g) * n / len(df)))), random_state=seed)
                      for _, g in df.groupby(keys)])


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_ham10000(root: str | os.PathLike) -> pd.DataFrame:
    """HAM10000 as shipped in ../shared/data/ham10000 (labels.csv); its split is `train` or `test`."""
    root = Path(root)
    labels = _read_labels(root)
    return pd.DataFrame({
        "path": [str((root / p).resolve()) for p in labels["path"]], "label": labels["label"],
        "split": labels["split"], "source": "real", "dx": labels["dx"], "lesion_id": labels["lesion_id"],
        "age": labels["age"], "sex": labels["sex"].replace("unknown", pd.NA),
        "site": labels["localization"].replace("unknown", pd.NA), "dataset": "ham10000",
        "image_id": labels["image_id"], "official_split": labels["split"]})


def read_isic2017(root: str | os.PathLike) -> pd.DataFrame:
    """ISIC 2017 Part 3 (labels.csv): melanoma = malignant; nevus and seborrheic keratosis = benign."""
    root = Path(root)
    labels = _read_labels(root)
    return pd.DataFrame({
        "path": [str((root / p).resolve()) for p in labels["path"]], "label": labels["label"],
        "split": labels["split"], "source": "real",
        # The image is its own lesion group: ISIC 2017 ships no lesion ids.
        "lesion_id": labels["image_id"], "age": pd.to_numeric(labels["age_approximate"], errors="coerce"),
        "sex": labels["sex"].replace("unknown", pd.NA), "dataset": "isic2017", "image_id": labels["image_id"],
        "diagnosis": labels["diagnosis"], "official_split": labels["split"]})


def read_folder(root: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """Folder layout `root/<split>/<benign|malignant>/*` (or `root/<benign|malignant>/*` with `split` given)."""
    root = Path(root)
    rows = []
    for path in list_images(root):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[-2] not in LABELS:
            continue
        row_split = split or (parts[-3] if len(parts) >= 3 else None)
        if row_split not in SPLITS:
            raise ManifestError(f"{path}: split folder {row_split!r} is not one of {SPLITS}; pass split=...")
        rows.append({"path": str(path.resolve()), "label": parts[-2], "split": row_split, "source": "real",
                     "lesion_id": path.stem})
    if not rows:
        raise ManifestError(f"{root}: no images under <split>/<benign|malignant>/ folders")
    return pd.DataFrame(rows)


def _read_labels(root: Path) -> pd.DataFrame:
    csv = root / "labels.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: not found; see README.md (Data) for the expected layout")
    return pd.read_csv(csv, dtype={"lesion_id": str, "sex": str, "localization": str})
