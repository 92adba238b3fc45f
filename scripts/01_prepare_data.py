"""Step 1: scan the datasets and write the `original` manifest with leak-free fit/val/calib splits.

    python scripts/01_prepare_data.py                                  # ../shared/data -> data/manifests/original.csv
    python scripts/01_prepare_data.py --data-root ~/datasets --seed 1 --out data/manifests/seed1.csv
    python scripts/01_prepare_data.py --isic-train-into-pool --out data/manifests/mixed.csv   # multi-source pool

CPU only and quick (seconds); the same on one GPU or a cluster.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prepare import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                   help="folder holding ham10000/ and isic2017/ (each with labels.csv)")
    p.add_argument("--out", default=str(ROOT / "data" / "manifests" / "original.csv"), help="manifest CSV to write")
    p.add_argument("--seed", type=int, default=0, help="split seed (recorded in the JSON beside the manifest)")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("FIT", "VAL", "CALIB"),
                   help="fractions of the HAM10000 train pool for fit, val and calib")
    p.add_argument("--isic-train-into-pool", action="store_true",
                   help="add ISIC 2017 train to the training pool (multi-source); ISIC 2017 val stays external")
    a = p.parse_args()
    if not Path(a.data_root).is_dir():
        sys.exit(f"error: data root {a.data_root} not found; see README.md (Data) for where to get the datasets")
    df, digest = prepare(a.data_root, a.out, a.seed, dict(zip(("fit", "val", "calib"), a.fractions)),
                         a.isic_train_into_pool)
    print(df.groupby(["split", "label"]).size().unstack(fill_value=0).to_string())
    print(f"wrote {a.out} ({len(df)} rows, sha256 {digest[:12]})")


if __name__ == "__main__":
    main()
