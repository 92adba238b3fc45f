"""Find near-duplicate images in a manifest (or the shipped datasets) and report the pairs that cross splits.

    python scripts/find_duplicates.py                                  # data/manifests/original.csv
    python scripts/find_duplicates.py --data-root ../shared/data       # official splits of HAM10000 and ISIC 2017
    python scripts/find_duplicates.py --manifest data/manifests/mixed.csv --threshold 0.98 --out /tmp/dups.csv

CPU only: about 10 s for 12k images the first time (the 32 px thumbnails are cached), a few seconds after;
a GPU or a cluster brings nothing here. Exits with status 0 whether or not pairs cross splits; read the summary.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

from data.atomic import atomic_write_csv
from data.dedup import DEFAULT_THRESHOLD, find_duplicates
from data.manifest import read_ham10000, read_isic2017, read_manifest
from data.paths import MANIFESTS, RESULTS
from data.runtime import UserError, cli_main


def load(args: argparse.Namespace) -> pd.DataFrame:
    if args.data_root is None:
        return read_manifest(args.manifest)
    root = Path(args.data_root)
    readers = {"ham10000": read_ham10000, "isic2017": read_isic2017}
    parts = [read(root / name) for name, read in readers.items() if (root / name / "labels.csv").is_file()]
    if not parts:
        raise UserError(f"no ham10000/labels.csv or isic2017/labels.csv under {root}")
    return pd.concat(parts, ignore_index=True)


def summary(df: pd.DataFrame, pairs: pd.DataFrame, threshold: float) -> str:
    lines = [f"{len(df)} images, threshold {threshold}: {len(pairs)} pairs "
             f"({int(pairs['exact'].sum())} byte-identical)"]
    within = pairs[~pairs["crosses_split"]]
    crossing = pairs[pairs["crosses_split"]]
    lines.append(f"pairs within one split: {len(within)}")
    for split, n in within["split_a"].value_counts().sort_index().items():
        lines.append(f"  {split}: {n}")
    lines.append(f"pairs crossing splits: {len(crossing)}")
    if "dataset_a" in pairs:
        by_dataset = pairs.groupby(["dataset_a", "dataset_b"]).size()
        lines.append("pairs by dataset: " + ", ".join(f"{a}/{b} {n}" for (a, b), n in by_dataset.items()))
    if "official_split_a" in pairs:
        official = pairs[pairs["official_split_a"] != pairs["official_split_b"]]
        lines.append(f"pairs crossing the datasets' official splits: {len(official)}")
        crossing = pd.concat([crossing, official]).drop_duplicates(["path_a", "path_b"])
    columns = [c for c in ("image_id_a", "image_id_b", "split_a", "split_b", "official_split_a", "official_split_b",
                           "similarity", "exact") if c in pairs]
    if len(crossing):
        lines.append(crossing[columns].to_string(index=False))
    lines += [f"unreadable: {msg}" for msg in pairs.attrs["errors"].values()]
    return "\n".join(lines)


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--manifest", default=str(MANIFESTS / "original.csv"),
                        help="manifest CSV (columns path,split,...); the default is the original configuration")
    source.add_argument("--data-root", default=None,
                        help="instead of a manifest: folder holding ham10000/ and/or isic2017/ with labels.csv "
                             "(their official splits train/test/val)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="cosine similarity of 32x32 grayscale thumbnails at or above which two images are a pair")
    p.add_argument("--out", default=str(RESULTS / "data_checks" / "duplicates.csv"),
                   help="CSV of all pairs to write (paths relative to its folder)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    args = p.parse_args()
    df = load(args)
    pairs = find_duplicates(df, args.threshold, workers=args.workers, progress=True)
    out = Path(args.out).resolve()
    relative = {c: [os.path.relpath(x, out.parent) for x in pairs[c]] for c in ("path_a", "path_b")}
    atomic_write_csv(out, pairs.assign(**relative))  # paths relative to the CSV, as in a manifest
    print(summary(df, pairs, args.threshold))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
