"""Latent diffusion (Rombach et al., 2022): a small KL autoencoder maps 64-px lesions to a 16x16x4 latent grid, and
the class-conditional DDPM of generators/ddpm.py learns to denoise in that grid instead of in pixels.

Why: a pixel-space UNet at 64 px trains at about 0.7 steps/s on two CPU cores, far from the tens of thousands of steps
a diffusion model needs. The latent grid has 48x fewer values than the image, so a UNet of the same width runs several
times faster and spends its capacity on lesion structure while the decoder restores texture.

Two stages, both run by generators/train.py and both resumable: `--model autoencoder` (diffusers `AutoencoderKL`,
about 2.6M parameters; L1 reconstruction + a perceptual distance + a small KL term; trained on every `fit` image of the
manifest, both classes and, with data/manifests/mixed.csv, both sources), then `--model ldm --autoencoder <its
checkpoint>` (the UNet with EMA on the frozen autoencoder's latents, scaled to unit variance). The shipped LDM
checkpoint holds both networks in one safetensors file (`LatentDiffusion`), loaded strictly; sampling is DDIM or the
ancestral chain in latent space, then one decoder pass.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn

from classifiers.models import load_lite_imagenet
from data.training import warmup_cosine
from data.transforms import TF_LITE_MEAN, TF_LITE_STD
from generators import ddpm, to_signed

AUTOENCODER = {"image_size": 64, "channels": (32, 64, 128), "latent_channels": 4, "layers_per_block": 1,
               "norm_groups": 8, "scaling_factor": 1.0}


def build_autoencoder(meta: dict[str, Any]) -> AutoencoderKL:
    """AutoencoderKL from `arch_kwargs`: downsampling factor 2^(len(channels) - 1), no mid-block attention (cheap)."""
    a = {**AUTOENCODER, **meta["arch_kwargs"]}
    levels = len(a["channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(a["channels"]),
                         layers_per_block=a["layers_per_block"], latent_channels=a["latent_channels"],
                         norm_num_groups=a["norm_groups"], sample_size=a["image_size"],
                         scaling_factor=a["scaling_factor"], mid_block_add_attention=False)


class LatentDiffusion(nn.Module):
    """The frozen autoencoder and the latent UNet, as one module (one checkpoint)."""

    def __init__(self, autoencoder: AutoencoderKL, unet: UNet2DModel):
        super().__init__()
        self.autoencoder, self.unet = autoencoder, unet

    @property
    def scale(self) -> float:
        return float(self.autoencoder.config.scaling_factor)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.scale).sample.clamp(-1, 1)


def build_ldm(meta: dict[str, Any]) -> LatentDiffusion:
    a = meta["arch_kwargs"]
    unet = ddpm.build_unet({"arch_kwargs": a["unet"]})
    return LatentDiffusion(build_autoencoder({"arch_kwargs": a["autoencoder"]}), unet)


@torch.no_grad()
def generate(model: LatentDiffusion, labels: torch.Tensor, gen: torch.Generator, sampler: str = "ddim",
             steps: int | None = None, schedule: dict[str, Any] | None = None, autocast: bool = False) -> torch.Tensor:
    """Images in [-1, 1]: denoise latents with the UNet, then decode them."""
    z = ddpm.generate(model.unet, labels, gen, sampler, steps, schedule, autocast, clamp=False)
    return model.decode(z)


@torch.no_grad()
def posterior_means(autoencoder: AutoencoderKL, images: torch.Tensor, view: int = 0,
                    batch_size: int = 64) -> torch.Tensor:
    """Unscaled posterior means of one dihedral view of uint8 `images`, in batches."""
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    return torch.cat([autoencoder.encode(to_signed(dihedral(b, view).to(device))).latent_dist.mean
                      for b in images.split(batch_size)])


@torch.no_grad()
def reconstruct(autoencoder: AutoencoderKL, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """uint8 images -> their reconstructions in [-1, 1] (posterior means, no sampling)."""
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        x = to_signed(x.to(device))
        return autoencoder.decode(autoencoder.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)


def latent_std(autoencoder: AutoencoderKL, images: torch.Tensor) -> float:
    """Standard deviation of the posterior means of uint8 `images`: 1 / it scales latents to unit variance."""
    return float(posterior_means(autoencoder, images).std())


class PerceptualDistance(nn.Module):
    """LPIPS without its learned channel weights (Zhang et al., 2018): activations of frozen ImageNet
    EfficientNet-Lite1 stages (strides 4, 8 and 16), each unit-normalised over channels, squared differences averaged
    over positions and summed over stages; images in [-1, 1], compared at `size` px.

    Why: an L1-only autoencoder averages away texture; its reconstructions score as far from real lesions in ImageNet
    features as samples do (results/generators/, the round-trip row). Lite1, not Lite0: the quality study scores with
    Lite0 features, and a loss computed with the scoring network would train towards the metric."""

    VARIANT, BLOCKS = 1, (1, 2, 3)

    def __init__(self, size: int = 128):
        super().__init__()
        net = timm.create_model(f"tf_efficientnet_lite{self.VARIANT}")
        load_lite_imagenet(net, self.VARIANT)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks[: max(self.BLOCKS) + 1]
        self.size = size
        self.requires_grad_(False).eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        h = self.stem(((x + 1) / 2 - TF_LITE_MEAN[0]) / TF_LITE_STD[0])  # [-1, 1] -> the weights' (pixel - 127) / 128
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.BLOCKS:
                out.append(F.normalize(h.float(), dim=1))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """One distance per image."""
        return sum((fa - fb).pow(2).sum(1).mean((1, 2)) for fa, fb in zip(self.features(a), self.features(b)))


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (Isola et al., 2017), as in Rombach et al.'s autoencoders: strided 4x4 convolutions with batch norm
    and LeakyReLU; each output logit judges one overlapping patch (at 64 px, a 6x6 grid of patches 34 px wide)."""

    def __init__(self, width: int = 32, layers: int = 3):
        mods: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(layers):
            mods += [nn.Conv2d(width * 2 ** i, width * 2 ** (i + 1), 4, 2 if i < layers - 1 else 1, 1, bias=False),
                     nn.BatchNorm2d(width * 2 ** (i + 1)), nn.LeakyReLU(0.2)]
        super().__init__(*mods, nn.Conv2d(width * 2 ** layers, 1, 4, 1, 1))


