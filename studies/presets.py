"""The pipeline's presets (one definition of each budget) and its eight steps, as commands run from the repository.

scripts/run_pipeline.py runs `steps(...)` in order; scripts/04_train_classifiers.py and 05_train_vae.py read their
budget from `PRESETS` by name, so a preset means the same thing whether a step is run alone or by the pipeline.

- smoke: a small real subset (SMOKE_SUBSET: 64 fit, 32 val, 32 calib, 48 HAM10000 test, 48 ISIC 2017 val images),
  32-px inputs, one epoch, 2 architectures x 2 configurations, the generators' own smoke preset, DDIM-5 sampling,
  200 bootstrap resamples in the report. About 3 minutes on 2 busy CPU cores; the test suite runs it.
- cpu: the 30-model grid (6 architectures x 5 configurations, 128 px, 3 epochs each, no early stopping, so every
  model gets the same budget). Step 4 is estimated at about 6 hours on 2 idle cores from NOTES.md (DenseNet-121,
  66 images/s) and the relative speeds in results/benchmarks/training_throughput.csv; not measured end to end.
  Steps 2 and 3 (generators, DDPM sampling) take several hours more (see their docstrings).
- full: paper scale on one GPU (224 px, 30 epochs); not run end to end. Its training steps come to at most about
  80 minutes on one H100 (results/benchmarks/training_throughput_h100_224.md, README "On one GPU").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from data.configs import PIPELINE
from data.paths import SCRIPTS
from studies import grid

# Training order: the grid's six (the registry's pretrained efficientnet_lite* are trained on their own, see README).
ALL_ARCHS = ["densenet121", "resnet50", "vit", "swin", "medvit", "biovit"]
ALL_CONFIGS = PIPELINE
# (dataset, split, official_split) -> images kept by the smoke preset; rows of other groups are dropped.
SMOKE_SUBSET = {("ham10000", "fit", "train"): 64, ("ham10000", "val", "train"): 32,
                ("ham10000", "calib", "train"): 32, ("ham10000", "test", "test"): 48,
                ("isic2017", "external", "val"): 48}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "subset": SMOKE_SUBSET,
        "ddpm_steps": 5,
        "classifier": {"archs": ["densenet121", "medvit"], "configs": ["original", "dcgan_aug"],
                       "budget": {"img_size": 32, "epochs": 1, "patience": 1, "batch_size": 8, "limit": 64}},
        "vae": {"img_size": 32, "latent_dim": 16, "epochs": 1, "batch_size": 8, "limit": 64},
        "report": {"gradcam_per_group": 2, "n_boot": 200}},
    "cpu": {
        "subset": None,
        "ddpm_steps": 50,
        "classifier": {"archs": ALL_ARCHS, "configs": ALL_CONFIGS,
                       "budget": {"img_size": 128, "epochs": 3, "patience": 3, "batch_size": 32}},
        "vae": {"img_size": 128, "latent_dim": 128, "epochs": 6, "batch_size": 32},
        "report": {"gradcam_per_group": 6, "n_boot": 1000}},
    "full": {
        "subset": None,
        "ddpm_steps": 50,
        "classifier": {"archs": ALL_ARCHS, "configs": ALL_CONFIGS,
                       "budget": {"img_size": 224, "epochs": 30, "patience": 8, "batch_size": 64}},
        "vae": {"img_size": 128, "latent_dim": 128, "epochs": 30, "batch_size": 128},
        "report": {"gradcam_per_group": 8, "n_boot": 1000}},
}


def flags(options: dict[str, Any]) -> list[str]:
    """{"img_size": 32} -> ["--img-size", "32"]."""
    return [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def subset_manifest(src: str | os.PathLike, dst: str | os.PathLike, sizes: dict[tuple[str, str, str], int],
                    seed: int = 0) -> str:
    """Write a seeded, class-stratified subset of a manifest: sizes[(dataset, split, official_split)] rows of each
    listed group, none of the others. Returns the new manifest's sha256."""
    from data.manifest import read_manifest, stratified_subset, write_manifest

    df = read_manifest(src)
    keys = ["dataset", "split", "official_split"]
    parts = [stratified_subset(part, sizes[key], seed) for key, part in df.groupby(keys) if key in sizes]
    if not parts:
        raise ValueError(f"{src}: none of the groups {sorted(sizes)} is present")
    info = {"subset_of": Path(src).name, "seed": seed, "sizes": {"/".join(k): n for k, n in sizes.items()}}
    return write_manifest(pd.concat(parts, ignore_index=True), dst, info)


@dataclass
class Step:
    """One pipeline step: actions (argv lists run as `python <argv>` from the repository, or Python calls),
    the files whose content decides whether it must run again, and the files it must leave behind."""
    number: int
    name: str
    actions: list[list[str] | partial]
    inputs: list[Path]
    outputs: list[Path]
    device: bool = True  # its scripts take --device (appended at run time, not part of the step's identity)


@dataclass
class Layout:
    """Where everything goes under a work directory (the repository itself by default)."""
    work: Path

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self.manifests = self.work / "data" / "manifests"
        self.runs = self.work / "runs"
        self.results = self.work / "results"
        self.ship = self.work / "checkpoints" / "generators"
        self.stamps = self.runs / "pipeline"

    @property
    def original(self) -> Path:
        return self.manifests / "original.csv"

    def classifier(self, arch: str, config: str, seed: int) -> Path:
        return self.runs / "classifiers" / grid.run_name(arch, config, seed) / "best.safetensors"

    @property
    def vae(self) -> Path:
        return self.runs / "vae" / "best.safetensors"

    @property
    def grid_evaluation(self) -> Path:
        return self.results / "models_evaluation" / "grid_evaluation.csv"


