"""The preprocessing cache on real images: exact pixels, keyed reuse, and corrupt files reported instead of crashing
or silently vanishing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import data.cache
from data.cache import CachedImages, build_cache
from data.images import load_uint8
from data.manifest import label_index

SIZE = 32


def test_cache_rows_equal_the_decoder(tiny_df: pd.DataFrame, tmp_path: Path):
    paths = list(tiny_df["path"])
    cache = build_cache(paths, SIZE, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert cache.images.shape == (len(paths), SIZE, SIZE, 3) and cache.images.dtype == np.uint8
    assert cache.ok.all() and cache.errors == {}
    for i, path in enumerate(paths):
        assert np.array_equal(cache.images[i], load_uint8(path, SIZE)), path


def test_cache_is_keyed_and_reused(tiny_df: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths, folder = list(tiny_df["path"]), tmp_path / "cache"
    first = build_cache(paths, SIZE, cache_dir=folder, workers=1, progress=False)
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(files) == 2  # one array and its JSON, no temporary files left

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt instead of reused")

    with monkeypatch.context() as m:
        m.setattr(data.cache, "ProcessPoolExecutor", no_decoding)
        again = build_cache(paths, SIZE, cache_dir=folder, workers=1, progress=False)
    assert np.array_equal(again.images, first.images)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files

    build_cache(paths, SIZE + 8, cache_dir=folder, workers=1, progress=False)
    build_cache(paths[::-1], SIZE, cache_dir=folder, workers=1, progress=False)
    assert len(list(folder.glob("*.u8"))) == 3  # another size, another order: new keys


@pytest.mark.parametrize("in_memory", [True, False])
def test_corrupt_file_is_reported_and_skipped(tiny_df: pd.DataFrame, tmp_path: Path, in_memory: bool,
                                              capsys: pytest.CaptureFixture):
    bad = 5
    bad_path = Path(tiny_df.loc[bad, "path"])
    bad_path.write_bytes(bad_path.read_bytes()[:300])  # a truncated JPEG
    cache = build_cache(list(tiny_df["path"]), SIZE, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert list(cache.errors) == [bad] and bad_path.name in cache.errors[bad]
    assert not cache.ok[bad] and cache.ok.sum() == len(tiny_df) - 1

    data_set = CachedImages(tiny_df, SIZE, cache_dir=str(tmp_path / "cache"), in_memory=in_memory)
    assert bad_path.name in capsys.readouterr().out
    assert len(data_set) == len(tiny_df) - 1 and list(data_set.skipped) == [bad]
    kept = tiny_df.drop(index=bad).reset_index(drop=True)
    assert list(data_set.df["path"]) == list(kept["path"])
    assert torch.equal(data_set.targets, torch.as_tensor(label_index(kept["label"]).to_numpy()))
    for i in (0, bad, len(data_set) - 1):  # rows before and after the skipped one
        x, y = data_set[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8
        assert torch.equal(x, torch.from_numpy(load_uint8(kept.loc[i, "path"], SIZE).copy()).permute(2, 0, 1))
        assert int(y) == int(kept.loc[i, "label"] == "malignant")
