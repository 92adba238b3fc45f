"""The checkpoint contract: `name.safetensors` (weights) + `name.json` (everything needed to rebuild and use them).

The sidecar holds the architecture and its kwargs, input size, resize rule and normalization, class names,
thresholds, the training manifest's hash, metrics, package versions and the sha256 of the weights file. Every
sidecar that is read is checked against one schema (`validate_sidecar`): the fields a model needs must be there, and
every known field must have its type and range, so a damaged or hand-edited sidecar fails with one message naming
the file and the field instead of a traceback deep inside a model.

`load_checkpoint` then verifies the files (`verify_checkpoint`), builds the model from the sidecar through a
caller-supplied builder, refuses weights holding NaN or infinite values, and loads strictly: a file that is not
safetensors, a missing sidecar, or weights whose keys or shapes differ from the architecture fail with one clear
message. Nothing is unpickled.

Integrity rule: every hash recorded for a checkpoint must match. Recorded hashes are (1) the lines of a
`SHA256SUMS` file in the checkpoint's folder that name the weights or the sidecar (what scripts/ship_models.py
writes for checkpoints/), and (2) the sidecar's `weights_sha256` (what `save_checkpoint` writes, so a user's own
run in runs/ is verified too). A checkpoint with neither (written before the field existed) still loads, and
`verify_checkpoint` says "unverified". The project's own writers keep a listing true: `save_checkpoint` and
`write_sidecar` update the lines of a folder's SHA256SUMS that name the files they replace (a re-ship, a
recalibration), so only a change made outside them (damage, a partial download, a hand edit) fails the check.
Hashing is cached per file state, so a 30 MB checkpoint is hashed once.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.atomic import atomic_write, atomic_write_text
from data.images import MIN_SIDE, RESIZE_RULES
from data.manifest import file_sha256
from data.transforms import COLOR_CONSTANCY

FORMAT_VERSION = 1
SUMS_FILE = "SHA256SUMS"
MAX_INPUT_SIZE = 4096
PREPROCESSED_KINDS = ("classifier", "vae")  # the kinds whose inputs are built from the sidecar (Preprocess)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


# ---------------------------------------------------------------------------------------------------------------
# The sidecar schema

def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _triple(v: Any, positive: bool) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_real(x) and (x > 0 or not positive) for x in v)


def _normalization(v: Any) -> bool:
    return v == "unit" or (isinstance(v, dict) and set(v) == {"mean", "std"} and _triple(v["mean"], False)
                           and _triple(v["std"], True))


def _color_constancy(v: Any) -> bool:
    return (isinstance(v, dict) and v.get("method") in COLOR_CONSTANCY[1:] and _int(v.get("p")) and v["p"] >= 1
            and set(v) == {"method", "p"})


# field -> (check, what it must be). A field is checked whenever it is present; REQUIRED says which must be.
SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format_version": (lambda v: _int(v) and 1 <= v <= FORMAT_VERSION, f"an integer from 1 to {FORMAT_VERSION}"),
    "kind": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "arch": (lambda v: isinstance(v, str) and bool(v), "a non-empty string (an architecture name)"),
    "arch_kwargs": (lambda v: isinstance(v, dict), "an object of keyword arguments"),
    "class_names": (lambda v: isinstance(v, list) and len(v) >= 2 and len(set(map(str, v))) == len(v)
                    and all(isinstance(c, str) and c for c in v), "a list of at least two distinct names"),
    "malignant_threshold": (lambda v: v is None or (_real(v) and 0 <= v <= 1), "null or a number from 0 to 1"),
    "anomaly_threshold": (lambda v: v is None or (_real(v) and v >= 0), "null or a finite number >= 0"),
    "calib_benign_score_quantiles": (lambda v: isinstance(v, dict) and all(_real(x) for x in v.values()),
                                     "an object of finite numbers"),
    "weights_sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
                       "64 lowercase hex digits"),
}
PREPROCESS_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "input_size": (lambda v: _int(v) and MIN_SIDE <= v <= MAX_INPUT_SIZE,
                   f"an integer from {MIN_SIDE} to {MAX_INPUT_SIZE} (pixels)"),
    "resize": (lambda v: v in RESIZE_RULES, f"one of {list(RESIZE_RULES)}"),
    "normalization": (_normalization, '"unit" or {"mean": [3 numbers], "std": [3 positive numbers]}'),
    "color_constancy": (_color_constancy, f'{{"method": one of {list(COLOR_CONSTANCY[1:])}, "p": integer >= 1}}'),
}
REQUIRED = {"classifier": ("arch", "class_names", "input_size", "resize", "normalization"),
            "vae": ("arch", "arch_kwargs", "input_size", "resize", "normalization")}


def validate_sidecar(meta: Any, source: str | os.PathLike) -> dict[str, Any]:
    """`meta` if it follows the schema, else CheckpointError naming `source` and the first bad field. Architecture
    names are not listed here (data/ does not import the model registries): the builder refuses an unknown one."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: must be a JSON object, not a {type(meta).__name__}")
    kind = meta.get("kind")
    schema = {**SCHEMA, **(PREPROCESS_SCHEMA if kind in PREPROCESSED_KINDS else {})}
    for key in REQUIRED.get(kind, ()):
        if key not in meta:
            raise CheckpointError(f"{source}: a {kind} sidecar needs {key!r} ({schema[key][1]})")
    for key, (check, expected) in schema.items():
        if key in meta and not check(meta[key]):
            shown = json.dumps(meta[key])
            raise CheckpointError(f"{source}: {key!r} must be {expected}, not {shown[:80]}")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Integrity

