"""The repository's folders, named once.

Every CLI's defaults (manifests to read, runs and results to write, shipped checkpoints) live under the repository
root, so they are spelled here and imported, never re-derived from `__file__`. The project is installed editable
(`pip install --no-deps -e .`, what `make` does), so ROOT is the checkout a user works in.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "data" / "manifests"    # one CSV per dataset configuration (original, mixed, ...)
RUNS = ROOT / "runs"                       # training runs and intermediate outputs (not committed)
RESULTS = ROOT / "results"                 # committed tables and figures of the reported runs
CHECKPOINTS = ROOT / "checkpoints"         # shipped weights + JSON sidecars
DEFAULT_VAE = CHECKPOINTS / "convvae.safetensors"  # the hybrid's shipped VAE (the classifier: classifiers/shipped.py)
DEFAULT_GATE = CHECKPOINTS / "gate.safetensors"    # the shipped out-of-distribution gate
SAMPLES = ROOT / "samples"                 # the eight real HAM10000 test images of the demo
SCRIPTS = ROOT / "scripts"                 # numbered pipeline steps, run as subprocesses by the presets
CACHE = ROOT / ".cache"                    # preprocessing and ONNX caches (MELANOMA_CACHE overrides it)
SHARED_DATA = ROOT.parent / "shared" / "data"  # where the datasets sit by default (ham10000/, isic2017/)


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository when it lies inside it (portable in committed records), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)
