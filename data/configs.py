"""The dataset configurations: `original` and those that add synthetic lesions to the `fit` split.

`dcgan_aug` / `ddpm_aug` add 64-px generator samples (the classifier's cache resizes them with bicubic), and
`dcgan_up` / `ddpm_up` add the same kind of samples passed through the learned upscaler. Synthetic rows are added to
`fit` only, to the under-represented class(es) only, until each class has `ratio` times as many fit images as the
largest class (1.0: balanced 1:1). `val`, `calib`, `test` and `external` are copied unchanged, so every
configuration is selected and evaluated on the same real images.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from data.manifest import TARGETS, file_sha256, read_manifest, write_manifest

# configuration -> synthetic source. The pipeline's grid trains the first five (PIPELINE); the latent diffusion model
# and the classifier-filtered samples (studies/filter_synthetic.py) add theirs for studies/synthetic_data.py.
CONFIGS: dict[str, str | None] = {"original": None, "dcgan_aug": "dcgan", "dcgan_up": "dcgan_up",
                                  "ddpm_aug": "ddpm", "ddpm_up": "ddpm_up", "ldm_aug": "ldm", "ldm_up": "ldm_up",
                                  "ldm_filtered": "ldm_filtered"}
PIPELINE = ["original", "dcgan_aug", "dcgan_up", "ddpm_aug", "ddpm_up"]


def needed(original: pd.DataFrame, ratio: float = 1.0, column: str = "label") -> dict[str, int]:
    """Synthetic images to add per class of `column` (label or dx): up to ceil(ratio * the largest class's real fit
    count)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    counts = original.loc[original["split"] == "fit", column].value_counts()
    target = math.ceil(ratio * counts.max())
    return {name: max(0, target - int(counts.get(name, 0))) for name in TARGETS[column]}


def add_synthetic(original: pd.DataFrame, synthetic: pd.DataFrame, source: str, ratio: float = 1.0,
                  seed: int = 0, column: str = "label") -> pd.DataFrame:
    """The original rows plus a seeded choice of `source` rows from `synthetic`, in `fit`, balancing the classes
    of `column` (label, or dx for the seven-class experiment)."""
    if (original["source"] != "real").any():
        raise ValueError("the base manifest must hold real images only")
    picks = []
    for name, n in needed(original, ratio, column).items():
        pool = synthetic[(synthetic["source"] == source) & (synthetic.get(column) == name)]
        if n > len(pool):
            raise ValueError(f"{source}: {n} synthetic {name} images are needed and only {len(pool)} are listed; "
                             f"sample more (generators/sample.py --n {n} --classes {name})")
        picks.append(pool.sample(n=n, random_state=seed))
    added = pd.concat(picks, ignore_index=True).assign(split="fit", source=source)
    missing = [p for p in added["path"] if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: synthetic image listed but not found ({len(missing)} missing)")
    return pd.concat([original, added], ignore_index=True)


def build_configs(original_path: str | os.PathLike, synthetic_csvs: list[str | os.PathLike], out_dir: str | os.PathLike,
                  ratio: float = 1.0, seed: int = 0, names: list[str] | None = None) -> dict[str, Path]:
    """Write each configuration (of `names`, default all) whose synthetic source is listed in one of
    `synthetic_csvs` (and `original`)."""
    original_path, out_dir = Path(original_path).resolve(), Path(out_dir).resolve()
    original = read_manifest(original_path)
    synthetic = pd.concat([read_manifest(p).assign(listed_in=os.path.relpath(p, out_dir)) for p in synthetic_csvs],
                          ignore_index=True) if synthetic_csvs else pd.DataFrame(columns=["source", "label", "path"])
    written: dict[str, Path] = {}
    for name, source in CONFIGS.items():
        if names is not None and name not in names:
            continue
        path = out_dir / f"{name}.csv"
        info: dict[str, Any] = {"config": name, "base_manifest": original_path.name,
                                "base_manifest_sha256": file_sha256(original_path)}
        if source is None:
            if path == original_path:
                written[name] = path  # the base manifest is the `original` configuration as it is
                continue
            df = original
        elif source in set(synthetic["source"]):
            df = add_synthetic(original, synthetic, source, ratio, seed)
            lists = sorted(set(df.loc[df["source"] == source, "listed_in"]))
            info |= {"synthetic_source": source, "ratio": ratio, "seed": seed, "synthetic_lists": lists,
                     "added": {k: int(v) for k, v in df[df["source"] == source]["label"].value_counts().items()}}
            df = df.drop(columns="listed_in")
        else:
            continue
        write_manifest(df, path, info)
        written[name] = path
    return written
