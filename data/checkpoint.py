"""The checkpoint contract: `name.safetensors` (weights) + `name.json` (everything needed to rebuild and use them).

The sidecar holds the architecture and its kwargs, input size, resize rule and normalization, class names,
thresholds, the training manifest's hash, metrics and package versions. `load_checkpoint` builds the model from the
sidecar through a caller-supplied builder and loads strictly: a file that is not safetensors, a missing sidecar, or
weights whose keys or shapes differ from the architecture fail with one clear message. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.atomic import atomic_write_text, tmp_path

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


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
    """Write weights (optionally cast to `dtype`, e.g. fp16 for shipping) and the sidecar, each atomically."""
    weights, sidecar = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
        .contiguous()
        .clone()
        .cpu()
        for k, v in model.state_dict().items()
    }
    tmp = tmp_path(weights)
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    full_meta = {
        "format_version": FORMAT_VERSION,
        **meta,
        "weights_dtype": str(dtype or "as trained"),
        "versions": package_versions(),
    }
    atomic_write_text(sidecar, json.dumps(full_meta, indent=2, default=str) + "\n")
    return weights


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    weights, sidecar = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: checkpoint not found")
    if not sidecar.is_file():
        raise CheckpointError(f"{weights}: its sidecar {sidecar.name} is missing (it says how to build the model)")
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{sidecar}: not valid JSON ({exc})") from None


def write_sidecar(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    atomic_write_text(_paths(path)[1], json.dumps(meta, indent=2, default=str) + "\n")


def load_checkpoint(
    path: str | os.PathLike, build: Callable[[dict[str, Any]], torch.nn.Module], kind: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model from the sidecar with `build(meta)`, load the weights strictly, return (model.eval(), meta)."""
    weights, _ = _paths(path)
    meta = read_sidecar(path)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{weights}: is a {meta.get('kind', 'unknown')!r} checkpoint, expected {kind!r}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a safetensors file ({exc})") from None
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
