"""Train the ConvVAE on benign images of the `fit` split only; select the epoch by val anomaly AUC (curves.png
beside losses.csv shows both per epoch).

    # CPU (2 cores, about 2 minutes an epoch at 128 px):
    python anomaly_detection/train_vae.py --epochs 6
    # one GPU:
    python anomaly_detection/train_vae.py --device cuda --batch-size 128 --epochs 30
    # several GPUs: the VAE is small; train it on one and spend the others on the classifier grid.

Malignant images never reach the VAE's training; `val` (both classes) only picks the epoch, and the anomaly
threshold is calibrated afterwards on `calib` (anomaly_detection/calibrate.py). Each epoch appends to `losses.csv`,
writes a reconstruction grid (input / reconstruction / error map) every `--grid-every` epochs and the resumable
`state.pt`; the best epoch is `best.safetensors` + `best.json`. Kept in fp32: bf16 made the KL term explode here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anomaly_detection.vae import SCORE_REGIONS, ConvVAE, VAEScorer, score_description, vae_loss
from data.atomic import write_rows
from data.cache import CachedImages
from data.checkpoint import save_checkpoint
from data.config import Runtime, check_types, option, parse_config, to_json, write_config
from data.manifest import ManifestError, file_sha256, read_manifest, stratified_subset
from data.paths import MANIFESTS, RUNS
from data.runtime import UserError, cli_main, init_device, seed_everything
from data.training import load_state, save_state
from data.transforms import COLOR_CONSTANCY, Preprocess, preprocess_meta
from evaluation import plots
from evaluation.metrics import auc


@dataclass
class VAEConfig:
    """Everything that defines a VAE run; `anomaly_detection/train_vae.py --help` lists the same fields as flags."""

    manifest: str = option(str(MANIFESTS / "original.csv"), "manifest CSV")
    img_size: int = option(128, "square input size (divisible by 16)")
    color_constancy: str = option("none", "Shades-of-Gray (p=6) colour constancy, stored in the checkpoint and "
                                  "applied at every later use (as the classifier's)", choices=COLOR_CONSTANCY)
    latent_dim: int = option(128, "latent dimension (128: as good on val as 512 was, with a 3.6x smaller "
                             "checkpoint)")
    beta: float = option(1e-4, "weight of the KL term")
    score_region: str = option("centre", "where the anomaly score averages |x - x_hat|: the central disc, where the "
                               "lesion is (less sensitive to the device), or the whole image", choices=SCORE_REGIONS)
    epochs: int = option(6, "training epochs")
    batch_size: int = option(32, "images per step")
    lr: float = option(3e-4, "AdamW learning rate")
    limit: int | None = option(None, "use at most this many benign fit images (quick runs)")
    grid_every: int = option(1, "write a reconstruction grid every N epochs")
    seed: int = option(0, "seed of initialisation, shuffling, flips")
    out: str = option(str(RUNS / "vae"), "run folder")

    def __post_init__(self) -> None:
        check_types(self)


def parse_args(argv: list[str] | None = None) -> tuple[VAEConfig, Runtime]:
    return parse_config(VAEConfig, argv, __doc__)


@torch.no_grad()
def score_images(vae: ConvVAE, images: np.ndarray, preprocess: Preprocess, device: torch.device,
                 batch_size: int = 64) -> np.ndarray:
    """uint8 N x H x W x 3 at the VAE's size -> N anomaly scores (deterministic)."""
    scorer = VAEScorer(vae).eval().to(device)
    return np.concatenate([scorer(preprocess.batch(list(images[i:i + batch_size])).to(device))[0].cpu().numpy()
                           for i in range(0, len(images), batch_size)])


