r"""Train a generator (class-conditional DCGAN, DDPM or latent diffusion with its autoencoder) or the upscaler on the
real `fit` images of a manifest.

    # CPU, all resumable. Measured: DCGAN about 75 images/s on one thread (16 epochs in 33 minutes), upscaler 6
    # epochs in 4 minutes, DDPM 23.7 images/s on two threads alone (its 10 epochs in 45 minutes; 5 images/s when
    # another job shares the two cores)
    python generators/train.py --model dcgan --preset cpu --ship checkpoints/generators/dcgan
    python generators/train.py --model upscaler --preset cpu --ship checkpoints/generators/upscaler
    python generators/train.py --model ddpm --preset cpu --threads 2 --resume --ship checkpoints/generators/ddpm
    python generators/train.py --model dcgan --preset cpu --target dx    # conditioned on the seven diagnoses
    # latent diffusion: the autoencoder (L1 + perceptual; 22 minutes on two threads), then the UNet in its latent
    # space (20,000 steps in about 100 minutes on one thread)
    python generators/train.py --model autoencoder --preset cpu --manifest data/manifests/mixed.csv --threads 2
    python generators/train.py --model ldm --preset cpu --epochs 100 --threads 1 \
        --autoencoder runs/generators/autoencoder_cpu_s0/model.safetensors --ship runs/generators/ldm_final
    # one GPU: the paper-scale preset
    python generators/train.py --model ddpm --preset full --device cuda
    # several GPUs: one generator per GPU side by side (each run is single-device)
    CUDA_VISIBLE_DEVICES=0 python generators/train.py --model ddpm --preset full --device cuda &
    CUDA_VISIBLE_DEVICES=1 python generators/train.py --model dcgan --preset full --device cuda &

Only rows with split=fit and source=real are read (through the preprocessing cache; 64 px for the generators,
64 * scale px for the upscaler's targets). Each epoch's randomness comes from --seed and the epoch number, and the
whole training state (weights, EMA, optimizers, schedules, step, loss history) is written atomically to
`<out>/state.pt` after every epoch, so a killed run continues with --resume and ends as an uninterrupted one would.
Outputs in <out> (default runs/generators/<model>_<preset>_s<seed>): losses.csv + losses.png (means over
--log-every steps), epochs.csv, samples/epoch_NNN.png every --sample-every epochs, model.safetensors + model.json
(the generator or, for DDPM, its EMA weights), and with --ship an fp16 copy for checkpoints/.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from data.atomic import write_rows
from data.cache import CachedImages
from data.checkpoint import load_checkpoint, save_checkpoint
from data.config import Runtime, check_types, option, parse_config, to_json, write_config
from data.manifest import TARGETS, file_sha256, read_manifest, stratified_subset
from data.paths import MANIFESTS, RUNS
from data.runtime import UserError, cli_main, init_device, seed_everything
from data.training import load_state, save_state
from data.transforms import augment
from evaluation import plots
from generators import from_signed, from_unit, save_grid
from generators.dcgan import DCGANTrainer
from generators.ddpm import DDPMTrainer
from generators.latent import VIEWS, AutoencoderTrainer, LatentDiffusionTrainer, build_autoencoder, encode_views
from generators.upscaler import UpscalerTrainer, bicubic, compare_with_bicubic, psnr, upscale

MODELS = ("dcgan", "ddpm", "upscaler", "autoencoder", "ldm")
NEEDS_VAL = ("upscaler", "autoencoder")  # scored on real val images every epoch
# Per model and preset: training length, batch, learning rate, architecture. Flags given explicitly win.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dcgan": {
        "smoke": {"epochs": 1, "batch_size": 4, "lr": 2e-4, "limit": 16, "sample_every": 1, "arch": {"width": 8}},
        "cpu": {"epochs": 25, "batch_size": 64, "lr": 2e-4, "sample_every": 5, "bf16": True, "arch": {"width": 64}},
        "full": {"epochs": 300, "batch_size": 128, "lr": 2e-4, "sample_every": 20, "bf16": True,
                 "arch": {"width": 64}}},
    "ddpm": {
        "smoke": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "limit": 16, "sample_every": 1, "preview_steps": 2,
                  "arch": {"channels": [8, 16], "attention": [False, True], "norm_groups": 4}},
        "cpu": {"epochs": 10, "batch_size": 32, "lr": 5e-4, "sample_every": 2, "bf16": True,
                "arch": {"channels": [32, 64, 128, 256], "attention": [False, False, True, False]}},
        "full": {"epochs": 500, "batch_size": 128, "lr": 2e-4, "sample_every": 25, "bf16": True,
                 "arch": {"channels": [64, 128, 256, 512], "attention": [False, False, True, True],
                          "layers_per_block": 2, "norm_groups": 32}}},
    "upscaler": {
        "smoke": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "limit": 16, "sample_every": 1, "patch": 32,
                  "arch": {"channels": 8, "blocks": 1}},
        "cpu": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "sample_every": 2, "patch": 64,
                "arch": {"channels": 32, "blocks": 4}},
        "full": {"epochs": 100, "batch_size": 64, "lr": 5e-4, "sample_every": 10, "patch": 96,
                 "arch": {"channels": 64, "blocks": 16}}},
    "autoencoder": {
        "smoke": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "limit": 16, "sample_every": 1,
                  "arch": {"channels": [8, 16], "norm_groups": 4}},
        "cpu": {"epochs": 5, "batch_size": 32, "lr": 5e-4, "sample_every": 1, "bf16": True, "arch": {}},
        "full": {"epochs": 50, "batch_size": 64, "lr": 2e-4, "sample_every": 5, "bf16": True,
                 "arch": {"channels": [64, 128, 256], "layers_per_block": 2, "norm_groups": 32}}},
    "ldm": {
        "smoke": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "limit": 16, "sample_every": 1, "preview_steps": 2,
                  "arch": {"channels": [8, 16], "attention": [False, True], "norm_groups": 4}},
        "cpu": {"epochs": 60, "batch_size": 32, "lr": 3e-4, "sample_every": 10, "bf16": True,
                "arch": {"channels": [48, 96, 192], "attention": [False, False, True], "norm_groups": 16}},
        "full": {"epochs": 400, "batch_size": 128, "lr": 2e-4, "sample_every": 25, "bf16": True,
                 "arch": {"channels": [128, 256, 512], "attention": [False, True, True], "layers_per_block": 2,
                          "norm_groups": 32}}},
}


@dataclass
class GeneratorConfig:
    """Everything that defines a generator run; `generators/train.py --help` lists the same fields as flags. Fields
    left None take the preset's value (PRESETS[model][preset]), as do arch, patch and preview_steps."""

    model: str | None = option(None, "what to train", choices=MODELS, required=True)
    preset: str = option("cpu", "smoke: seconds (tests); cpu: a 2-core machine, minutes to hours; full: one GPU",
                         choices=("smoke", "cpu", "full"))
    manifest: str = option(str(MANIFESTS / "original.csv"), "manifest whose real fit rows are the training images")
    target: str = option("label", "generators: the classes they are conditioned on, label (benign/malignant) or dx "
                         "(the seven HAM10000 diagnoses)", choices=sorted(TARGETS))
    autoencoder: str | None = option(None, "ldm: the trained autoencoder checkpoint whose latent space the UNet "
                                     "learns (--model autoencoder first)")
    kl_weight: float = option(1e-6, "autoencoder: weight of the KL term beside L1")
    perceptual_weight: float = option(0.1, "autoencoder: weight of the perceptual distance (frozen ImageNet "
                                      "EfficientNet-Lite1 features, LPIPS-style) beside L1; 0 trains on L1 alone")
    adversarial_weight: float = option(0.0, "autoencoder: weight of a hinge PatchGAN term that joins after 40%% of "
                                       "the steps, balanced against the reconstruction loss by their gradient norms "
                                       "at the decoder's last layer; 0 leaves the discriminator out")
    img_size: int = option(64, "generated image size; the upscaler's input size")
    scale: int = option(2, "upscaler factor (64 -> 128 px by default)")
    resize: str = option("squash", "resize rule of the cache", choices=("squash", "center_crop"))
    epochs: int | None = option(None, "epochs (default: the preset's)")
    batch_size: int | None = option(None, "images per step (default: the preset's)")
    lr: float | None = option(None, "peak learning rate (default: the preset's)")
    limit: int | None = option(None, "train on a seeded class-stratified subset of this many images (smoke "
                               "preset: 16)")
    bf16: bool | None = option(None, "bf16 autocast (default: on for the DCGAN, DDPM, autoencoder and LDM cpu/full "
                               "presets, off for the upscaler)")
    ema_decay: float = option(0.999, "DDPM and LDM: decay of the EMA weights that are sampled")
    sample_every: int | None = option(None, "write a sample grid every N epochs")
    log_every: int = option(25, "average losses over this many steps per CSV row")
    seed: int = option(0, "seed of initialisation, shuffling, noise")
    out: str | None = option(None, "run folder (default runs/generators/<model>_<preset>_s<seed>, <model>_dx_... "
                             "for --target dx)")
    ship: str | None = option(None, "also write the final model as fp16 safetensors + sidecar at this path (e.g. "
                              "checkpoints/generators/dcgan)")
    arch: dict[str, Any] | None = None  # from the preset
    patch: int | None = None
    preview_steps: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {MODELS}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        if (self.model == "ldm") != bool(self.autoencoder):
            raise ValueError("--autoencoder is required with --model ldm, and only with it")
        preset = PRESETS[self.model][self.preset]
        for key in ("epochs", "batch_size", "lr", "limit", "sample_every", "bf16"):
            if getattr(self, key) is None:
                setattr(self, key, preset.get(key, False if key == "bf16" else None))
        self.arch = self.arch or preset["arch"]
        self.patch, self.preview_steps = preset.get("patch"), preset.get("preview_steps", 50)

    @property
    def run_dir(self) -> Path:
        name = f"{self.model}{'_dx' if self.target == 'dx' else ''}_{self.preset}_s{self.seed}"
        return Path(self.out or RUNS / "generators" / name)


