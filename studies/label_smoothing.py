"""Does label smoothing help the fine-tuned EfficientNet-Lite0? Each arm trained with several seeds, so the answer is
read against the seed-noise floor, not against one lucky run (studies/arms.py runs and reports it).

    # CPU: 2 arms x 3 seeds of a short Lite0 fine-tune at 160 px (about 10 minutes a run on one thread); resumable
    python studies/label_smoothing.py --threads 1
    # one GPU, or several (give each process its own --seeds, then run once more with --report-only)
    python studies/label_smoothing.py --device cuda --seeds 0 1 2 3 4
    CUDA_VISIBLE_DEVICES=1 python studies/label_smoothing.py --device cuda --seeds 5 6 7 &

Every run is the shipped default's recipe (README, "Shipped default": ImageNet Lite0, HAM10000 fit + ISIC 2017
train-fit, Shades of Gray, source/class balancing, strong augmentation, discriminative learning rates) on a shorter
budget (SHORT), with `--label-smoothing` the only difference between arms. Report: results/label_smoothing/ (runs.csv,
summary.csv, label_smoothing.png; see studies/arms.py).
"""
from __future__ import annotations

import argparse

from data import paths
from studies import arms

SHORT = {"arch": "efficientnet_lite0", "pretrained": "imagenet", "config": "mixed", "img_size": 160,
         "color_constancy": "shades_of_gray", "balance": "source_class", "class_weights": "none", "epoch_size": 2000,
         "epochs": 2, "patience": 2, "lr": 1e-3, "backbone_lr_scale": 0.3, "weight_decay": 0.01,
         "warmup_epochs": 0.3, "crop_scale": 0.35, "jitter": 0.3, "cutout": 0.5, "occlusion": 0.3}
SMOOTHING = {"none": 0.0, "smoothing_0.1": 0.1}  # arm -> --label-smoothing; the first arm is the reference


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=str(paths.MANIFESTS / "mixed.csv"), help="multi-source manifest")


def smoothing_arms(a: argparse.Namespace) -> arms.Arms:
    return {name: {"label_smoothing": value, "manifest": str(a.manifest)} for name, value in SMOOTHING.items()}


STUDY = arms.Study("label_smoothing", SHORT, smoothing_arms, "build it with python scripts/01_prepare_data.py --mixed",
                   reported=("label_smoothing",), add_options=add_options)


def main(argv: list[str] | None = None) -> None:
    arms.main(STUDY, __doc__, list(SMOOTHING), argv)


if __name__ == "__main__":
    main()
