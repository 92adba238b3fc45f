"""Shared test set-up: the real datasets in ../shared/data, and a tiny real manifest.

Tests marked `@pytest.mark.real_data` (or using the `real_data` fixture) are skipped with a reason when the
datasets are absent, so unit tests still run on a machine without them. With MELANOMA_REQUIRE_ALL_TESTS=1 (what
.ci/run sets when the data is there) a skipped test or test file fails instead: CI cannot pass by skipping.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Generator
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from data.manifest import read_manifest, write_manifest
from data.paths import MANIFESTS, SCRIPTS, SHARED_DATA
from data.paths import ROOT as ROOT  # re-exported: test files import it from here

# A fresh preprocessing/ONNX cache per test session (subprocesses inherit it), never the repository's .cache/:
# a stale export keyed by a seeded test checkpoint's hash would otherwise hide an export regression. It must be set
# before data.cache is first imported (it reads MELANOMA_CACHE then); no module imported above imports it.
MADE_CACHE = None if "MELANOMA_CACHE" in os.environ else tempfile.mkdtemp(prefix="melanoma-test-cache-")
if MADE_CACHE:
    os.environ["MELANOMA_CACHE"] = MADE_CACHE

DATA_ROOT = SHARED_DATA
ORIGINAL_MANIFEST = MANIFESTS / "original.csv"
HAVE_DATA = (DATA_ROOT / "ham10000" / "labels.csv").is_file() and (DATA_ROOT / "isic2017" / "labels.csv").is_file()
NO_DATA_REASON = f"real datasets not found at {DATA_ROOT} (see README.md, Data)"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module: scripts are run by path, not installed, so tests load them from their file."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_sources() -> list[Path]:
    """The repository's own Python files: not the virtual environment, caches, hidden folders or run outputs."""
    top = [p for p in ROOT.iterdir() if not p.name.startswith(".") and p.name not in ("runs", "node_modules")]
    return sorted(f for p in top for f in ([p] if p.suffix == ".py" else p.rglob("*.py") if p.is_dir() else []))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("real_data") and not HAVE_DATA:
        pytest.skip(NO_DATA_REASON)


def must_not_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under MELANOMA_REQUIRE_ALL_TESTS=1 a skipped test or test file fails instead, unless its file is listed in
    MELANOMA_ALLOWED_SKIPS (comma-separated file names; .ci/run lists test_browser.py when it has no chromium)."""
    allowed = {name for name in os.environ.get("MELANOMA_ALLOWED_SKIPS", "").split(",") if name}
    if (report.skipped and not hasattr(report, "wasxfail") and os.environ.get("MELANOMA_REQUIRE_ALL_TESTS") == "1"
            and Path(report.nodeid.split("::")[0]).name not in allowed):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but MELANOMA_REQUIRE_ALL_TESTS=1: {reason.removeprefix('Skipped: ')}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, pytest.TestReport,
                                                                                         pytest.TestReport]:
    report = yield
    must_not_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport,
                                                                         pytest.CollectReport]:
    report = yield  # a skip at module level (importorskip, allow_module_level=True) drops a whole file
    must_not_skip(report)
    return report


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder holding ham10000/ and isic2017/; skips the test when it is absent."""
    if not HAVE_DATA:
        pytest.skip(NO_DATA_REASON)
    return DATA_ROOT


@pytest.fixture(scope="session")
def original(real_data: Path) -> pd.DataFrame:
    """The committed original manifest (read once; do not modify it in a test)."""
    return read_manifest(ORIGINAL_MANIFEST)


@pytest.fixture
def tiny_manifest(original: pd.DataFrame, tmp_path: Path) -> Path:
    """A manifest of 24 real HAM10000 images (3 benign + 3 malignant from each of fit, val, calib and test), copied
    into tmp_path/images/<split>/<label>/ so a test may damage them; returns the manifest's path."""
    ham = original[(original["dataset"] == "ham10000") & original["split"].isin(["fit", "val", "calib", "test"])]
    rows = ham.groupby(["split", "label"]).sample(3, random_state=0).reset_index(drop=True)
    copies = []
    for row in rows.itertuples():
        target = tmp_path / "images" / row.split / row.label / Path(row.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(row.path, target)
        copies.append(str(target))
    path = tmp_path / "tiny.csv"
    write_manifest(rows.assign(path=copies), path)
    return path


@pytest.fixture
def tiny_df(tiny_manifest: Path) -> pd.DataFrame:
    return read_manifest(tiny_manifest)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small untrained classifier (MedViT, 64 px) and VAE (64 px, latent 32) saved through the checkpoint
    contract with thresholds set, so predictor and CLI tests do not depend on the shipped weights."""
    import torch

    from anomaly_detection.vae import ConvVAE
    from classifiers.models import create_model
    from data.checkpoint import save_checkpoint
    from data.transforms import preprocess_meta

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    classifier = create_model("medvit", img_size=64)
    save_checkpoint(folder / "classifier", classifier, {
        "kind": "classifier", "arch": "medvit", "arch_kwargs": {}, **preprocess_meta(64),
        "class_names": ["benign", "malignant"], "malignant_threshold": 0.5, "threshold_split": "val"})
    vae = ConvVAE(64, latent_dim=32, score_region="centre")  # the shipped region, so ONNX parity covers it
    save_checkpoint(folder / "vae", vae, {
        "kind": "vae", "arch": "convvae", "arch_kwargs": {"latent_dim": 32, "channels": [32, 64, 128, 256],
                                                          "score_region": "centre"},
        **preprocess_meta(64, normalization="unit"), "anomaly_threshold": 0.2,
        "calib_benign_score_quantiles": {"0.5": 0.1, "0.95": 0.2, "0.99": 0.25, "1.0": 0.3}})
    return folder / "classifier.safetensors", folder / "vae.safetensors"


@pytest.fixture(scope="session")
def real_images(real_data: Path) -> list[Path]:
    """Four real HAM10000 test images: two benign, two malignant."""
    base = real_data / "ham10000" / "test"
    return sorted((base / "benign").glob("*.jpg"))[:2] + sorted((base / "malignant").glob("*.jpg"))[:2]


def pytest_unconfigure(config: pytest.Config) -> None:
    if MADE_CACHE:  # only the folder this session made, never a user's cache or an outer session's
        shutil.rmtree(MADE_CACHE, ignore_errors=True)