@functools.lru_cache(maxsize=64)
def _digest(path: str, state: tuple[int, ...]) -> str:
    return file_sha256(path)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed once per state (inode, size, modification and change times: an atomic rewrite is a
    new inode, so even a coarse clock cannot serve a stale digest)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))


def read_sums(path: str | os.PathLike) -> dict[str, str]:
    """A `sha256sum` listing ('<hex>  <name>' per line) -> {name: hex}."""
    sums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip())
        if not match:
            raise CheckpointError(f"{path}: line {number} is not '<sha256>  <file name>'")
        sums[match[2]] = match[1].lower()
    return sums


def _relist(*files: Path) -> None:
    """Update the lines of the folder's SHA256SUMS that name `files` (just rewritten by this module)."""
    sums = files[0].parent / SUMS_FILE
    if not sums.is_file():
        return
    listed = read_sums(sums)
    if not {f.name for f in files} & set(listed):
        return
    listed.update({f.name: file_digest(f) for f in files if f.name in listed})
    atomic_write_text(sums, "".join(f"{digest}  {name}\n" for name, digest in listed.items()))


def _verify(weights: Path, sidecar: Path, meta: dict[str, Any]) -> str:
    recorded: list[tuple[Path, str, str]] = []
    sums = weights.parent / SUMS_FILE
    if sums.is_file():
        listed = read_sums(sums)
        recorded += [(f, listed[f.name], str(sums)) for f in (weights, sidecar) if f.name in listed]
    if meta.get("weights_sha256"):
        recorded.append((weights, meta["weights_sha256"], f"the weights_sha256 of {sidecar.name}"))
    for file, expected, source in recorded:
        if file_digest(file) != expected:
            raise CheckpointError(f"{file}: its sha256 does not match {source}: the file is damaged or was changed "
                                  "(download or train it again)")
    sources = sorted({Path(source).name if source.endswith(SUMS_FILE) else "sidecar weights_sha256"
                      for _, _, source in recorded})
    return " and ".join(sources) if sources else "unverified"


def verify_checkpoint(path: str | os.PathLike) -> str:
    """Check every recorded hash of a checkpoint (module docstring); return what verified it ('SHA256SUMS',
    'sidecar weights_sha256', both, or 'unverified'), or raise CheckpointError on a mismatch."""
    weights, sidecar = _paths(path)
    return _verify(weights, sidecar, read_sidecar(path))


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading

def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "diffusers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any], dtype: torch.dtype | None = None
) -> Path:
    """Write weights (optionally cast to `dtype`, e.g. fp16 for shipping) and the sidecar, each atomically; the
    sidecar records the weights file's sha256. `meta` may be a loaded checkpoint's sidecar: the fields that describe
    the file itself (format, dtype, package versions, sha256) are always this save's, never carried over."""
    weights, sidecar = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
        .contiguous()
        .clone()
        .cpu()
        for k, v in model.state_dict().items()
    }
    atomic_write(weights, lambda f: save_file(state, str(f), metadata={"format": "pt"}))
    own = {"format_version": FORMAT_VERSION, "weights_dtype": str(dtype or "as trained"),
           "versions": package_versions(), "weights_sha256": file_digest(weights)}
    full_meta = {"format_version": FORMAT_VERSION, **meta, **own}
    atomic_write_text(sidecar, json.dumps(full_meta, indent=2, default=str) + "\n")
    _relist(weights, sidecar)
    return weights


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a checkpoint (either file's name finds the pair), checked against the schema."""
    weights, sidecar = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: checkpoint not found" + (" (it is a folder)" if weights.is_dir() else ""))
    if not sidecar.is_file():
        raise CheckpointError(f"{weights}: its sidecar {sidecar.name} is missing (it says how to build the model)")
    try:
        meta = json.loads(sidecar.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{sidecar}: cannot be read ({exc.strerror})") from None
    return validate_sidecar(meta, sidecar)


def write_sidecar(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    sidecar = _paths(path)[1]
    atomic_write_text(sidecar, json.dumps(meta, indent=2, default=str) + "\n")
    _relist(sidecar)


def load_checkpoint(
    path: str | os.PathLike, build: Callable[[dict[str, Any]], torch.nn.Module], kind: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model from the sidecar with `build(meta)`, load the weights strictly, return (model.eval(), meta)."""
    weights, sidecar = _paths(path)
    meta = read_sidecar(path)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{weights}: is a {meta.get('kind', 'unknown')!r} checkpoint, expected {kind!r}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a safetensors file ({exc})") from None
    _verify(weights, sidecar, meta)
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"{weights}: {len(broken)} tensor(s) hold NaN or infinite values ({broken[0]}"
                              f"{', ...' if len(broken) > 1 else ''}): the weights are damaged")
    try:
        model = build(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights}: its sidecar cannot build a model ({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"{weights}: weights do not match architecture {meta.get('arch')!r}: {detail[:400]}"
        ) from None
    return model.float().eval(), meta
