"""A convolutional VAE for 128x128 RGB lesions in [0,1], trained on benign images only.

Reconstruction error is the anomaly score: a lesion unlike the benign training distribution should reconstruct
worse. Design choices, and why:
- nearest-neighbour upsampling + 3x3 conv in the decoder (transposed convs leave checkerboard artefacts that would
  add structured error to every image);
- the score uses the latent mean, not a sample, so the same image always gets the same score;
- log-variance is clamped: with a large learning rate the KL term can explode (seen on CPU under bf16);
- one score definition, `anomaly_score`: mean absolute error in [0,1] pixel space, over the whole image or, with
  `score_region="centre"`, over the central disc of radius CENTRE_RADIUS x side. Why the centre: dermoscopic images
  are framed on the lesion, while the border holds the device (vignette, ruler, lighting), and whole-image error
  rises with the device: a HAM10000-calibrated threshold flags 12.3% of ISIC 2017 benign calibration lesions, the
  centre's 5.8% (README, "Leave one source out"; anomaly_detection/calibrate.py reports it). The region is part of the
  checkpoint (`arch_kwargs.score_region`), so the exported ONNX graph scores the same way. The input must be
  preprocessed with the VAE's own sidecar (normalization `unit`), never the classifier's ImageNet normalization.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCORE_REGIONS = ("image", "centre")
CENTRE_RADIUS = 0.25  # of the side: a disc over about a fifth of the image


def down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


def up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class ConvVAE(nn.Module):
    def __init__(self, img_size: int = 128, latent_dim: int = 128, channels: tuple[int, ...] = (32, 64, 128, 256),
                 score_region: str = "image"):
        super().__init__()
        if score_region not in SCORE_REGIONS:
            raise ValueError(f"score_region must be one of {SCORE_REGIONS}, not {score_region!r}")
        self.score_region = score_region
        self.img_size, self.latent_dim = img_size, latent_dim
        self.grid = img_size // 2 ** len(channels)
        if self.grid * 2 ** len(channels) != img_size:
            raise ValueError(f"img_size {img_size} must be divisible by {2 ** len(channels)}")
        chans = (3, *channels)
        self.encoder = nn.Sequential(*[down(a, b) for a, b in zip(chans[:-1], chans[1:])])
        flat = channels[-1] * self.grid ** 2
        self.fc_mu, self.fc_logvar = nn.Linear(flat, latent_dim), nn.Linear(flat, latent_dim)
        self.fc_decode = nn.Linear(latent_dim, flat)
        rev = channels[::-1]
        self.decoder = nn.Sequential(*[up(a, b) for a, b in zip(rev[:-1], rev[1:])], up(rev[-1], rev[-1]),
                                     nn.Conv2d(rev[-1], 3, 3, 1, 1))
        self.channels = channels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h).clamp(-10, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc_decode(z).view(-1, self.channels[-1], self.grid, self.grid)
        return torch.sigmoid(self.decoder(h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.decode(z), mu, logvar

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the latent mean (BatchNorm follows the module's mode; VAEScorer forces eval)."""
        return self.decode(self.encode(x)[0])


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1 reconstruction (mean per pixel) + beta * KL (summed over the latent, mean over the batch)."""
    rec = F.l1_loss(recon, x)
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return rec + beta * kl, rec, kl


def centre_mask(height: int, width: int) -> torch.Tensor:
    """Boolean H x W mask of the central disc of radius CENTRE_RADIUS x the shorter side."""
    ys = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    return ys[:, None] ** 2 + xs[None, :] ** 2 < (CENTRE_RADIUS * min(height, width)) ** 2


def score_description(region: str) -> str:
    """The sidecar's `score` field: what the number is."""
    where = "per image" if region == "image" else f"over the central disc (radius {CENTRE_RADIUS} of the side)"
    return f"mean absolute error {where} in [0,1] space, latent mean"


def anomaly_score(x: torch.Tensor, recon: torch.Tensor, region: str = "image") -> torch.Tensor:
    """Mean absolute error per image in [0,1] space over `region` (SCORE_REGIONS): the one VAE score of the project."""
    error = (x - recon).abs().mean(1)
    if region == "image":
        return error.flatten(1).mean(1)
    mask = centre_mask(*error.shape[1:]).to(error)  # a weighted mean (not boolean indexing) exports cleanly to ONNX
    return (error * mask).flatten(1).sum(1) / mask.sum()


class VAEScorer(nn.Module):
    """x in [0,1] -> (score, reconstruction): the deterministic scoring graph, also what gets exported to ONNX.
    It always scores with BatchNorm's running statistics (eval mode), whatever mode the caller left the VAE in, so
    an image's score never depends on the batch it arrives in."""

    def __init__(self, vae: ConvVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.vae.training
        self.vae.eval()
        recon = self.vae.reconstruct(x)
        self.vae.train(was_training)
        return anomaly_score(x, recon, self.vae.score_region), recon
