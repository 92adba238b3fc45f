"""Step 2: train the generators and the upscaler on the real `fit` images, ship the small ones, compare the upscaler.

    # CPU (2 cores): DCGAN and upscaler within about an hour together; DDPM about 2 hours more (resumable)
    python scripts/02_train_generators.py --preset cpu
    python scripts/02_train_generators.py --preset cpu --models dcgan upscaler --threads 1   # leave a core free
    # latent diffusion: the autoencoder, then the UNet in its latent space (not part of the default set)
    python scripts/02_train_generators.py --preset cpu --models autoencoder ldm --threads 1
    # one GPU: the paper-scale preset
    python scripts/02_train_generators.py --preset full --device cuda
    # several GPUs: run one model per GPU, e.g. CUDA_VISIBLE_DEVICES=1 ... --models ddpm

Each model is trained by generators/train.py into runs/generators/<model>_<preset>_s<seed>/ (resumable with
--resume). The DCGAN generator and the upscaler, small enough for git, are also written as fp16 safetensors +
sidecar to --ship-dir; the DDPM UNet stays in its run folder. Afterwards the upscaler is compared with bicubic on
the real `val` split (results/generators/upscaler_vs_bicubic.csv).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from data.config import Runtime
from data.paths import CHECKPOINTS, MANIFESTS, RESULTS, RUNS
from data.runtime import add_runtime_options, cli_main, runtime_argv
from generators import train, upscaler
from generators.train import GeneratorConfig

SHIPPED = ("dcgan", "upscaler")
DEFAULT_MODELS = ("dcgan", "ddpm", "upscaler")  # what the five dataset configurations need


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=train.MODELS,
                   help="what to train, in order (ldm uses the autoencoder run of the same preset and seed)")
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "full"), help="see generators/train.py")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"),
                   help="manifest whose real fit rows train the models (its real val rows test the upscaler)")
    p.add_argument("--runs-dir", default=str(RUNS / "generators"),
                   help="run folders go here as <model>_<preset>_s<seed>")
    p.add_argument("--ship-dir", default=str(CHECKPOINTS / "generators"),
                   help=f"where the fp16 weights of {', '.join(SHIPPED)} go")
    p.add_argument("--results", default=str(RESULTS / "generators" / "upscaler_vs_bicubic.csv"),
                   help="upscaler vs bicubic table")
    p.add_argument("--resume", action="store_true", help="continue each model's run from its state.pt")
    add_runtime_options(p, seed=0)
    a = p.parse_args()
    rt = replace(Runtime.from_args(a), resume=a.resume)
    for model in a.models:
        autoencoder = Path(a.runs_dir) / f"autoencoder_{a.preset}_s{a.seed}" / "model.safetensors"
        train.train(GeneratorConfig(
            model=model, preset=a.preset, manifest=a.manifest, seed=a.seed,
            out=str(Path(a.runs_dir) / f"{model}_{a.preset}_s{a.seed}"),
            ship=str(Path(a.ship_dir) / model) if model in SHIPPED else None,
            autoencoder=str(autoencoder) if model == "ldm" else None), rt)
    if "upscaler" in a.models:
        upscaler.main(["--checkpoint", str(Path(a.ship_dir) / "upscaler.safetensors"), "--manifest", a.manifest,
                       "--out", a.results, *runtime_argv(a)])


if __name__ == "__main__":
    main()
