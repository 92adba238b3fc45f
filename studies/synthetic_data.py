r"""Does synthetic data help a strong classifier? The dataset configurations (original, and the real `fit` split
balanced with DCGAN, upscaled DCGAN, latent diffusion, upscaled latent diffusion or pixel DDPM lesions) each train a
short fine-tune of the ImageNet EfficientNet-Lite0 with several seeds, read against the seed-noise floor
(studies/arms.py runs and reports it).

    # first the configurations (about 25 minutes on one thread: DCGAN, then 3,904 latent diffusion samples)
    python scripts/03_build_configs.py --generators dcgan ldm \
        --ldm runs/generators/ldm_perceptual_fixed_final.safetensors --out-dir runs/synthetic_data/manifests --threads 1
    # CPU: 3 to 5 minutes a run on one thread; resumable, so seeds can be added later. The reported run (24 runs):
    python studies/synthetic_data.py --arms original dcgan_aug dcgan_up ldm_aug ldm_up ldm_filtered \
        --seeds 0 1 2 3 --threads 1
    # one GPU, or several (each process its own --seeds, then once more with --report-only)
    python studies/synthetic_data.py --device cuda --seeds 0 1 2 3 4

Every run is the same short recipe (SHORT: ImageNet Lite0 at 160 px, Shades of Gray, class-balanced sampling, the
shipped default's augmentation and learning rates) on HAM10000 `fit` plus the arm's synthetic images; the manifest is
the only difference between arms. The synthetic images are in `fit` only, so the epoch and threshold are chosen on
the same real `val` in every arm, and HAM10000 `test` and ISIC 2017 `val` score each run once. Report:
results/synthetic_data/ (runs.csv, summary.csv, synthetic_data.png; see studies/arms.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data import paths
from data.configs import CONFIGS
from studies import arms
from studies.label_smoothing import SHORT

RECIPE = SHORT | {"balance": "class"}  # one source: class balancing (a no-op once synthetic images balance fit)
DEFAULT_ARMS = ["original", "dcgan_aug", "dcgan_up", "ldm_aug", "ldm_up"]


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifests", default=str(paths.RUNS / "synthetic_data" / "manifests"),
                   help="folder of the configurations' manifests (scripts/03_build_configs.py --out-dir)")


def config_arms(a: argparse.Namespace) -> arms.Arms:
    return {name: {"config": name, "manifest": str(Path(a.manifests) / f"{name}.csv")} for name in CONFIGS}


STUDY = arms.Study("synthetic_data", RECIPE, config_arms,
                   "build the configurations with scripts/03_build_configs.py (see --help)", add_options=add_options)


def main(argv: list[str] | None = None) -> None:
    arms.main(STUDY, __doc__, list(CONFIGS), argv, DEFAULT_ARMS)


if __name__ == "__main__":
    main()
