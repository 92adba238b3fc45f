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

from anomaly_detection import train_vae
from data.paths import MANIFESTS, RUNS
from data.runtime import cli_main
from studies.presets import PRESETS, flags


@cli_main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="budget (studies/presets.py)")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--out", default=str(RUNS / "vae"), help="run folder")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    a = p.parse_args(argv)
    return train_vae.main(["--manifest", a.manifest, "--out", a.out, "--seed", str(a.seed), "--device", a.device,
                           *flags(PRESETS[a.preset]["vae"]), "--resume",
                           *(["--threads", str(a.threads)] if a.threads else []),
                           *(["--no-progress"] if a.no_progress else [])])


if __name__ == "__main__":
    main()
