"""Copy a small real subset of the datasets (images + labels.csv, same layout) to take to another machine.

    python scripts/make_data_subset.py --out /tmp/subset                 # 520 + 160 HAM10000, all 150 ISIC 2017 val
    python scripts/make_data_subset.py --out /tmp/subset --ham-train 2000 --isic-train 0
    # then, on the other machine (e.g. one GPU): every script takes the subset as its data root
    python scripts/run_pipeline.py --preset smoke --data-root /tmp/subset --work-dir /tmp/smoke --device cuda

Why: the full data (76 MB) may not fit where you are going (the GPU check in the README had 64 MB for code and data
together). HAM10000 rows are drawn by lesion (every image of a chosen lesion comes along, so the lesion-grouped
splits stay grouped), stratified by diagnosis (dx), seeded. The copy keeps each labels.csv's columns, md5 included, so
the loaders check it the same way. Research licences travel with the images: keep the copy out of any repository.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd

from data.paths import SHARED_DATA


def by_lesion(part: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """About n rows of `part`: whole lesions, drawn per dx in proportion to its share of the lesions, at least one
    lesion of every dx (so a seven-class run still sees every class)."""
    if n >= len(part) or n == 0:
        return part.iloc[:n]  # all of it, or none
    lesions = part.drop_duplicates("lesion_id")
    fraction = n / len(part)
    chosen = pd.concat(group.sample(max(1, round(fraction * len(group))), random_state=seed)
                       for _, group in lesions.groupby("dx"))
    return part[part["lesion_id"].isin(chosen["lesion_id"])]


def sample(part: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return part if n >= len(part) else part.sample(n, random_state=seed)


def copy(rows: pd.DataFrame, source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for rel in rows["path"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, out / rel)
    rows.to_csv(out / "labels.csv", index=False)


def count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: a count of images cannot be negative")
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(SHARED_DATA),
                   help="folder holding ham10000/ and isic2017/")
    p.add_argument("--out", required=True, help="new data root (must not exist yet)")
    p.add_argument("--ham-train", type=count, default=520, help="about this many HAM10000 train images (whole lesions)")
    p.add_argument("--ham-test", type=count, default=160, help="about this many HAM10000 test images (whole lesions)")
    p.add_argument("--isic-train", type=count, default=60, help="ISIC 2017 train images (random)")
    p.add_argument("--isic-val", type=count, default=150, help="ISIC 2017 val images (random; 150 is all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    a = p.parse_args(argv)
    source, out = Path(a.data_root), Path(a.out)
    if not (source / "ham10000" / "labels.csv").is_file():
        sys.exit(f"error: {source}/ham10000/labels.csv not found; --data-root must hold ham10000/ (and isic2017/)")
    if out.exists():
        sys.exit(f"error: {out} exists; choose a new folder")
    partial = out.with_name(out.name + ".partial")  # renamed to `out` once complete, so a failed copy can be rerun
    shutil.rmtree(partial, ignore_errors=True)
    ham = pd.read_csv(source / "ham10000" / "labels.csv")
    ham = pd.concat([by_lesion(ham[ham["split"] == "train"], a.ham_train, a.seed),
                     by_lesion(ham[ham["split"] == "test"], a.ham_test, a.seed)])
    counts = {"ham10000": ham}
    if (source / "isic2017" / "labels.csv").is_file():
        isic = pd.read_csv(source / "isic2017" / "labels.csv")
        counts["isic2017"] = pd.concat([sample(isic[isic["split"] == "train"], a.isic_train, a.seed),
                                        sample(isic[isic["split"] == "val"], a.isic_val, a.seed)])
    try:
        for name, rows in counts.items():
            copy(rows, source / name, partial / name)
    except OSError as exc:
        sys.exit(f"error: {exc}")
    partial.rename(out)
    for name, rows in counts.items():
        print(f"{name}: " + ", ".join(f"{split} {len(g)} ({(g['label'] == 'malignant').sum()} malignant)"
                                      for split, g in rows.groupby("split")))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
