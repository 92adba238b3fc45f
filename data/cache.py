"""Preprocessing cache: decode and resize every image of a manifest once, into a uint8 memory-mapped array.

Decoding JPEGs each epoch makes CPU training decode-bound; the cache makes data loading nearly free
(`scripts/benchmark_cache.py` measures it). The cache is keyed by (the ordered list of paths, size, resize rule),
so any change to the manifest or to the preprocessing builds a new one. Files that fail to decode are listed in the
cache's JSON and reported, never silently dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data.atomic import tmp_path
from data.images import ImageError, load_uint8
from data.manifest import class_index
from data.paths import CACHE

DEFAULT_CACHE_DIR = Path(os.environ.get("MELANOMA_CACHE", CACHE))


@dataclass
class ImageCache:
    images: np.ndarray          # N x size x size x 3 uint8 (memory-mapped)
    ok: np.ndarray              # N bools: False for files that failed to decode
    errors: dict[int, str]      # row -> error message


def _decode(args: tuple[str, int, str]) -> tuple[np.ndarray | None, str | None]:
    path, size, rule = args
    try:
        return load_uint8(path, size, rule), None
    except ImageError as exc:
        return None, str(exc)


def cache_key(paths: list[str], size: int, rule: str) -> str:
    h = hashlib.sha256(f"{size}|{rule}|".encode())
    for p in paths:
        h.update(p.encode() + b"\n")
    return h.hexdigest()[:20]


def build_cache(paths: list[str], size: int, rule: str = "squash", cache_dir: str | os.PathLike | None = None,
                workers: int | None = None, progress: bool = True) -> ImageCache:
    """Return the cache for these paths, building it (in parallel, atomically) if it does not exist."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size, rule)
    array_path, info_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (len(paths), size, size, 3)
    if not (array_path.exists() and info_path.exists()):
        tmp = tmp_path(array_path)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        errors: dict[int, str] = {}
        workers = workers or len(os.sched_getaffinity(0))
        jobs = [(p, size, rule) for p in paths]
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_decode, jobs, chunksize=64)
            # disable=None: the bar shows on a terminal and stays out of redirected logs
            for i, (arr, err) in enumerate(tqdm(results, total=len(jobs), desc=f"caching {size}px",
                                                disable=None if progress else True, leave=False)):
                if err is None:
                    out[i] = arr
                else:
                    errors[i] = err
        out.flush()
        del out
        os.replace(tmp, array_path)
        tmp_info = tmp_path(info_path)
        tmp_info.write_text(json.dumps({"size": size, "rule": rule, "n": len(paths), "errors": errors}, indent=1))
        os.replace(tmp_info, info_path)
    info = json.loads(info_path.read_text())
    errors = {int(k): v for k, v in info["errors"].items()}
    ok = np.ones(len(paths), dtype=bool)
    ok[list(errors)] = False
    return ImageCache(np.load(array_path, mmap_mode="r"), ok, errors)


class CachedImages(torch.utils.data.Dataset):
    """Rows of a manifest served from the cache as (uint8 CxHxW tensor, label index); augmentation is batched
    on the training device (see data/transforms.py). Rows that failed to decode are excluded and reported."""

    def __init__(self, df: pd.DataFrame, size: int, rule: str = "squash", cache_dir: str | None = None,
                 in_memory: bool = True, target: str = "label"):
        cache = build_cache(list(df["path"]), size, rule, cache_dir)
        if cache.errors:
            print(f"warning: {len(cache.errors)} of {len(df)} images could not be decoded and are skipped:")
            for msg in list(cache.errors.values())[:10]:
                print(f"  {msg}")
        keep = np.flatnonzero(cache.ok)
        self.df = df.iloc[keep].reset_index(drop=True)
        self.images = np.ascontiguousarray(cache.images[keep]) if in_memory else cache.images
        self._rows = None if in_memory else keep
        # torch.tensor copies: newer pandas hands out read-only arrays, which torch.as_tensor warns about.
        self.targets = torch.tensor(class_index(self.df, target).to_numpy(), dtype=torch.long)
        self.skipped = cache.errors

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i] if self._rows is None else self.images[self._rows[i]]
        return torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1), self.targets[i]