ADVERSARIAL_START = 0.4  # share of the steps before the discriminator joins: first learn to reconstruct


class AutoencoderTrainer:
    """AutoencoderKL + AdamW with warm-up and cosine decay; loss = L1 + perceptual_weight * PerceptualDistance +
    kl_weight * KL per image, and with `adversarial_weight` a hinge PatchGAN term after ADVERSARIAL_START of the steps,
    scaled by the ratio of the reconstruction and adversarial gradient norms at the decoder's last layer (Esser et al.,
    2021, the weighting of Rombach et al.'s autoencoders)."""

    kind = "autoencoder"

    def __init__(self, arch: dict[str, Any], lr: float, device: torch.device, total_steps: int,
                 kl_weight: float = 1e-6, perceptual_weight: float = 0.0, adversarial_weight: float = 0.0,
                 autocast: bool = False):
        self.device, self.autocast, self.kl_weight = device, autocast, kl_weight
        self.perceptual_weight, self.adversarial_weight = perceptual_weight, adversarial_weight
        self.perceptual = PerceptualDistance().to(device) if perceptual_weight else None
        self.arch = {**AUTOENCODER, **arch}
        self.model = build_autoencoder({"arch_kwargs": self.arch}).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.sched = warmup_cosine(self.opt, total_steps, max(1, min(500, total_steps // 10)))
        self.disc = PatchDiscriminator().to(device) if adversarial_weight else None
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.9)) if self.disc else None
        self.disc_start = int(ADVERSARIAL_START * total_steps)
        self.steps = 0

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> their reconstructions in [-1, 1] (posterior means, no sampling)."""
        return reconstruct(self.model, x, self.autocast)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        self.model.train()
        x = to_signed(x.to(self.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            posterior = self.model.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(self.device)
            rec = self.model.decode(z).sample
            perceptual = self.perceptual(rec, x).float().mean() if self.perceptual else torch.zeros(())
        l1 = F.l1_loss(rec.float(), x)
        kl = posterior.kl().float().mean() / x[0].numel()  # per pixel value, like the L1
        reconstruction = l1 + self.perceptual_weight * perceptual
        loss = reconstruction + self.kl_weight * kl
        adversarial = disc_loss = torch.zeros(())
        gan = self.disc is not None and self.steps >= self.disc_start
        if gan:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                adversarial = -self.disc(rec).float().mean()
            loss = loss + self.balance(reconstruction, adversarial) * adversarial
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        if gan:
            disc_loss = self.discriminator_step(x, rec.detach())
        self.steps += 1
        return {"loss": loss.item(), "l1": l1.item(), "perceptual": perceptual.item(), "kl": kl.item(),
                "adversarial": adversarial.item(), "discriminator": disc_loss.item(),
                "lr": self.sched.get_last_lr()[0]}

    def balance(self, reconstruction: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        """adversarial_weight * |grad reconstruction| / |grad adversarial| at the decoder's output convolution."""
        last = self.model.decoder.conv_out.weight
        g_rec, = torch.autograd.grad(reconstruction, last, retain_graph=True)
        g_adv, = torch.autograd.grad(adversarial, last, retain_graph=True)
        return self.adversarial_weight * (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One hinge-loss update of the patch discriminator."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            real_logits, fake_logits = self.disc(real).float(), self.disc(fake).float()
        loss = 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        return loss.detach()

    def export(self, images: torch.Tensor | None = None) -> AutoencoderKL:
        """The model, with its scaling factor measured on `images` (uint8) when given."""
        if images is not None:
            self.arch["scaling_factor"] = 1.0 / latent_std(self.model, images)
            self.model.register_to_config(scaling_factor=self.arch["scaling_factor"])
        return self.model

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "steps": self.steps, "arch": self.arch}
        if self.disc:
            state |= {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.disc:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.steps, self.arch = state["steps"], state["arch"]
        self.model.register_to_config(scaling_factor=self.arch["scaling_factor"])


# Sampling clips each step's predicted clean latent to +-3 (about the 99th percentile of |z| of real training latents,
# which are scaled to unit variance), as pixel models clip to [-1, 1]. Without it the epsilon-parameterised DDIM step
# divides by sqrt(alpha_bar), about 1e-4 at the cosine schedule's last timesteps, and sampled latents diverged (sd ~1000
# after 4,000 steps: blue blobs). Training is unaffected (it only adds noise).
LATENT_SCHEDULE = {**ddpm.NOISE_SCHEDULE, "clip_sample": True, "clip_sample_range": 3.0}
VIEWS = 8  # the dihedral group: 4 rotations x (no flip, flip)


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """One of the 8 rotations/flips of an NxCxHxW batch (view 0 is the identity)."""
    x = torch.rot90(x, view % 4, dims=(2, 3))
    return x.flip(3) if view >= 4 else x


@torch.no_grad()
def encode_views(autoencoder: AutoencoderKL, images: torch.Tensor, batch_size: int = 64,
                 progress: bool = False) -> torch.Tensor:
    """Scaled posterior means of every dihedral view of uint8 `images`: VIEWS x N x C x h x w, fp16 (the LDM's
    training set, encoded once instead of every step)."""
    from tqdm import tqdm

    scale = float(autoencoder.config.scaling_factor)
    return torch.stack([(posterior_means(autoencoder, images, view, batch_size) * scale).half().cpu()
                        for view in tqdm(range(VIEWS), desc="encoding the 8 views", disable=not progress, leave=False)])


class LatentDiffusionTrainer(ddpm.DDPMTrainer):
    """The DDPM trainer in the latent space of a frozen autoencoder; batches are latents from `encode_views`."""

    kind = "ldm"
    schedule = LATENT_SCHEDULE

    def __init__(self, arch: dict[str, Any], lr: float, device: torch.device, total_steps: int,
                 autoencoder: AutoencoderKL, autoencoder_arch: dict[str, Any], **kwargs: Any):
        factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        unet_arch = {**arch, "in_channels": autoencoder.config.latent_channels,
                     "image_size": arch["image_size"] // factor}
        super().__init__(unet_arch, lr, device, total_steps, **kwargs)
        self.autoencoder = autoencoder.to(device).eval().requires_grad_(False)
        self.arch = {"autoencoder": autoencoder_arch, "unet": unet_arch}
        self.views: torch.Tensor | None = None  # the training set's latents, from encode_views

    def model_space(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device).float()

    def generate(self, labels: torch.Tensor, gen: torch.Generator, steps: int = 50) -> torch.Tensor:
        return generate(self.export(), labels, gen, "ddim", steps, self.schedule, self.autocast)

    def export(self) -> LatentDiffusion:
        return LatentDiffusion(self.autoencoder, self.ema.module)
