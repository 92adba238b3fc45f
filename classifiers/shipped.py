"""The classifiers shipped in checkpoints/ and the rule that picks the hybrid's default among them.

Rule: the default is the shipped benign/malignant classifier with the highest validation AUC in its sidecar
(`metrics.val.auc`, measured as the checkpoint is used: with flip TTA where the sidecar declares it; on mixed.csv, the
mean of the HAM10000 `val` and ISIC 2017 train-`val` AUCs, so neither source decides alone). No test number takes
part. Ties go to the name that sorts first. Users pick another one by name (`--classifier densenet121`) or by path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data.paths import CHECKPOINTS

# What scripts/ship_models.py adds to a run's sidecar when it ships it (its origin, and flip TTA with the values
# without it); a sidecar derived from a shipped one (a soup) drops them until it is shipped itself.
SHIPPING_FIELDS = ("shipped_from", "shipped_by", "tta", "without_tta")


def _shipped(folder: str | os.PathLike) -> dict[str, tuple[Path, dict]]:
    """name -> (weights path, sidecar) for every benign/malignant classifier sidecar in `folder` with its weights."""
    from data.manifest import LABELS  # here, not at import: the CLI resolves names before the heavy imports

    found = {}
    for sidecar in sorted(Path(folder).glob("*.json")):
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not ours to judge here: loading that checkpoint reports it
        weights = sidecar.with_suffix(".safetensors")
        if isinstance(meta, dict) and meta.get("kind") == "classifier" and \
                meta.get("class_names") == list(LABELS) and weights.is_file():
            found[sidecar.stem] = (weights, meta)
    return found


def shipped_classifiers(folder: str | os.PathLike = CHECKPOINTS) -> dict[str, Path]:
    """name -> weights path for every benign/malignant classifier shipped in `folder`."""
    return {name: weights for name, (weights, _) in _shipped(folder).items()}


def val_auc(meta: dict) -> float:
    value = (meta.get("metrics") or {}).get("val", {}).get("auc")
    return float(value) if isinstance(value, (int, float)) else float("-inf")


def default_classifier(folder: str | os.PathLike = CHECKPOINTS) -> Path:
    """The shipped classifier with the best recorded validation AUC; FileNotFoundError when none is shipped."""
    shipped = _shipped(folder)
    if not shipped:
        raise FileNotFoundError(f"{folder}: no classifier checkpoint shipped (see checkpoints/README.md)")
    return max(shipped.values(), key=lambda item: val_auc(item[1]))[0]  # sorted by name: ties go to the first


def resolve_classifier(value: str | None, folder: str | os.PathLike = CHECKPOINTS) -> Path:
    """None -> the default; a shipped name (e.g. 'densenet121') -> its file; anything else is taken as a path."""
    if value is None:
        return default_classifier(folder)
    shipped = shipped_classifiers(folder)
    return shipped.get(value, Path(value))
