r"""Step 3: sample the synthetic lesions the configurations need and write the dataset manifests.

    # CPU: DCGAN configurations in a few minutes; DDPM at DDIM-50: about 40 minutes for ~3,900 images on 2 threads
    python scripts/03_build_configs.py --bf16 --threads 2
    python scripts/03_build_configs.py --generators dcgan --ratio 0.5 --out-dir runs/generators/manifests
    # latent diffusion (about 15 minutes for ~3,900 images on one thread; studies/synthetic_data.py uses these):
    python scripts/03_build_configs.py --generators dcgan ldm --ldm runs/generators/ldm_final.safetensors \
        --out-dir runs/synthetic_data/manifests
    # one GPU (DDPM sampling becomes minutes)
    python scripts/03_build_configs.py --device cuda --batch-size 256 \
        --ddpm runs/generators/ddpm_full_s0/model.safetensors
    # several GPUs: sample each generator on its own GPU with generators/sample.py, then run this (it reuses files)

For each generator whose checkpoint exists, as many images per class as balancing the real `fit` split needs
(configs.needed) are sampled into <synthetic-dir>/<source>/, once as they are (source dcgan|ddpm) and once through
the learned upscaler (dcgan_up|ddpm_up). Both use the same seed, so an `_up` image is the upscaled version of the
`_aug` image with the same name: the two configurations differ only by the upscaler. The `_up` images are made
from the `_aug` PNGs (the generator runs once), and files already there are reused. Then data/configs.py
writes original, dcgan_aug, dcgan_up, ddpm_aug and ddpm_up to --out-dir (those whose samples exist); synthetic rows
are in `fit` only. The latent diffusion model adds ldm_aug and ldm_up the same way.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data import configs
from data.manifest import read_manifest
from data.paths import CHECKPOINTS, MANIFESTS, RUNS
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from generators import ddpm, sample
from generators.upscaler import load_upscaler


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", default=str(MANIFESTS / "original.csv"), help="real manifest")
    p.add_argument("--generators", nargs="+", default=["dcgan", "ddpm", "ldm"], choices=("dcgan", "ddpm", "ldm"),
                   help="generators to sample (a missing checkpoint is skipped with a message)")
    p.add_argument("--dcgan", default=str(CHECKPOINTS / "generators" / "dcgan.safetensors"),
                   help="DCGAN checkpoint")
    p.add_argument("--ddpm", default=str(CHECKPOINTS / "generators" / "ddpm.safetensors"),
                   help="DDPM checkpoint (EMA weights)")
    p.add_argument("--ldm", default=str(CHECKPOINTS / "generators" / "ldm.safetensors"),
                   help="latent diffusion checkpoint (generators/train.py --model ldm; not shipped: pass the run's "
                        "model.safetensors)")
    p.add_argument("--upscaler", default=str(CHECKPOINTS / "generators" / "upscaler.safetensors"),
                   help="upscaler checkpoint for the *_up configurations")
    p.add_argument("--synthetic-dir", default=str(RUNS / "generators" / "synthetic"),
                   help="where the synthetic PNGs and their samples.csv go")
    p.add_argument("--out-dir", default=str(MANIFESTS), help="where the manifests go")
    p.add_argument("--ratio", type=float, default=1.0, help="minority:majority ratio of fit after adding (1: 1:1)")
    p.add_argument("--sampler", default="ddim", choices=ddpm.SAMPLERS, help="DDPM and LDM sampler")
    p.add_argument("--steps", type=int, default=None, help="DDPM and LDM steps (default 50 for DDIM, 1000 for DDPM)")
    p.add_argument("--bf16", action="store_true", help="DDPM and LDM: bf16 autocast while sampling")
    p.add_argument("--batch-size", type=int, default=64, help="images per generator call")
    add_runtime_options(p, seed=0, progress=True)
    a = p.parse_args()
    device = init_device(a.device, a.threads)
    counts = {k: n for k, n in configs.needed(read_manifest(a.original), a.ratio).items() if n > 0}
    print(f"synthetic images needed per class: {counts}")
    up = load_upscaler(a.upscaler)[0].to(device) if Path(a.upscaler).is_file() else None
    if up is None:
        print(f"no upscaler at {a.upscaler}: skipping the *_up configurations")
    lists = []
    for kind in a.generators:
        ckpt = Path(getattr(a, kind))
        if not ckpt.is_file():
            print(f"no {kind} checkpoint at {ckpt}: skipping {kind}_aug and {kind}_up")
            continue
        model, meta = sample.load_generator(ckpt)
        model.to(device)
        for upscaler in ([None, up] if up is not None else [None]):
            source = kind + ("_up" if upscaler is not None else "")
            out = Path(a.synthetic_dir) / source
            info = sample.provenance(ckpt, meta, a.sampler, a.steps, a.upscaler if upscaler is not None else None)
            try:
                sample.sample_to_folder(model, meta, counts, out, upscaler, a.sampler, a.steps, a.batch_size, a.seed,
                                        a.bf16, not a.no_progress, info=info, upscale_from=Path(a.synthetic_dir) / kind)
            except sample.SampleFolderError as exc:
                raise UserError(str(exc)) from None
            lists.append(out / "samples.csv")
    for name, path in configs.build_configs(a.original, lists, a.out_dir, a.ratio, a.seed).items():
        df = read_manifest(path)
        fit = df[df["split"] == "fit"].groupby(["label", "source"]).size().to_dict()
        print(f"{name:>10}: {path}  fit {fit}")


if __name__ == "__main__":
    main()
