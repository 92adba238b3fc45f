"""Step 1: scan the datasets and write the manifests with leak-free splits.

    python scripts/01_prepare_data.py                      # ../shared/data -> data/manifests/original.csv
    python scripts/01_prepare_data.py --data-root ~/datasets --seed 1 --out data/manifests/seed1.csv
    python scripts/01_prepare_data.py --mixed              # original.csv -> data/manifests/mixed.csv

`--mixed` builds the multi-source manifest: HAM10000 splits as in original.csv, ISIC 2017 train split into fit/val
(near-duplicates grouped, copies of ISIC 2017 val images dropped), ISIC 2017 val kept `external`.
CPU only and quick (seconds; --mixed decodes ISIC 2017 once into 32 px thumbnails); the same on a GPU or cluster.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.manifest import read_manifest
from data.paths import MANIFESTS, SHARED_DATA
from data.prepare import prepare, prepare_mixed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(SHARED_DATA),
                   help="folder holding ham10000/ and isic2017/ (each with labels.csv)")
    p.add_argument("--out", default=None,
                   help="manifest CSV to write (default data/manifests/original.csv, or mixed.csv with --mixed)")
    p.add_argument("--seed", type=int, default=0, help="split seed (recorded in the JSON beside the manifest)")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("FIT", "VAL", "CALIB"),
                   help="fractions of the HAM10000 train pool for fit, val and calib")
    p.add_argument("--mixed", action="store_true",
                   help="build the multi-source manifest from --base instead of scanning HAM10000 again")
    p.add_argument("--base", default=str(MANIFESTS / "original.csv"), help="with --mixed: the manifest to extend")
    p.add_argument("--isic-val-fraction", type=float, default=0.15,
                   help="with --mixed: share of ISIC 2017 train held out as val for model selection")
    a = p.parse_args()
    if a.mixed:
        try:
            base = read_manifest(a.base)
        except (FileNotFoundError, ValueError) as exc:
            sys.exit(f"error: {exc}")
        out = a.out or MANIFESTS / "mixed.csv"
        df, digest = prepare_mixed(base, out, a.seed, a.isic_val_fraction)
        if df.attrs["dropped_leaks"]:
            print(f"dropped ISIC 2017 train copies of val images: {', '.join(df.attrs['dropped_leaks'])}")
    else:
        if not Path(a.data_root).is_dir():
            sys.exit(f"error: data root {a.data_root} not found; see README.md (Data) for where to get the datasets")
        out = a.out or MANIFESTS / "original.csv"
        df, digest = prepare(a.data_root, out, a.seed, dict(zip(("fit", "val", "calib"), a.fractions)))
    print(df.groupby(["dataset", "split", "label"]).size().unstack(fill_value=0).to_string())
    print(f"wrote {out} ({len(df)} rows, sha256 {digest[:12]})")


if __name__ == "__main__":
    main()
