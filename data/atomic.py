"""Atomic file writes: write to a temporary file beside the target, then rename, so a killed run never leaves a
half-written CSV, JSON or checkpoint behind."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pandas as pd


def tmp_path(path: Path) -> Path:
    """A temporary name of this process beside `path` (two processes may write the same table, e.g. two grid runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """A list of dicts as CSV (per-epoch metrics, losses)."""
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
