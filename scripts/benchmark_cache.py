"""Measure one epoch of data loading through the preprocessing cache against decoding the JPEGs every time.

    python scripts/benchmark_cache.py                          # HAM10000 fit at 128 px, batch 32, 2 workers
    python scripts/benchmark_cache.py --limit 1000 --workers 1 # a quicker run
    python scripts/benchmark_cache.py --size 224 --workers 8   # on a GPU machine: loading is CPU work either way

Both paths use the same rows, batch size, shuffling and DataLoader workers, and run one after the other in one
process; only loading is timed (no model). The cache is built first if it does not exist yet (its build time is
printed apart: it is paid once per manifest and preprocessing, not per epoch).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from data.cache import DEFAULT_CACHE_DIR, CachedImages, build_cache, cache_key
from data.images import load_uint8
from data.manifest import label_index, read_manifest
from data.paths import MANIFESTS


class DecodedImages(torch.utils.data.Dataset):
    """The uncached path: decode and resize the file on every access."""

    def __init__(self, df: pd.DataFrame, size: int, rule: str):
        self.paths, self.size, self.rule = list(df["path"]), size, rule
        self.targets = torch.tensor(label_index(df["label"]).to_numpy(), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = load_uint8(self.paths[i], self.size, self.rule).copy()  # PIL arrays are read-only
        return torch.from_numpy(pixels).permute(2, 0, 1), self.targets[i]


def epoch_rate(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, seed: int) -> tuple[float, float]:
    """Seconds and images/s of one shuffled pass, DataLoader start-up (worker processes) included."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    seconds = time.perf_counter() - start
    return seconds, n / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--split", default="fit", help="split of the manifest to read")
    p.add_argument("--dataset", default="ham10000", help="keep rows of this dataset column value ('' for all)")
    p.add_argument("--size", type=int, default=128, help="square image size in pixels")
    p.add_argument("--resize", default="squash", choices=("squash", "center_crop"), help="resize rule")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0 = main process)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows (default: the whole split)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default .cache/ or $MELANOMA_CACHE)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed")
    args = p.parse_args()
    torch.set_num_threads(1)

    df = read_manifest(args.manifest)
    df = df[df["split"] == args.split]
    if args.dataset:
        df = df[df["dataset"] == args.dataset]
    df = df.head(args.limit).reset_index(drop=True) if args.limit else df.reset_index(drop=True)
    if df.empty:
        sys.exit(f"error: no rows with split={args.split!r} and dataset={args.dataset!r} in {args.manifest}")

    key = cache_key(list(df["path"]), args.size, args.resize)
    existed = (Path(args.cache_dir or DEFAULT_CACHE_DIR) / f"{key}.json").is_file()
    start = time.perf_counter()
    build_cache(list(df["path"]), args.size, args.resize, args.cache_dir, workers=args.workers or 1, progress=False)
    build_s = time.perf_counter() - start
    cached = CachedImages(df, args.size, args.resize, args.cache_dir)
    decoded = DecodedImages(df, args.size, args.resize)

    decode_s, decode_rate = epoch_rate(decoded, args.batch_size, args.workers, args.seed)
    cache_s, cache_rate = epoch_rate(cached, args.batch_size, args.workers, args.seed)
    print(f"{len(df)} images of {Path(args.manifest).name} split={args.split} dataset={args.dataset or 'all'}, "
          f"{args.size} px {args.resize}, batch {args.batch_size}, {args.workers} DataLoader workers, "
          f"torch {torch.__version__}")
    print(f"cache {'found from an earlier run' if existed else 'built'} in {build_s:.1f} s (paid once per manifest "
          f"and preprocessing, not per epoch)")
    print(f"{'path':<28}{'epoch s':>9}{'images/s':>11}")
    print(f"{'decode JPEG every time':<28}{decode_s:>9.2f}{decode_rate:>11.0f}")
    print(f"{'preprocessing cache':<28}{cache_s:>9.2f}{cache_rate:>11.0f}")
    print(f"cache speed-up: {cache_rate / decode_rate:.1f}x")


if __name__ == "__main__":
    main()
