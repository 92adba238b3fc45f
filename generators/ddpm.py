"""Class-conditional DDPM (Ho et al., 2020) on a small diffusers `UNet2DModel`, with an EMA of the weights.

The default UNet (channels 32/64/128/256, one ResNet layer per block, self-attention at 16x16, a class embedding)
has about 10M parameters: the diffusers default (114M) trains at about 2.5 images/s on a CPU, this one several times
faster. The network predicts the noise (epsilon objective, MSE) under a cosine noise schedule of 1000 steps.
Sampling runs either the full 1000-step ancestral DDPM chain or DDIM (Song et al., 2021) with far fewer steps
(50 by default, deterministic with eta=0) from the same weights; the EMA weights are the ones exported and sampled.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from data.training import EMA, warmup_cosine
from generators import to_signed

NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
SAMPLERS = ("ddim", "ddpm")


def build_unet(meta: dict[str, Any]) -> UNet2DModel:
    """UNet from `arch_kwargs`: image_size, channels, layers_per_block, attention (per level), num_classes, groups,
    in_channels (3 for pixels, the latent channels for latent diffusion)."""
    a = {"image_size": 64, "channels": (32, 64, 128, 256), "layers_per_block": 1, "in_channels": 3,
         "attention": (False, False, True, False), "num_classes": 2, "norm_groups": 8, **meta["arch_kwargs"]}
    if len(a["attention"]) != len(a["channels"]):
        raise ValueError(f"attention {a['attention']} needs one flag per level of channels {a['channels']}")
    down = tuple("AttnDownBlock2D" if att else "DownBlock2D" for att in a["attention"])
    up = tuple("AttnUpBlock2D" if att else "UpBlock2D" for att in reversed(a["attention"]))
    return UNet2DModel(sample_size=a["image_size"], in_channels=a["in_channels"], out_channels=a["in_channels"],
                       block_out_channels=tuple(a["channels"]), layers_per_block=a["layers_per_block"],
                       down_block_types=down, up_block_types=up, num_class_embeds=a["num_classes"],
                       norm_num_groups=a["norm_groups"])


def scheduler(sampler: str, schedule: dict[str, Any] | None = None) -> DDPMScheduler | DDIMScheduler:
    """The noise schedule as a DDPM (ancestral) or DDIM (deterministic, 'trailing' spacing) sampler."""
    cfg = {**NOISE_SCHEDULE, **(schedule or {})}
    if sampler == "ddpm":
        return DDPMScheduler(**cfg)
    if sampler == "ddim":
        return DDIMScheduler(**cfg, timestep_spacing="trailing")
    raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


def sampling_layout(unet: UNet2DModel) -> UNet2DModel:
    """The UNet in channels_last (NHWC), in place: it samples faster in bf16 (scripts/benchmark_generators.py times
    both layouts). Like the thread count, the layout changes floating-point rounding, not what is sampled, so it is
    not part of a sample folder's provenance."""
    return unet.to(memory_format=torch.channels_last)


@torch.no_grad()
def generate(unet: UNet2DModel, labels: torch.Tensor, gen: torch.Generator, sampler: str = "ddim",
             steps: int | None = None, schedule: dict[str, Any] | None = None, autocast: bool = False,
             clamp: bool = True) -> torch.Tensor:
    """Images in [-1, 1] (or, with clamp=False, unclamped latents) for the given class indices. `steps` defaults to
    50 for DDIM, all train steps for DDPM."""
    sched = scheduler(sampler, schedule)
    sched.set_timesteps(steps or (50 if sampler == "ddim" else sched.config.num_train_timesteps))
    unet.eval()
    device = next(unet.parameters()).device
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(len(labels), channels, size, size, generator=gen).to(device) * sched.init_noise_sigma
    labels = labels.to(device)
    for t in sched.timesteps:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            eps = unet(x, t, class_labels=labels).sample
        x = sched.step(eps.float(), t, x, generator=gen).prev_sample
    return x.clamp(-1, 1) if clamp else x


class DDPMTrainer:
    """UNet + EMA + AdamW with warm-up and cosine decay; `train_step` takes a uint8 batch of real images."""

    kind = "ddpm"
    schedule = NOISE_SCHEDULE

    def __init__(self, arch: dict[str, Any], lr: float, device: torch.device, total_steps: int,
                 warmup_steps: int = 500, ema_decay: float = 0.999, autocast: bool = False):
        self.device, self.autocast, self.arch = device, autocast, dict(arch)
        self.unet = build_unet({"arch_kwargs": arch}).to(device)
        self.ema = EMA(self.unet, ema_decay)
        self.noise = scheduler("ddpm")
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=lr, weight_decay=0.0)
        self.sched = warmup_cosine(self.opt, total_steps, min(warmup_steps, max(1, total_steps // 10)))
        self.steps = 0

    def model_space(self, x: torch.Tensor) -> torch.Tensor:
        """A training batch as the UNet sees it: uint8 images -> [-1, 1]."""
        return to_signed(x.to(self.device))

    def train_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        self.unet.train()
        x0, y = self.model_space(x), y.to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(x0),), generator=gen).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.unet(self.noise.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.unet)
        self.steps += 1
        return {"loss": loss.item(), "lr": self.sched.get_last_lr()[0]}

    def generate(self, labels: torch.Tensor, gen: torch.Generator, steps: int = 50) -> torch.Tensor:
        return generate(self.ema.module, labels, gen, "ddim", steps, self.schedule, autocast=self.autocast)

    def export(self) -> UNet2DModel:
        return self.ema.module

    def state_dict(self) -> dict[str, Any]:
        return {"unet": self.unet.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.steps = state["steps"]
