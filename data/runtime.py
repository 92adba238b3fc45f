"""Device choice, CPU threads and seeding: the same few lines every CLI needs."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit unavailable device is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} requested but CUDA is not available (use --device auto or cpu)")
    return torch.device(name)


def setup_cpu(threads: int | None = None) -> None:
    """Use `threads` intra-op threads, else $OMP_NUM_THREADS, else every core. On a small machine shared with
    another busy process, 1 thread each is much faster than oversubscribing (threads spin-wait on each other)."""
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0)))


def init_device(name: str = "auto", threads: int | None = None) -> torch.device:
    """pick_device, and on CPU set the thread count (setup_cpu): what every CLI does first."""
    device = pick_device(name)
    if device.type == "cpu":
        setup_cpu(threads)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
