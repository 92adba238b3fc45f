"""Lay out ISIC Archive exports made with isic-cli as the datasets this project reads.

Why: a researcher without `../shared/data` gets HAM10000 and ISIC 2017 from the ISIC Archive with its own tool,
`isic image download --collections IDS OUTDIR` (PyPI `isic-cli`), and this module turns that export into
`<root>/<dataset>/labels.csv` + `<root>/<dataset>/<split>/<benign|malignant>/<image>` (README.md, Data).

What isic-cli writes (isic_cli/cli/image.py, version 12): OUTDIR/<isic_id>.<ext> flat, OUTDIR/metadata.csv (columns
`isic_id,attribution,copyright_license`, then the archive's metadata fields, sorted; which fields appear depends on
the collection), OUTDIR/attribution.txt and OUTDIR/licenses/<licence>.txt. metadata.csv is written only after every
image is in, so a missing metadata.csv means an unfinished download.

Labels, HAM10000 lesion ids and splits come from the reference, the committed `data/manifests/original.csv`
(`dx`, `lesion_id`, `diagnosis`, `official_split`): the HAM10000 train/test split is this project's, not the
archive's; `scripts/01_prepare_data.py` on the new layout then draws the committed fit/val/calib split too (it
depends on the lesion ids, the diagnoses and the seed, not on the images). The archive's own metadata is kept where
it adds something: each image's attribution and licence, the HAM10000 confirmation type (`dx_type`), and a melanoma
cross-check (`diagnosis_2`).
"""
from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import requests
from tqdm import tqdm

from data.atomic import atomic_write, atomic_write_csv, atomic_write_text
from data.images import IMAGE_SUFFIXES

# ISIC Archive collection ids, as `isic collection list` names them: "HAM10000" (10,015 images); ISIC 2017
# "Challenge 2017: Training" (2,000) and "Challenge 2017: Validation" (150), Part 3 of which this project uses.
COLLECTIONS = {"ham10000": (212,), "isic2017": (60, 71)}
LABEL_COLUMNS = {
    "ham10000": ["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization", "split", "label", "melanoma"],
    "isic2017": ["image_id", "split", "label", "melanoma", "seborrheic_keratosis", "diagnosis", "age_approximate",
                 "sex"],
}
PROVENANCE = ["attribution", "copyright_license"]
# isic-metadata's diagnosis_confirm_type values -> HAM10000's dx_type codes (Tschandl et al. 2018).
DX_TYPE = {"histopathology": "histo", "serial imaging showing no change": "follow_up",
           "single image expert consensus": "consensus", "confocal microscopy with consensus dermoscopy": "confocal"}
MELANOMA_CLASS = "Malignant melanocytic proliferations (Melanoma)"  # diagnosis_2 of every melanoma
MARKER = "SOURCE.json"


class ExportError(ValueError):
    """An export that cannot give the layout (unfinished download, images missing); the message says which."""


class ArchiveError(RuntimeError):
    """The ISIC Archive could not be reached or refused a request; the message is one line."""


def api_root() -> str:
    """The API root isic-cli itself talks to."""
    from isic_cli.cli import DOMAINS  # imported here: isic-cli's CLI module takes ~0.7 s to import

    return f"{DOMAINS['prod']}/api/v2/"


def collection_names(collections: tuple[int, ...], api: str | None = None, timeout: float = 10) -> dict[int, str]:
    """Each collection's name in the archive: a cheap check, before any download, that the archive is reachable
    and the ids exist."""
    api = api or api_root()
    names = {}
    for collection in collections:
        try:
            response = requests.get(f"{api}collections/{collection}/", timeout=timeout,
                                    headers={"Accept": "application/json"})
        except (requests.ConnectionError, requests.Timeout) as exc:
            host = urlparse(api).netloc
            raise ArchiveError(f"cannot reach the ISIC Archive ({host}: {type(exc).__name__}); connect to the "
                               "internet and run the same command again (downloaded images are kept)") from exc
        if response.status_code == 404:
            raise ArchiveError(f"ISIC Archive collection {collection} not found (list them with `isic collection "
                               "list`)")
        if not response.ok:
            raise ArchiveError(f"the ISIC Archive answered HTTP {response.status_code} for collection {collection}; "
                               "try again later")
        names[collection] = response.json()["name"]
    return names


def download_command(collections: tuple[int, ...], export: str | os.PathLike, python: str) -> list[str]:
    """isic-cli's own download: progress bar, skips images already there with the right size (so it resumes)."""
    return [python, "-m", "isic_cli.cli", "image", "download", "--collections",
            ",".join(str(c) for c in collections), str(export)]


