"""Pieces every training loop here shares: EMA of weights, warm-up + cosine schedule, resumable state.

Training state (model, EMA, optimizer, scheduler, epoch, history) is our own file, written atomically at the end of
each epoch and read back with `torch.load(weights_only=True)`, which restores tensors and plain containers and
cannot execute code. Shipped weights never use this format: they go through data/checkpoint.py (safetensors).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.atomic import tmp_path
from data.runtime import UserError


class EMA:
    """Exponential moving average of parameters; buffers (BatchNorm statistics) are copied from the live model."""

    def __init__(self, model: nn.Module, decay: float = 0.998):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"], strict=True)
        self.steps = state["steps"]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


class ResumeError(UserError):
    """A run's state file cannot be read (truncated, foreign): resuming would silently start over."""


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why, do not start over silently
        raise ResumeError(f"cannot resume from {path}: {exc.__class__.__name__}: {str(exc)[:200]}") from None
