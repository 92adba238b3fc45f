"""Device choice, CPU threads, seeding and error reporting: the same few lines every CLI needs, and the one
definition of the CLI options that carry them (`add_runtime_options`)."""
from __future__ import annotations

import argparse
import functools
import os
import random
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import numpy as np
import torch

P = ParamSpec("P")
R = TypeVar("R")


class UserError(Exception):
    """A problem the user can fix (a flag, a file, a device). Library code raises it; a CLI's `main`, wrapped in
    `cli_main`, reports it as one `error: ...` line and exit code 1 instead of a traceback."""


class DeviceError(UserError):
    """An explicitly requested device is not available."""


def cli_main(main: Callable[P, R]) -> Callable[P, R]:
    """Decorator of a CLI's `main`: a UserError raised below it exits with `error: <message>` (status 1)."""
    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            raise SystemExit(f"error: {exc}") from None
    return wrapper


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit unavailable device is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} requested but CUDA is not available (use --device auto or cpu)")
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


def add_runtime_options(parser: argparse.ArgumentParser, *, seed: int | None = None, progress: bool = False) -> None:
    """--device and --threads, plus --seed (with this default) and --no-progress when asked: every CLI's shared
    options, with one help text each."""
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: $OMP_NUM_THREADS, else every core; 1 per process when two "
                             "jobs share a small machine)")
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed,
                            help="random seed (initialisation, data order, augmentation, sampling, resampling)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def runtime_argv(args: argparse.Namespace) -> list[str]:
    """The shared options of `args` as argv for a child CLI (its --device, --threads and --no-progress)."""
    return (["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
            + (["--no-progress"] if getattr(args, "no_progress", False) else []))