def read_export(export: str | os.PathLike) -> pd.DataFrame:
    """metadata.csv of one isic-cli export with a `file` column (the image's path), indexed by isic_id."""
    export = Path(export)
    meta = export / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not found; the isic-cli download did not finish (run it again to resume)")
    df = pd.read_csv(meta, dtype=str, keep_default_na=False).set_index("isic_id")
    files = {p.stem: p for p in export.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [i for i in df.index if i not in files]
    if missing:
        raise ExportError(f"{export}: {len(missing)} images listed in metadata.csv are not there (e.g. {missing[0]}); "
                          "run the download again to resume")
    return df.assign(file=[files[i] for i in df.index])


def _unknown(values: pd.Series) -> pd.Series:
    """Missing sex or site as the shipped labels.csv spell it."""
    return values.fillna("unknown")


def reference_labels(reference: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """labels.csv rows of `dataset` (without path, md5, provenance) from a manifest, in the manifest's order."""
    if dataset not in LABEL_COLUMNS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(LABEL_COLUMNS)}")
    ref = reference[reference["dataset"] == dataset]
    if ref.empty:
        raise ValueError(f"the reference manifest has no {dataset} rows")
    if dataset == "ham10000":
        out = pd.DataFrame({"image_id": ref["image_id"], "lesion_id": ref["lesion_id"], "dx": ref["dx"], "dx_type": "",
                            "age": ref["age"], "sex": _unknown(ref["sex"]), "localization": _unknown(ref["site"]),
                            "split": ref["official_split"], "label": ref["label"],
                            "melanoma": (ref["dx"] == "mel").astype(int)})
    else:
        age = pd.to_numeric(ref["age"], errors="coerce")
        out = pd.DataFrame({"image_id": ref["image_id"], "split": ref["official_split"], "label": ref["label"],
                            "melanoma": (ref["diagnosis"] == "melanoma").astype(int),
                            "seborrheic_keratosis": (ref["diagnosis"] == "seborrheic_keratosis").astype(int),
                            "diagnosis": ref["diagnosis"],
                            "age_approximate": [str(int(a)) if pd.notna(a) else "unknown" for a in age],
                            "sex": _unknown(ref["sex"])})
    return out[LABEL_COLUMNS[dataset]].reset_index(drop=True)


def _link_or_copy(src: Path, dst: Path) -> str:
    """A hard link keeps one copy on disk beside the export (which isic-cli needs to resume); a copy where links
    are impossible (another file system)."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def place(src: Path, dst: Path) -> str:
    """Put `src` at `dst` atomically: 'kept' when `dst` already holds the same bytes, else 'linked' or 'copied'."""
    if dst.is_file() and (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)):
        return "kept"
    how: list[str] = []
    atomic_write(dst, lambda tmp: how.append(_link_or_copy(src, tmp)))
    return how[0]


def check_destination(out_root: str | os.PathLike, dataset: str) -> None:
    """Refuse to lay a download over a dataset that did not come from one (e.g. ../shared/data as shipped)."""
    dest = Path(out_root) / dataset
    if (dest / "labels.csv").is_file() and not (dest / MARKER).is_file():
        raise FileExistsError(f"{dest} already holds a dataset this script did not write (no {MARKER}); "
                              "choose another --out-root")


def convert(export: str | os.PathLike, reference: pd.DataFrame, dataset: str, out_root: str | os.PathLike,
            info: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Lay out `dataset` from an isic-cli export under `out_root/dataset`; idempotent. Returns a summary: image
    counts by how they were placed, export images the reference does not list (`ignored`), and the images whose
    melanoma status in the archive's metadata disagrees with the reference (`melanoma_disagreements`)."""
    export, dest = Path(export), Path(out_root) / dataset
    check_destination(out_root, dataset)
    meta = read_export(export)
    table = reference_labels(reference, dataset)
    missing = table.loc[~table["image_id"].isin(meta.index), "image_id"]
    if len(missing):
        raise ExportError(f"{export}: {len(missing)} of the {len(table)} {dataset} images are not in the export "
                          f"(e.g. {missing.iloc[0]}); check the collections, or run the download again to resume")
    rows = meta.loc[table["image_id"]]
    if dataset == "ham10000" and "diagnosis_confirm_type" in rows:
        table["dx_type"] = [DX_TYPE.get(v, v) for v in rows["diagnosis_confirm_type"]]
    table["path"] = [f"{s}/{lab}/{f.name}" for s, lab, f in zip(table["split"], table["label"], rows["file"])]
    counts = {"kept": 0, "linked": 0, "copied": 0}
    md5 = []
    files = zip(rows["file"], table["path"])
    if progress:
        files = tqdm(files, total=len(table), desc=f"laying out {dataset}", unit="image")
    for src, rel in files:
        counts[place(src, dest / rel)] += 1
        md5.append(hashlib.md5(src.read_bytes()).hexdigest())
    table["md5"] = md5
    for column in PROVENANCE:
        table[column] = rows[column].to_numpy()
    atomic_write_csv(dest / "labels.csv", table)
    for extra in [export / "attribution.txt", *sorted((export / "licenses").glob("*.txt"))]:
        if extra.is_file():
            place(extra, dest / extra.relative_to(export))
    disagree = []
    if "diagnosis_2" in rows:
        archive_melanoma = (rows["diagnosis_2"] == MELANOMA_CLASS).to_numpy()
        disagree = list(table.loc[archive_melanoma != table["melanoma"].eq(1).to_numpy(), "image_id"])
    summary = {"dataset": dataset, "images": len(table), **counts,
               "ignored": int((~meta.index.isin(table["image_id"])).sum()), "melanoma_disagreements": disagree}
    atomic_write_text(dest / MARKER, json.dumps({"written_by": "scripts/00_download_data.py",
                                                 "export": str(export.resolve()), **(info or {}), **summary},
                                                indent=2) + "\n")
    return summary
