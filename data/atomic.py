"""Atomic file writes: write to a temporary file beside the target, then rename, so a killed run never leaves a
half-written CSV, JSON or checkpoint behind, and a failed write (disk full, Ctrl-C) leaves no temporary file either.

A target that exists but is not a regular file (`/dev/stdout`, a named pipe) is written in place: renaming over it
would replace the device or pipe instead of writing to it."""
from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def tmp_path(path: Path) -> Path:
    """A temporary name of this process beside `path` (two processes may write the same table, e.g. two grid runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(file)` into a temporary file beside `path`, then rename it over `path`; on any failure (an OSError,
    Ctrl-C) the temporary file is removed and the exception propagates, leaving a previous `path` untouched."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        write(path)
        return path
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write_bytes(data))


def atomic_write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    atomic_write(path, lambda f: df.to_csv(f, index=False))


def write_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """A list of dicts as CSV (per-epoch metrics, losses)."""
    def write(file: Path) -> None:
        with open(file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
