"""Class-conditional DCGAN (Radford et al., 2016) in plain torch: one model for both classes, so one file ships.

Generator: latent (100) + one-hot class -> 4x4 transposed convolution, then stride-2 transposed convolutions with
batch norm and ReLU up to the image size, tanh output in [-1, 1]. Discriminator: the mirror image, strided
convolutions with batch norm and LeakyReLU, the one-hot class given as extra constant input channels. Trained with
the non-saturating BCE loss and Adam(2e-4, betas 0.5/0.999), the paper's recipe.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generators import to_signed


def _widths(base: int, image_size: int) -> list[int]:
    n = int(math.log2(image_size)) - 2  # stride-2 stages between 4x4 and the image size
    if 2 ** (n + 2) != image_size or n < 2:
        raise ValueError(f"DCGAN image size must be a power of two >= 16, got {image_size}")
    return [base * 2 ** i for i in range(n)]


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, latent_dim: int = 100, num_classes: int = 2, width: int = 64, image_size: int = 64):
        super().__init__()
        self.latent_dim, self.num_classes, self.image_size = latent_dim, num_classes, image_size
        ch = _widths(width, image_size)[::-1]
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim + num_classes, ch[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(ch[0]), nn.ReLU(True)]
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(z.dtype)
        return self.net(torch.cat([z, onehot], 1)[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, num_classes: int = 2, width: int = 64, image_size: int = 64):
        super().__init__()
        self.num_classes = num_classes
        ch = _widths(width, image_size)
        layers: list[nn.Module] = [nn.Conv2d(3 + num_classes, ch[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for a, b in zip(ch, ch[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ch[-1], 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        maps = F.one_hot(labels, self.num_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.net(torch.cat([x, maps], 1)).flatten()


def build_generator(meta: dict[str, Any]) -> Generator:
    """The shipped part, rebuilt from a checkpoint sidecar."""
    return Generator(**meta["arch_kwargs"])


class DCGANTrainer:
    """Generator + discriminator + their optimizers; `train_step` takes a uint8 batch of real images."""

    kind = "dcgan"

    def __init__(self, arch: dict[str, Any], lr: float, device: torch.device, autocast: bool = False):
        self.device, self.arch, self.autocast = device, dict(arch), autocast
        self.g = Generator(**arch).to(device)
        self.d = Discriminator(self.g.num_classes, arch.get("width", 64), self.g.image_size).to(device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=lr, betas=(0.5, 0.999))
        self.steps = 0

    def noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.g.latent_dim, generator=gen).to(self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        self.g.train(), self.d.train()
        real, y = to_signed(x.to(self.device)), y.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            fake = self.g(self.noise(len(y), gen), y)
            d_real, d_fake = self.d(real, y).float(), self.d(fake.detach(), y).float()
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            d_fake = self.d(fake, y).float()
        loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.steps += 1
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                "d_real": torch.sigmoid(d_real).mean().item(), "d_fake": torch.sigmoid(d_fake).mean().item()}

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return generate(self.g, labels, gen)

    def export(self) -> nn.Module:
        return self.g

    def state_dict(self) -> dict[str, Any]:
        return {"g": self.g.state_dict(), "d": self.d.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g.load_state_dict(state["g"])
        self.d.load_state_dict(state["d"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.steps = state["steps"]


@torch.no_grad()
def generate(g: Generator, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] for the given class indices (eval mode: batch norm uses its running statistics)."""
    g.eval()
    device = next(g.parameters()).device
    z = torch.randn(len(labels), g.latent_dim, generator=gen).to(device)
    return g(z, labels.to(device))
