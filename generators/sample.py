r"""Sample N images per class from a generator checkpoint (DCGAN, DDPM or latent diffusion), optionally through the
learned upscaler.

    # CPU: DCGAN, thousands of images a minute; with the upscaler (64 -> 128 px) a few hundred a minute
    python generators/sample.py --checkpoint checkpoints/generators/dcgan.safetensors --n 500 \
        --out runs/generators/synthetic/dcgan
    python generators/sample.py --checkpoint checkpoints/generators/dcgan.safetensors --n 500 --classes malignant \
        --upscale checkpoints/generators/upscaler.safetensors --out runs/generators/synthetic/dcgan_up
    # DDPM: DDIM with 50 steps by default (2.4 images/s on two CPU threads with --bf16), or the full 1000-step chain
    python generators/sample.py --checkpoint checkpoints/generators/ddpm.safetensors --n 100 --steps 25
    python generators/sample.py --checkpoint checkpoints/generators/ddpm.safetensors --n 8 --sampler ddpm
    python generators/sample.py --checkpoint checkpoints/generators/ddpm.safetensors --n 100 \
        --upscale checkpoints/generators/upscaler.safetensors --upscale-from runs/generators/synthetic/ddpm
    # one GPU: add --device cuda --batch-size 256; several GPUs: one generator or class per GPU, each its own --out

Images go to <out>/<class>/<source>_<class>_<index>.png and are listed in <out>/samples.csv, a manifest (rows with
split=fit and source dcgan|ddpm|dcgan_up|ddpm_up) that scripts/03_build_configs.py reads; a generator conditioned on
the seven diagnoses (train.py --target dx) writes their dx and the benign/malignant label that follows from it.
Every batch draws its noise from a seed derived from (--seed, class, first index), so the same --seed and
--batch-size give the same images, and an interrupted run continues where it stopped: batches whose files all exist
are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data.atomic import atomic_write_text
from data.checkpoint import CheckpointError, load_checkpoint, read_sidecar
from data.images import load_rgb
from data.manifest import MALIGNANT_DX, file_sha256, write_manifest
from data.paths import RUNS
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from generators import dcgan, ddpm, from_signed, latent, save_grid, save_png
from generators.upscaler import Upscaler, load_upscaler, upscale

BUILDERS = {"dcgan": dcgan.build_generator, "ddpm": ddpm.build_unet, "ldm": latent.build_ldm}
DIFFUSION = ("ddpm", "ldm")  # kinds sampled by a denoising chain (--sampler, --steps)


def load_generator(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A DCGAN generator, DDPM UNet or latent diffusion model, whichever the sidecar says, loaded strictly."""
    kind = read_sidecar(path).get("kind")
    if kind not in BUILDERS:
        raise CheckpointError(f"{path}: is a {kind!r} checkpoint, expected one of {sorted(BUILDERS)}")
    model, meta = load_checkpoint(path, BUILDERS[kind], kind=kind)
    if kind == "ldm":
        ddpm.sampling_layout(model.unet)
    return (ddpm.sampling_layout(model) if kind == "ddpm" else model), meta


def generate(model: torch.nn.Module, meta: dict[str, Any], labels: torch.Tensor, gen: torch.Generator,
             sampler: str = "ddim", steps: int | None = None, autocast: bool = False) -> torch.Tensor:
    """uint8 NxCxHxW images of the given classes from a loaded generator."""
    if meta["kind"] == "dcgan":
        return from_signed(dcgan.generate(model, labels, gen)).cpu()
    if meta["kind"] == "ldm":
        return from_signed(latent.generate(model, labels, gen, sampler, steps, meta["noise_schedule"], autocast)).cpu()
    return from_signed(ddpm.generate(model, labels, gen, sampler, steps, meta.get("noise_schedule"), autocast)).cpu()


def provenance(checkpoint: str | Path, meta: dict[str, Any], sampler: str, steps: int | None,
               upscaler: str | Path | None) -> dict[str, Any]:
    """What made a sample set, for the JSON beside its samples.csv."""
    info: dict[str, Any] = {"generator": Path(checkpoint).name, "generator_sha256": file_sha256(checkpoint)}
    if meta["kind"] in DIFFUSION:
        info |= {"sampler": sampler, "steps": steps or (50 if sampler == "ddim" else meta["noise_schedule"]
                                                        ["num_train_timesteps"])}
    if upscaler:
        info |= {"upscaler": Path(upscaler).name, "upscaler_sha256": file_sha256(upscaler)}
    return info


def batch_seed(seed: int, label: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, label, start]).generate_state(1)[0])


def class_columns(meta: dict[str, Any], name: str) -> dict[str, str]:
    """The manifest columns of one generated class: its label, and for a dx-conditioned generator its dx too."""
    if meta.get("target", "label") == "label":
        return {"label": name}
    return {"label": "malignant" if name in MALIGNANT_DX else "benign", "dx": name}


def png_name(source: str, label: str, index: int) -> str:
    return f"{source}_{label}_{index:05d}.png"


def load_pngs(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(load_rgb(p))).permute(2, 0, 1) for p in paths])


class SampleFolderError(UserError, ValueError):
    """A sample folder that holds images made with other settings; the message names what differs."""


