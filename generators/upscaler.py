r"""Learned super-resolution for the "upscaled" configurations, and its comparison with bicubic.

    # CPU: the table of the shipped upscaler against bicubic on the real `val` split (about a minute)
    python generators/upscaler.py --checkpoint checkpoints/generators/upscaler.safetensors \
        --out results/generators/upscaler_vs_bicubic.csv
    # one GPU: the same command with --device cuda (several GPUs: not needed, it is a minute of inference)
    # training: python generators/train.py --model upscaler --preset cpu

The network is SRResNet-style (Ledig et al., 2017) and small: a 3x3 head, residual blocks (conv-ReLU-conv), a 3x3
tail to 3*scale^2 channels and a pixel shuffle. It predicts the residual over bicubic upsampling, and its tail
starts at zero, so an untrained model is exactly bicubic and any gain over bicubic is earned by training.
Pairs are real images (the 128-px cache of `fit`) and their bicubic downscales; bicubic here is torch's
antialiased bicubic, which follows PIL's kernel (the resize the rest of the project uses).

PSNR and SSIM are computed on RGB in [0, 1] after rounding to uint8 (the pixels a saved image has). SSIM is
implemented here in torch (Wang et al., 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, per channel,
no padding), not taken from scikit-image; float64 gives the same values to about 1e-6.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from data.atomic import atomic_write_csv
from data.cache import CachedImages
from data.checkpoint import load_checkpoint
from data.manifest import read_manifest
from data.paths import MANIFESTS, RESULTS
from data.runtime import add_runtime_options, cli_main, init_device
from data.training import warmup_cosine
from data.transforms import augment
from generators import from_unit


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(True),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Upscaler(nn.Module):
    """[0, 1] images at size s -> [0, 1]-ish images at size s * scale (clamp when saving)."""

    def __init__(self, scale: int = 2, channels: int = 32, blocks: int = 4):
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.tail = nn.Sequential(nn.Conv2d(channels, 3 * scale ** 2, 3, padding=1), nn.PixelShuffle(scale))
        nn.init.zeros_(self.tail[0].weight)
        nn.init.zeros_(self.tail[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return bicubic(x, x.shape[-1] * self.scale) + self.tail(self.body(h) + h)


def bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float NxCxHxW -> size x size with PIL-like antialiased bicubic (used both to down- and to upscale)."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def build_upscaler(meta: dict[str, Any]) -> Upscaler:
    return Upscaler(**meta["arch_kwargs"])


@torch.no_grad()
def upscale(model: Upscaler, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 NxCxHxW -> uint8 at scale x the size."""
    model.eval()
    device = next(model.parameters()).device
    out = [from_unit(model(x.to(device).float() / 255.0)).cpu() for x in images.split(batch_size)]
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 NxCxHxW images; identical images give inf."""
    mse = (a.float() - b.float()).div(255.0).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of uint8 NxCxHxW images (mean over channels and valid window positions).

    float32 with a separable Gaussian; second moments are taken of images minus their global mean (variances do
    not change), which keeps float32 cancellation far below the constants."""
    x, y = a.float() / 255.0, b.float() / 255.0
    g = torch.exp(-((torch.arange(window, dtype=torch.float32) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).repeat(x.shape[1], 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, g.view(-1, 1, window, 1), groups=t.shape[1]), g.view(-1, 1, 1, window),
                        groups=t.shape[1])

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    x, y = x - x.mean((2, 3), keepdim=True), y - y.mean((2, 3), keepdim=True)
    mxc, myc = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mxc ** 2, blur(y * y) - myc ** 2, blur(x * y) - mxc * myc
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def compare_with_bicubic(model: Upscaler, hr: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Downscale real uint8 HR images by the model's scale, upscale them back both ways; per-image scores."""
    lr = from_unit(bicubic(hr.float() / 255.0, hr.shape[-1] // model.scale))
    learned = upscale(model, lr, batch_size)
    plain = torch.cat([from_unit(bicubic(x.float() / 255.0, hr.shape[-1])) for x in lr.split(batch_size)])
    return {"psnr_upscaler": psnr(learned, hr), "psnr_bicubic": psnr(plain, hr),
            "ssim_upscaler": ssim(learned, hr), "ssim_bicubic": ssim(plain, hr)}


def comparison_rows(scores: dict[str, torch.Tensor], n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per method and one for the paired difference: mean with a seeded 95% bootstrap CI."""
    rng = np.random.default_rng(seed)
    n = len(scores["psnr_bicubic"])
    idx = rng.integers(0, n, size=(n_boot, n))
    series = {"upscaler": {m: scores[f"{m}_upscaler"].numpy() for m in ("psnr", "ssim")},
              "bicubic": {m: scores[f"{m}_bicubic"].numpy() for m in ("psnr", "ssim")}}
    series["upscaler - bicubic"] = {m: series["upscaler"][m] - series["bicubic"][m] for m in ("psnr", "ssim")}
    rows = []
    for method, values in series.items():
        row: dict[str, Any] = {"method": method, "n_images": n}
        for metric, v in values.items():
            boot = v[idx].mean(1)
            row |= {metric: float(v.mean()), f"{metric}_ci_low": float(np.percentile(boot, 2.5)),
                    f"{metric}_ci_high": float(np.percentile(boot, 97.5))}
        rows.append(row)
    rows[-1]["fraction_images_better_psnr"] = float((series["upscaler - bicubic"]["psnr"] > 0).mean())
    return rows


class UpscalerTrainer:
    """L1 loss on random HR patches (flips and 90-degree rotations) and their bicubic downscales."""

    kind = "upscaler"

    def __init__(self, arch: dict[str, Any], lr: float, device: torch.device, total_steps: int, patch: int = 64):
        self.device, self.patch, self.arch = device, patch, dict(arch)
        self.model = Upscaler(**arch).to(device)
        if patch % self.model.scale:
            raise ValueError(f"patch {patch} must be a multiple of the scale {self.model.scale}")
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.sched = warmup_cosine(self.opt, total_steps, max(1, total_steps // 20))
        self.steps = 0

    def crops(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = augment(x, gen, crop_scale=(1.0, 1.0), jitter=0.0)
        n, size = x.shape[0], x.shape[-1]
        top, left = (torch.randint(0, size - self.patch + 1, (2, n), generator=gen)).tolist()
        return torch.stack([x[i, :, t:t + self.patch, s:s + self.patch] for i, (t, s) in enumerate(zip(top, left))])

    def train_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        self.model.train()
        hr = self.crops(x, gen).to(self.device).float() / 255.0
        lr_img = from_unit(bicubic(hr, self.patch // self.model.scale)).float() / 255.0
        loss = F.l1_loss(self.model(lr_img), hr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.steps += 1
        return {"loss": loss.item(), "lr": self.sched.get_last_lr()[0]}

    def export(self) -> Upscaler:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.steps = state["steps"]


def load_upscaler(path: str | os.PathLike) -> tuple[Upscaler, dict[str, Any]]:
    return load_checkpoint(path, build_upscaler, kind="upscaler")


@cli_main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="upscaler .safetensors (with its .json sidecar)")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--split", default="val", help="real held-out split to compare on (never the upscaler's fit)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images (quick checks)")
    p.add_argument("--out", default=str(RESULTS / "generators" / "upscaler_vs_bicubic.csv"),
                   help="CSV to write")
    add_runtime_options(p)
    a = p.parse_args(argv)
    if a.split == "fit":
        sys.exit("error: the upscaler trained on fit; compare on a held-out split (val, calib, test)")
    device = init_device(a.device, a.threads)
    model, meta = load_upscaler(a.checkpoint)
    model.to(device)
    df = read_manifest(a.manifest)
    df = df[(df["split"] == a.split) & (df["source"] == "real")]
    df = df.iloc[: a.limit] if a.limit else df
    hr = CachedImages(df, meta["output_size"], meta["resize"])
    rows = comparison_rows(compare_with_bicubic(model, torch.from_numpy(hr.images).permute(0, 3, 1, 2)))
    for row in rows:
        row |= {"split": a.split, "input_size": meta["input_size"], "output_size": meta["output_size"],
                "checkpoint": Path(a.checkpoint).name, "color": "RGB", "ssim_impl": "torch (generators/upscaler.py)"}
    atomic_write_csv(a.out, pd.DataFrame(rows))
    for row in rows:
        print(f"{row['method']:>20}: PSNR {row['psnr']:.3f} dB [{row['psnr_ci_low']:.3f}, {row['psnr_ci_high']:.3f}]"
              f"  SSIM {row['ssim']:.4f} [{row['ssim_ci_low']:.4f}, {row['ssim_ci_high']:.4f}]  (n={row['n_images']})")
    print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