def save_grid(vae: ConvVAE, images: np.ndarray, preprocess: Preprocess, path: Path, device: torch.device) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with torch.no_grad():
        x = preprocess.batch(list(images)).to(device)
        recon = vae.eval().reconstruct(x)
    err = (x - recon).abs().mean(1).cpu().numpy()
    fig, axes = plt.subplots(3, len(images), figsize=(1.6 * len(images), 5))
    for j in range(len(images)):
        axes[0, j].imshow(x[j].permute(1, 2, 0).cpu().numpy())
        axes[1, j].imshow(recon[j].permute(1, 2, 0).cpu().numpy())
        axes[2, j].imshow(err[j], cmap="inferno", vmin=0, vmax=0.3)
        for ax in axes[:, j]:
            ax.axis("off")
    for ax, title in zip(axes[:, 0], ("input", "reconstruction", "|error|")):
        ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train_epoch(vae: ConvVAE, optimizer: torch.optim.Optimizer, fit: CachedImages, preprocess: Preprocess,
                cfg: VAEConfig, epoch: int, device: torch.device, rt: Runtime) -> tuple[np.ndarray, int]:
    """One seeded pass over the benign fit images with random horizontal flips; (summed loss, L1, KL), steps."""
    torch.manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    vae.train()
    sums = np.zeros(3)
    steps = range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)
    for i in tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not rt.progress):
        idx = order[i:i + cfg.batch_size].numpy()
        x = preprocess.batch(list(fit.images[idx])).to(device)
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        loss, rec, kl = vae_loss(x, *vae(x), beta=cfg.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += (loss.item(), rec.item(), kl.item())
    return sums, len(steps)


def train(cfg: VAEConfig, rt: Runtime | None = None) -> dict:
    """Train (or resume) the VAE; returns the best epoch (0-based) and its val AUC."""
    rt = rt or Runtime()
    device = init_device(rt.device, rt.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        df = read_manifest(cfg.manifest)
    except (FileNotFoundError, ManifestError) as exc:
        raise UserError(str(exc)) from None
    fit_df = df[(df["split"] == "fit") & (df["label"] == "benign") & (df["source"] == "real")]
    val_df = df[df["split"] == "val"]
    if cfg.limit:
        fit_df, val_df = fit_df.iloc[: cfg.limit], stratified_subset(val_df, max(8, cfg.limit // 4), cfg.seed)
    fit, val = CachedImages(fit_df, cfg.img_size), CachedImages(val_df, cfg.img_size)
    prep_meta = preprocess_meta(cfg.img_size, "squash", normalization="unit", color_constancy=cfg.color_constancy)
    preprocess = Preprocess.from_meta(prep_meta)
    seed_everything(cfg.seed)
    vae = ConvVAE(cfg.img_size, cfg.latent_dim, score_region=cfg.score_region).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    print(f"ConvVAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters; "
          f"{len(fit)} benign fit images; val {len(val)} ({int(val.targets.sum())} malignant); device {device}")
    write_config(out, cfg)
    state_path, history, best, start = out / "state.pt", [], {"auc": -1.0, "epoch": -1}, 0
    if rt.resume and state_path.exists():
        state = load_state(state_path)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        print(f"resumed after epoch {state['epoch'] + 1}")
    grid_rows = np.concatenate([val.images[val.targets.numpy() == 0][:4], val.images[val.targets.numpy() == 1][:4]])
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sums, steps = train_epoch(vae, optimizer, fit, preprocess, cfg, epoch, device, rt)
        seconds = time.perf_counter() - t0
        scores = score_images(vae, val.images, preprocess, device)
        y = val.targets.numpy()
        row = {"epoch": epoch + 1, "loss": sums[0] / steps, "l1": sums[1] / steps, "kl": sums[2] / steps,
               "val_benign_l1": float(scores[y == 0].mean()), "val_auc": auc(y, scores),
               "images_per_s": steps * cfg.batch_size / seconds}
        history.append(row)
        improved = row["val_auc"] > best["auc"]
        print(f"epoch {epoch + 1}: loss {row['loss']:.4f} (L1 {row['l1']:.4f}, KL {row['kl']:.1f})  "
              f"val AUC {row['val_auc']:.4f}  {row['images_per_s']:.1f} img/s{'  (best)' if improved else ''}")
        if improved:
            best = {"auc": row["val_auc"], "epoch": epoch}
            save_checkpoint(out / "best", vae, {
                "kind": "vae", "arch": "convvae", "arch_kwargs": {"latent_dim": cfg.latent_dim,
                                                                  "channels": list(vae.channels),
                                                                  "score_region": cfg.score_region},
                **prep_meta, "score": score_description(cfg.score_region),
                "trained_on": "benign images of the fit split", "epoch": epoch + 1, "beta": cfg.beta,
                "manifest": Path(cfg.manifest).name, "manifest_sha256": file_sha256(cfg.manifest),
                "anomaly_threshold": None, "metrics": {"val": {"auc": row["val_auc"]}}, "train_args": to_json(cfg)})
        if (epoch + 1) % cfg.grid_every == 0:
            save_grid(vae, grid_rows, preprocess, out / f"reconstructions_epoch{epoch + 1:03d}.png", device)
        write_rows(out / "losses.csv", history)
        plots.training_curves(history, out / "curves.png", title=f"ConvVAE ({out.name})")
        save_state(state_path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                "history": history, "best": best})
    print(f"best epoch {best['epoch'] + 1}: val AUC {best['auc']:.4f} -> {out / 'best.safetensors'}")
    return best


@cli_main
def main(argv: list[str] | None = None) -> dict:
    return train(*parse_args(argv))


if __name__ == "__main__":
    main()