def script(name: str) -> str:
    return str(SCRIPTS / name)


def steps(preset: str, work_dir: str | os.PathLike, data_root: str | os.PathLike, seed: int = 0) -> list[Step]:
    """The eight steps of `preset` with every path under `work_dir`."""
    p, at = PRESETS[preset], Layout(Path(work_dir))
    cls = p["classifier"]
    data = Path(data_root).resolve()
    labels = [data / "ham10000" / "labels.csv", data / "isic2017" / "labels.csv"]
    prepare: list[list[str] | partial]
    if p["subset"]:
        full = at.manifests / "full.csv"
        prepare = [[script("01_prepare_data.py"), "--data-root", str(data), "--out", str(full), "--seed", str(seed)],
                   partial(subset_manifest, full, at.original, p["subset"], seed)]
    else:
        prepare = [[script("01_prepare_data.py"), "--data-root", str(data), "--out", str(at.original),
                    "--seed", str(seed)]]
    gen_runs = at.runs / "generators"
    ddpm = gen_runs / f"ddpm_{preset}_s{seed}" / "model.safetensors"
    generators = [at.ship / "dcgan.safetensors", at.ship / "upscaler.safetensors", ddpm]
    configs = [at.manifests / f"{c}.csv" for c in cls["configs"]]
    hybrid_classifier = at.classifier(cls["archs"][0], "original", seed)
    vae_sidecar = at.vae.with_suffix(".json")
    return [
        Step(1, "prepare_data", prepare, labels, [at.original], device=False),
        Step(2, "train_generators",
             [[script("02_train_generators.py"), "--preset", preset, "--manifest", str(at.original),
               "--runs-dir", str(gen_runs), "--ship-dir", str(at.ship),
               "--results", str(at.results / "generators" / "upscaler_vs_bicubic.csv"), "--seed", str(seed),
               "--resume"]],
             [at.original], generators),
        Step(3, "build_configs",
             [[script("03_build_configs.py"), "--original", str(at.original), "--dcgan", str(generators[0]),
               "--upscaler", str(generators[1]), "--ddpm", str(ddpm), "--steps", str(p["ddpm_steps"]),
               "--synthetic-dir", str(gen_runs / "synthetic"), "--out-dir", str(at.manifests), "--seed", str(seed)]],
             [at.original, *generators], configs),
        Step(4, "train_classifiers",
             [[script("04_train_classifiers.py"), "--preset", preset, "--manifest-dir", str(at.manifests),
               "--runs-dir", str(at.runs / "classifiers"), "--results", str(at.grid_evaluation), "--seed", str(seed),
               "--no-progress"]],
             configs, [at.grid_evaluation, hybrid_classifier]),
        Step(5, "train_vae",
             [[script("05_train_vae.py"), "--preset", preset, "--manifest", str(at.original),
               "--out", str(at.vae.parent), "--seed", str(seed), "--no-progress"]],
             [at.original], [at.vae]),
        # The sidecar is an input of steps 6 and 7 because calibration writes its threshold there: a retrained VAE
        # (new sidecar, no threshold) makes both run again.
        Step(6, "calibrate",
             [[script("06_calibrate.py"), "--vae", str(at.vae), "--manifest", str(at.original),
               "--out", str(at.results / "vae_calibration")]],
             [at.original, at.vae, vae_sidecar], [at.results / "vae_calibration" / "calibration.json"]),
        Step(7, "evaluate_hybrid",
             [[script("07_evaluate_hybrid.py"), "--classifier", str(hybrid_classifier), "--vae", str(at.vae),
               "--manifest", str(at.original), "--out", str(at.results / "hybrid")]],
             [at.original, hybrid_classifier, hybrid_classifier.with_suffix(".json"), at.vae, vae_sidecar],
             [at.results / "hybrid" / "comparison_metrics.csv"]),
        Step(8, "report",
             [[script("08_report.py"), "--results-dir", str(at.results), "--runs-dir", str(at.runs / "classifiers"),
               *flags(p["report"])]],
             [at.grid_evaluation],
             [at.results / "models_evaluation" / "grid_metrics.csv",
              at.results / "models_evaluation" / "grid_auc_heatmap.png"]),
    ]


def describe() -> str:
    """The presets' budgets in words, for --help."""
    lines = []
    for name, p in PRESETS.items():
        c = p["classifier"]
        subset = ", ".join(f"{'/'.join(k)} {n}" for k, n in p["subset"].items()) if p["subset"] else "all images"
        lines += [f"{name}:",
                  f"  data: {subset}",
                  f"  generators (DCGAN, DDPM, upscaler): generators/train.py preset {name!r}; "
                  f"DDPM sampled with DDIM-{p['ddpm_steps']}",
                  f"  classifiers: {len(c['archs'])} architectures ({', '.join(c['archs'])}) x {len(c['configs'])} "
                  f"configurations ({', '.join(c['configs'])}); each " + " ".join(flags(c["budget"])),
                  "  VAE: " + " ".join(flags(p["vae"])),
                  "  report: " + " ".join(flags(p["report"]))]
    return "\n".join(lines)