def parse_args(argv: list[str] | None = None) -> tuple[GeneratorConfig, Runtime]:
    return parse_config(GeneratorConfig, argv, __doc__)


def fit_images(cfg: GeneratorConfig) -> tuple[CachedImages, CachedImages | None]:
    """Real fit rows (and, for the upscaler, real val rows) at the size the model trains on."""
    df = read_manifest(cfg.manifest)
    fit = df[(df["split"] == "fit") & (df["source"] == "real")]
    if cfg.limit:
        fit = stratified_subset(fit, cfg.limit, cfg.seed)
    if fit.empty:
        raise UserError(f"{cfg.manifest} has no real rows in the fit split")
    size = cfg.img_size * cfg.scale if cfg.model == "upscaler" else cfg.img_size
    val = None
    if cfg.model in NEEDS_VAL:
        val_df = df[(df["split"] == "val") & (df["source"] == "real")]
        val = CachedImages(val_df.iloc[: max(8, cfg.limit // 4) if cfg.limit else 128], size, cfg.resize)
    return CachedImages(fit, size, cfg.resize, target=cfg.target), val


def build_trainer(cfg: GeneratorConfig, device: torch.device, total_steps: int):
    arch = {**cfg.arch, "image_size": cfg.img_size, "num_classes": len(TARGETS[cfg.target])}
    if cfg.model == "dcgan":
        return DCGANTrainer(arch, cfg.lr, device, autocast=cfg.bf16)
    if cfg.model == "ddpm":
        return DDPMTrainer(arch, cfg.lr, device, total_steps, ema_decay=cfg.ema_decay, autocast=cfg.bf16)
    if cfg.model == "autoencoder":
        return AutoencoderTrainer({**cfg.arch, "image_size": cfg.img_size}, cfg.lr, device, total_steps,
                                  cfg.kl_weight, cfg.perceptual_weight, cfg.adversarial_weight, cfg.bf16)
    if cfg.model == "ldm":
        autoencoder, ae_meta = load_checkpoint(cfg.autoencoder, build_autoencoder, kind="autoencoder")
        if ae_meta["image_size"] != cfg.img_size:
            raise UserError(f"{cfg.autoencoder} encodes {ae_meta['image_size']}-px images, not --img-size "
                            f"{cfg.img_size}")
        return LatentDiffusionTrainer(arch, cfg.lr, device, total_steps, autoencoder.float(), ae_meta["arch_kwargs"],
                                      ema_decay=cfg.ema_decay, autocast=cfg.bf16)
    return UpscalerTrainer({**cfg.arch, "scale": cfg.scale}, cfg.lr, device, total_steps, cfg.patch)


def preview(trainer, cfg: GeneratorConfig, val: CachedImages | None, path: Path) -> None:
    """Generators: the same 8 latents per class every time. Upscaler: bicubic | learned | real, for 8 val images.
    Autoencoder: 8 real val images above their reconstructions."""
    if cfg.model == "autoencoder":
        real = torch.from_numpy(val.images[:8]).permute(0, 3, 1, 2)
        save_grid(torch.cat([real, from_signed(trainer.reconstruct(real)).cpu()]), path, nrow=8)
        return
    if cfg.model == "upscaler":
        hr = torch.from_numpy(val.images[:8]).permute(0, 3, 1, 2)
        lr = from_unit(bicubic(hr.float() / 255.0, cfg.img_size))
        plain = from_unit(bicubic(lr.float() / 255.0, hr.shape[-1]))
        save_grid(torch.cat([plain, upscale(trainer.model, lr), hr]), path, nrow=8)
        return
    labels = torch.arange(len(TARGETS[cfg.target])).repeat_interleave(8)
    gen = torch.Generator().manual_seed(12345)
    kwargs = {"steps": cfg.preview_steps} if cfg.model in ("ddpm", "ldm") else {}
    save_grid(from_signed(trainer.generate(labels, gen, **kwargs)), path, nrow=8)


def mean_row(window: list[dict[str, float]], step: int, epoch: int) -> dict[str, Any]:
    return {"step": step, "epoch": epoch + 1, **{k: sum(w[k] for w in window) / len(window) for k in window[0]}}


def checkpoint_meta(cfg: GeneratorConfig, trainer, model: torch.nn.Module, fit_df: pd.DataFrame,
                    epochs: list[dict[str, Any]]) -> dict[str, Any]:
    meta: dict[str, Any] = {"kind": cfg.model, "arch": type(model).__name__, "arch_kwargs": trainer.arch,
                            "resize": cfg.resize, "class_names": list(TARGETS[cfg.target]), "target": cfg.target}
    if cfg.model == "upscaler":
        meta |= {"input_size": cfg.img_size, "output_size": cfg.img_size * cfg.scale, "normalization": "unit"}
    else:
        meta |= {"image_size": cfg.img_size, "normalization": "[-1, 1]"}
    if cfg.model in ("ddpm", "ldm"):
        meta["noise_schedule"] = trainer.schedule
    if cfg.model == "ldm":
        meta |= {"autoencoder": Path(cfg.autoencoder).name, "autoencoder_sha256": file_sha256(cfg.autoencoder)}
    # Paths as the manifest stores them (relative to its folder), so the hash is the same on every machine.
    rel = sorted(os.path.relpath(p, Path(cfg.manifest).resolve().parent) for p in fit_df["path"])
    fit_hash = hashlib.sha256("\n".join(rel).encode()).hexdigest()
    return meta | {"preset": cfg.preset, "epochs": len(epochs), "steps": trainer.steps, "seed": cfg.seed,
                   "manifest": Path(cfg.manifest).name, "manifest_sha256": file_sha256(cfg.manifest),
                   "fit_paths_sha256": fit_hash, "n_train_images": len(fit_df), "trained_on": "split=fit, source=real",
                   "train_args": {k: v for k, v in to_json(cfg).items()  # paths are machine-specific: left out
                                  if k not in ("manifest", "out", "ship", "autoencoder")},
                   "last_epoch": epochs[-1]}


def training_batches(cfg: GeneratorConfig, trainer, images: torch.Tensor, progress_label: str,
                     gen: torch.Generator, steps_per_epoch: int, progress: bool):
    """One epoch's (indices, batch) in a seeded order: uint8 images with flips and 90-degree rotations (the upscaler
    augments its own crops), or for the LDM one random dihedral view of each image's precomputed latents."""
    order = torch.randperm(len(images), generator=gen)[: steps_per_epoch * cfg.batch_size].view(steps_per_epoch, -1)
    for idx in tqdm(order, desc=progress_label, disable=not progress, leave=False):
        if cfg.model == "ldm":
            yield idx, trainer.views[torch.randint(0, VIEWS, (len(idx),), generator=gen), idx]
        elif cfg.model == "upscaler":
            yield idx, images[idx]
        else:
            yield idx, augment(images[idx], gen, crop_scale=(1.0, 1.0), jitter=0.0)


def validation_scores(cfg: GeneratorConfig, trainer, val: CachedImages | None) -> dict[str, float]:
    """Upscaler: PSNR/SSIM against bicubic; autoencoder: how closely it round-trips real val images."""
    if val is None:
        return {}
    real = torch.from_numpy(val.images).permute(0, 3, 1, 2)
    if cfg.model == "upscaler":
        return {f"val_{k}": v.mean().item() for k, v in compare_with_bicubic(trainer.model, real).items()}
    rec = torch.cat([from_signed(trainer.reconstruct(b)).cpu() for b in real.split(64)])
    return {"val_psnr": psnr(rec, real).mean().item(),
            "val_mae": (rec.float() - real.float()).abs().mean().item() / 255.0}


def exported(cfg: GeneratorConfig, trainer, images: torch.Tensor) -> torch.nn.Module:
    """The model to save; the autoencoder's latent scale is measured on (up to) the first 512 fit images."""
    return trainer.export(images[:512]) if cfg.model == "autoencoder" else trainer.export()


def train(cfg: GeneratorConfig, rt: Runtime | None = None) -> dict[str, Any]:
    """Train (or resume) one generator, autoencoder or upscaler; returns its folder, epoch rows and sidecar."""
    rt = rt or Runtime()
    device = init_device(rt.device, rt.threads)
    out = cfg.run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    fit, val = fit_images(cfg)
    steps_per_epoch = len(fit) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(fit)} training images are fewer than one batch of {cfg.batch_size}")
    seed_everything(cfg.seed)
    trainer = build_trainer(cfg, device, steps_per_epoch * cfg.epochs)
    images = torch.from_numpy(fit.images).permute(0, 3, 1, 2)
    n_params = sum(p.numel() for p in trainer.export().parameters())
    print(f"{cfg.model} ({cfg.preset}): {n_params / 1e6:.2f}M parameters in the shipped model; "
          f"{len(fit)} fit images, {steps_per_epoch} steps/epoch, device {device}")
    state_path, losses, epochs, start = out / "state.pt", [], [], 0
    if rt.resume and state_path.exists():
        state = load_state(state_path)
        trainer.load_state_dict(state["trainer"])
        losses, epochs, start = state["losses"], state["epochs"], state["epoch"] + 1
        print(f"resumed from {state_path} after epoch {state['epoch'] + 1} (step {trainer.steps})")
    if cfg.model == "ldm" and start < cfg.epochs:
        trainer.views = encode_views(trainer.autoencoder, images, progress=rt.progress)

    for epoch in range(start, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        t0, window = time.perf_counter(), []
        for idx, x in training_batches(cfg, trainer, images, f"epoch {epoch + 1}/{cfg.epochs}", gen,
                                       steps_per_epoch, rt.progress):
            window.append(trainer.train_step(x, fit.targets[idx], gen))
            if len(window) == cfg.log_every:
                losses.append(mean_row(window, trainer.steps, epoch))
                window = []
        if window:
            losses.append(mean_row(window, trainer.steps, epoch))
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "steps": trainer.steps, "seconds": round(seconds, 1),
                               "images_per_s": steps_per_epoch * cfg.batch_size / seconds,
                               **validation_scores(cfg, trainer, val)}
        epochs.append(row)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
            preview(trainer, cfg, val, out / "samples" / f"epoch_{epoch + 1:03d}.png")
        write_rows(out / "losses.csv", losses)
        write_rows(out / "epochs.csv", epochs)
        plots.training_curves(losses, out / "losses.png", x="step", title=out.name)
        model = exported(cfg, trainer, images)
        save_checkpoint(out / "model", model, checkpoint_meta(cfg, trainer, model, fit.df, epochs))
        save_state(state_path, {"trainer": trainer.state_dict(), "epoch": epoch, "losses": losses, "epochs": epochs,
                                "config": to_json(cfg)})
    model = exported(cfg, trainer, images)
    meta = checkpoint_meta(cfg, trainer, model, fit.df, epochs)
    if cfg.ship:
        print(f"shipped {save_checkpoint(cfg.ship, model, meta, dtype=torch.float16)}")
    print(f"-> {out}")
    return {"out": out, "epochs": epochs, "meta": meta}


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(*parse_args(argv))


if __name__ == "__main__":
    main()
