"""Knowledge distillation from a fine-tuned teacher checkpoint (DeiT's soft distillation, Touvron et al. 2021).

The student learns from the labels and from the teacher's softened probabilities on the *same augmented image*,
so the teacher runs inside the training loop (its logits cannot be precomputed once augmentation is random):

    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher keeps its own preprocessing from its sidecar (size, normalization); train.py augments the uint8 batch
once at the largest of the sizes and resizes it for whichever network needs less. All must use the same colour
constancy, because train.py applies it once, before augmentation.

Several teacher checkpoints make an ensemble teacher (ensemble distillation): its logits are the mean of the
members' logits, i.e. the normalised geometric mean of their probabilities at every temperature, so one student
can inherit what an ensemble gains at a fraction of its inference cost.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from classifiers.models import load_classifier
from data.transforms import Preprocess, resize_uint8


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al.'s scaling keeps the
    gradient size independent of T)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class Teacher:
    """Frozen classifier checkpoints (one, or an ensemble) that return logits for uint8 batches already
    colour-standardised: the mean of the members' logits."""

    def __init__(self, paths: list[str], device: torch.device, color_constancy: dict[str, Any] | None):
        self.members: list[tuple[torch.nn.Module, Preprocess]] = []
        for path in paths:
            model, meta = load_classifier(path)
            if meta.get("color_constancy") != color_constancy:
                raise ValueError(f"teacher {path} uses colour constancy {meta.get('color_constancy')}, the student "
                                 f"{color_constancy}: train the student with the teacher's setting")
            model = model.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
            self.members.append((model, Preprocess.from_meta(meta)))
        self.size = max(preprocess.size for _, preprocess in self.members)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor, autocast: dict[str, Any]) -> torch.Tensor:
        with torch.autocast(**autocast):
            return torch.stack([model(preprocess.normalize(resize_uint8(batch, preprocess.size))
                                      .contiguous(memory_format=torch.channels_last)).float()
                                for model, preprocess in self.members]).mean(0)
