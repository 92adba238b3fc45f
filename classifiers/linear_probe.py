r"""Linear probe: a frozen EfficientNet-Lite backbone + logistic regression on its pooled features, saved as an
ordinary classifier checkpoint, so it is evaluated, served and compared exactly like a fine-tuned model.

It measures what the ImageNet weights alone are worth: the row beside the fine-tuned model (and, with
`--random-init`, the same probe on a random backbone: the control that shows the weights, not the head, carry it).

    # CPU (2 cores; about 5 minutes for 2,000 fit images):
    python classifiers/linear_probe.py --manifest data/manifests/mixed.csv --fit-images 2000 --out runs/lite0_probe
    python classifiers/linear_probe.py --manifest data/manifests/mixed.csv --fit-images 2000 --random-init \
        --out runs/lite0_probe_random
    # one GPU: add --device cuda (the features are computed there); several GPUs gain nothing for this size.
    python classifiers/evaluate.py --checkpoint runs/lite0_probe/best.safetensors --manifest data/manifests/mixed.csv

The regularisation C is chosen by grouped 5-fold cross-validation on the fit images (groups: lesion), the
decision threshold by Youden's J on `val`; nothing looks at `test` or `external`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from tqdm import tqdm

from classifiers.models import NATIVE_SIZE, NORMALIZATION, Classifier, create_model
from classifiers.predict import model_inputs, predict_proba
from classifiers.train import val_score
from data.cache import CachedImages
from data.checkpoint import save_checkpoint
from data.manifest import LABELS, file_sha256, read_manifest, stratified_subset
from data.paths import MANIFESTS, RUNS
from data.runtime import add_runtime_options, cli_main, init_device, seed_everything
from data.transforms import COLOR_CONSTANCY, Preprocess, preprocess_meta
from evaluation.metrics import choose_threshold, decision_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="efficientnet_lite0", choices=sorted(NATIVE_SIZE), help="backbone")
    p.add_argument("--manifest", default=str(MANIFESTS / "mixed.csv"), help="manifest CSV")
    p.add_argument("--fit-images", type=int, default=2000, help="fit images used (stratified subset; 0: all)")
    p.add_argument("--color-constancy", default="shades_of_gray", choices=COLOR_CONSTANCY, help="as in training")
    p.add_argument("--random-init", action="store_true", help="control: a random backbone instead of ImageNet")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_runtime_options(p, seed=0)
    p.add_argument("--out", default=str(RUNS / "lite0_probe"), help="run folder (best.safetensors/.json)")
    args = p.parse_args(argv)
    if args.fit_images < 0 or args.batch_size < 1:
        p.error("--fit-images must be >= 0 and --batch-size >= 1")
    return args


@torch.no_grad()
def pooled_features(model: Classifier, images: np.ndarray, preprocess: Preprocess, device: torch.device,
                    batch_size: int) -> np.ndarray:
    batches = tqdm(model_inputs(images, preprocess, device, batch_size), desc="features", unit="batch",
                   total=-(-len(images) // batch_size))
    return np.concatenate([model.forward_features(x).float().cpu().numpy() for x in batches])


def fit_head(model: Classifier, features: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> float:
    """Logistic regression on standardised features (C by grouped CV), folded into the model's 2-logit head so
    that softmax gives sigmoid(w.x + b). Returns the chosen C."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    folds = list(GroupKFold(n_splits=5).split(features, y, groups))
    clf = LogisticRegressionCV(Cs=np.logspace(-4, 1, 11).tolist(), cv=folds, scoring="roc_auc",
                               class_weight="balanced", max_iter=3000, random_state=seed)
    clf.fit((features - mean) / std, y)
    w = clf.coef_[0] / std
    b = clf.intercept_[0] - float((w * mean).sum())
    linear = model.head[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(np.stack([-w / 2, w / 2]), dtype=torch.float32))
        linear.bias.copy_(torch.tensor([-b / 2, b / 2], dtype=torch.float32))
    return float(clf.C_[0])


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = init_device(args.device, args.threads)
    seed_everything(args.seed)
    manifest = Path(args.manifest)
    df = read_manifest(manifest)
    fit_df = df[df["split"] == "fit"]
    fit_df = stratified_subset(fit_df, args.fit_images, args.seed) if args.fit_images else fit_df
    val_df = df[df["split"] == "val"]
    size = NATIVE_SIZE[args.arch]
    prep_meta = preprocess_meta(size, "squash", NORMALIZATION[args.arch], args.color_constancy)
    preprocess = Preprocess.from_meta(prep_meta)
    model = create_model(args.arch, pretrained=not args.random_init).to(device).eval()
    fit, val = CachedImages(fit_df, size), CachedImages(val_df, size)
    groups = fit.df["lesion_id"].fillna(fit.df["path"]).to_numpy() if "lesion_id" in fit.df else fit.df["path"]
    c = fit_head(model, pooled_features(model, fit.images, preprocess, device, args.batch_size),
                 fit.targets.numpy(), np.asarray(groups), args.seed)
    probs = predict_proba(model, val.images, preprocess, device, args.batch_size)
    y_val = val.targets.numpy()
    val_auc, per_source = val_score(val.df, y_val, probs)
    threshold = choose_threshold(y_val, probs[:, 1], "youden", "val")
    meta = {
        "kind": "classifier", "arch": args.arch, "arch_kwargs": {}, **prep_meta, "class_names": list(LABELS),
        "target": "label", "malignant_threshold": threshold, "threshold_rule": "youden", "threshold_split": "val",
        "manifest": manifest.name, "manifest_sha256": file_sha256(manifest), "init": model.init_note,
        "linear_probe": {"C": c, "fit_images": len(fit), "cv": "grouped 5-fold on fit, by lesion"},
        "train_args": vars(args),
        "metrics": {"val": {"auc": val_auc, "n": len(y_val), **{f"auc_{k}": v for k, v in per_source.items()},
                            **decision_metrics(y_val, probs[:, 1] >= threshold)}},
    }
    save_checkpoint(Path(args.out) / "best", model, meta)
    print(f"{args.arch} linear probe ({model.init_note}): C={c:g} on {len(fit)} fit images; val AUC {val_auc:.4f} "
          + "".join(f"({k} {v:.4f}) " for k, v in per_source.items()) + f"-> {args.out}")


if __name__ == "__main__":
    main()
