r"""Does distilling the fine-tuned EfficientNet-Lite0 help a student architecture? Each student trained from scratch
and distilled from the teacher (DeiT soft distillation, classifiers/distill.py), the same recipe otherwise, with
several seeds, read against the seed-noise floor (studies/arms.py runs and reports it).

    # CPU, one student per command (--set arch=...), its own runs and report folders; resumable. MedViT: about 7
    # minutes a scratch run and 25-35 a distilled one on one thread (the teacher sees every augmented image at 224 px)
    python studies/distillation.py --set arch=densenet121 --runs-dir runs/distillation/densenet121_raw \
        --out results/distillation/densenet121_raw --seeds 0 --threads 1
    python studies/distillation.py --set arch=medvit --runs-dir runs/distillation/medvit \
        --out results/distillation/medvit --seeds 0 1 --threads 1
    # one GPU, or several (each process its own student or --seeds, then once more with --report-only)
    python studies/distillation.py --set arch=swin --runs-dir runs/distillation/swin \
        --out results/distillation/swin --device cuda --seeds 0 1 2

The recipe is the shipped DenseNet-121's (scripts/09's long run: HAM10000 `fit` + ISIC 2017 train-`fit`, 128 px,
Shades of Gray, source/class balancing, light augmentation, 14 epochs of 6,000 images, the epoch chosen on the mean
of the two sources' val AUCs), except that both arms take the teacher's colour constancy (train.py applies it once
for both networks); `--teacher` is the only difference between the arms. The medvit and resnet50 results were
distilled from the default before (`--teacher runs/lite0_two_stage/efficientnet_lite0.safetensors`, Shades of Gray;
results/README.md says how to restore it). Report: --out (runs.csv,
summary.csv, distillation.png; see studies/arms.py).
"""
from __future__ import annotations

import argparse

from data import paths
from data.checkpoint import CheckpointError, read_sidecar
from data.runtime import UserError
from studies import arms, recipes

ARMS = ["scratch", "distilled"]  # the first arm is the reference


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=str(paths.MANIFESTS / "mixed.csv"), help="multi-source manifest")
    p.add_argument("--teacher", default=str(paths.CHECKPOINTS / "efficientnet_lite0.safetensors"),
                   help="the teacher classifier checkpoint (default: the shipped fine-tuned EfficientNet-Lite0)")


def teacher_color_constancy(teacher: str) -> str:
    """The teacher's colour constancy as a recipe value: train.py applies it once for both networks, so both arms
    take the teacher's (a `--set color_constancy=...` that differs is refused when the distilled run starts)."""
    try:
        return (read_sidecar(teacher).get("color_constancy") or {}).get("method", "none")
    except CheckpointError as exc:
        raise UserError(f"--teacher: {exc}") from None


def distillation_arms(a: argparse.Namespace) -> arms.Arms:
    common = {"manifest": str(a.manifest), "color_constancy": teacher_color_constancy(a.teacher)}
    return {"scratch": common, "distilled": {**common, "teacher": [a.teacher]}}


STUDY = arms.Study("distillation", recipes.SHIPPED_DENSENET, distillation_arms,
                   "build it with python scripts/01_prepare_data.py --mixed", add_options=add_options)


def main(argv: list[str] | None = None) -> None:
    arms.main(STUDY, __doc__, ARMS, argv)


if __name__ == "__main__":
    main()
