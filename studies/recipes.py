"""Training recipes that more than one study (or numbered script) runs, as classifiers/train.py flags.

One definition each, so that a study that claims to use the shipped model's recipe cannot drift from it.
"""
from __future__ import annotations

# scripts/09's full DenseNet-121 recipe on both sources: every generalisation technique on.
RECIPE = {
    "arch": "densenet121", "img_size": 128, "color_constancy": "shades_of_gray", "balance": "source_class",
    "balance_power": 0.5, "class_weights": "none", "crop_scale": 0.3, "jitter": 0.4, "cutout": 0.5,
    "occlusion": 0.3, "epoch_size": 6000,
}
LIGHT_AUGMENTATION = {"crop_scale": 0.6, "jitter": 0.2, "cutout": 0.0, "occlusion": 0.0}
# The long run (the shipped DenseNet-121's): mixing, colour constancy and balancing with the light augmentation, 14
# epochs (chosen on the val curves of the first runs, where the four strong augmentations slowed learning; README).
LONG_LIGHT = {"epochs": 14, "patience": 5, **LIGHT_AUGMENTATION}
SHIPPED_DENSENET = {**RECIPE, **LONG_LIGHT, "config": "mixed"}