def claim_folder(out: Path, settings: dict[str, Any]) -> None:
    """Record what makes the samples in `out` (provenance.json). Images already there are kept, so a killed run
    resumes, but only if the same generator, seed and sampler made them: anything else is an error, never a mix."""
    path = out / "provenance.json"
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if differ:
            raise SampleFolderError(f"{out} holds samples made with other settings ({', '.join(differ)} differ); "
                                    f"remove it or sample into another folder")
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def sample_to_folder(model: torch.nn.Module, meta: dict[str, Any], counts: dict[str, int], out: Path,
                     upscaler: Upscaler | None = None, sampler: str = "ddim", steps: int | None = None,
                     batch_size: int = 64, seed: int = 0, autocast: bool = False, progress: bool = True,
                     info: dict[str, Any] | None = None, upscale_from: Path | None = None) -> pd.DataFrame:
    """Write counts[label] images per class as PNGs and <out>/samples.csv; return the manifest rows.

    With an upscaler and `upscale_from` (the folder of the same generator's plain samples, same seed), images that
    already exist there are upscaled from their PNGs instead of generated again: the same uint8 images, so the
    result is identical, and a DDPM is not run twice for the `_aug` and `_up` configurations."""
    source = meta["kind"] + ("_up" if upscaler is not None else "")
    claim_folder(out, {"source": source, "seed": seed, "sampler": sampler, "steps": steps, "autocast": autocast,
                       **(info or {})})
    rows = []
    for label, n in counts.items():
        c = list(meta["class_names"]).index(label)
        for start in tqdm(range(0, n, batch_size), desc=f"{source} {label}", disable=not progress, leave=False):
            index = range(start, min(n, start + batch_size))
            paths = [out / label / png_name(source, label, i) for i in index]
            if not all(p.exists() for p in paths):
                plain = [upscale_from / label / png_name(meta["kind"], label, i) for i in index] \
                    if upscaler is not None and upscale_from is not None else []
                if plain and all(p.exists() for p in plain):
                    images = load_pngs(plain)
                else:
                    gen = torch.Generator().manual_seed(batch_seed(seed, c, start))
                    images = generate(model, meta, torch.full((len(paths),), c), gen, sampler, steps, autocast)
                if upscaler is not None:
                    images = upscale(upscaler, images)
                for image, path in zip(images, paths):
                    save_png(image, path)
            rows += [{"path": str(p.resolve()), **class_columns(meta, label), "split": "fit", "source": source,
                      "lesion_id": p.stem, "dataset": "synthetic"} for p in paths]
    df = pd.DataFrame(rows)
    write_manifest(df, out / "samples.csv", {"seed": seed, **(info or {})})
    return df


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DCGAN or DDPM .safetensors (with its .json sidecar)")
    p.add_argument("--n", type=int, required=True, help="images per class")
    p.add_argument("--classes", nargs="+", default=None,
                   help="classes to sample (default: every class of the checkpoint, e.g. benign malignant)")
    p.add_argument("--sampler", default="ddim", choices=ddpm.SAMPLERS,
                   help="DDPM and LDM only: DDIM or the ancestral chain")
    p.add_argument("--steps", type=int, default=None,
                   help="DDPM and LDM only: denoising steps (default 50 for DDIM, all 1000 training steps for DDPM)")
    p.add_argument("--upscale", default=None, help="upscaler checkpoint: save upscaled images (source *_up)")
    p.add_argument("--upscale-from", default=None,
                   help="with --upscale: folder of this generator's plain samples (same --seed); images found there "
                        "are upscaled from their PNGs instead of generated again")
    p.add_argument("--out", default=None, help="folder (default runs/generators/synthetic/<source>)")
    p.add_argument("--batch-size", type=int, default=64, help="images per generator call")
    p.add_argument("--bf16", action="store_true",
                   help="DDPM and LDM only: bf16 autocast (faster on recent CPUs and GPUs)")
    p.add_argument("--grid", default=None, help="also write a grid PNG of the first 8 images of each class here")
    add_runtime_options(p, seed=0, progress=True)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    model, meta = load_generator(a.checkpoint)
    classes = a.classes or list(meta["class_names"])
    unknown = sorted(set(classes) - set(meta["class_names"]))
    if unknown:
        sys.exit(f"error: {a.checkpoint} generates {meta['class_names']}, not {unknown}")
    upscaler = None
    if a.upscale:
        upscaler, up_meta = load_upscaler(a.upscale)
        if up_meta["input_size"] != meta["image_size"]:
            sys.exit(f"error: {a.upscale} takes {up_meta['input_size']}-px images, the generator makes "
                     f"{meta['image_size']}-px ones")
        upscaler.to(device)
    info = provenance(a.checkpoint, meta, a.sampler, a.steps, a.upscale)
    source = meta["kind"] + ("_up" if upscaler is not None else "")
    out = Path(a.out or RUNS / "generators" / "synthetic" / source)
    df = sample_to_folder(model.to(device), meta, {c: a.n for c in classes}, out, upscaler, a.sampler, a.steps,
                          a.batch_size, a.seed, a.bf16, not a.no_progress, info,
                          Path(a.upscale_from) if a.upscale_from else None)
    if a.grid:
        first = df.groupby("label", sort=False).head(8)
        save_grid(load_pngs(list(first["path"])), a.grid, nrow=8)
    print(f"wrote {len(df)} images ({source}) and {out / 'samples.csv'}")
    return df


if __name__ == "__main__":
    main()
