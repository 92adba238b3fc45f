"""Step 5: train the ConvVAE on the benign `fit` images with the preset's budget (resumable).

    # CPU (2 cores): about 2.6 minutes an epoch at 128 px, 6 epochs
    python scripts/05_train_vae.py --preset cpu
    # one GPU
    python scripts/05_train_vae.py --preset full --device cuda
    # several GPUs: the VAE is small; train it on one and give the others to step 4's grid

A thin layer over anomaly_detection/train_vae.py: the budget (input size, latent size, epochs, batch, subset)
comes from studies/presets.py, and a killed run continues from its last epoch (--resume is always on). The best
epoch by val anomaly AUC is <out>/best.safetensors + best.json; step 6 adds the calibrated threshold.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from anomaly_detection.train_vae import VAEConfig, train
from data.config import Runtime
from data.paths import MANIFESTS, RUNS
from data.runtime import add_runtime_options, cli_main
from studies.presets import PRESETS


@cli_main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="budget (studies/presets.py)")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--out", default=str(RUNS / "vae"), help="run folder")
    add_runtime_options(p, seed=0, progress=True)
    a = p.parse_args(argv)
    cfg = VAEConfig(manifest=a.manifest, out=a.out, seed=a.seed, **PRESETS[a.preset]["vae"])
    return train(cfg, replace(Runtime.from_args(a), resume=True))


if __name__ == "__main__":
    main()
