"""Evaluate one checkpoint (or an ensemble) on manifest splits or a folder; write metrics, predictions and plots.

    python classifiers/evaluate.py --checkpoint checkpoints/densenet121.safetensors --splits test external
    python classifiers/evaluate.py --checkpoint a.safetensors b.safetensors --tta      # ensemble + flip TTA
    python classifiers/evaluate.py --checkpoint X.safetensors --folder my_images/     # <benign|malignant>/ subfolders
    # GPU: add --device cuda (the same outputs, faster). Several GPUs: run one process per checkpoint.

The decision threshold is the one stored in the (first) checkpoint's sidecar, chosen on `val` at training time;
nothing here looks at test labels to choose anything. Every metrics row (one per dataset and split) comes with the
all-malignant baseline beside it and a bootstrap 95% CI on the AUC. Outputs in --out: metrics.csv,
predictions.csv (path,label,prob_malignant,pred,...), and per dataset/split a confusion matrix and ROC/PR PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from classifiers.models import load_classifier
from classifiers.predict import predict_proba
from data.cache import CachedImages
from data.checkpoint import CheckpointError
from data.manifest import file_sha256, label_index, read_folder, read_manifest, split_label
from data.paths import MANIFESTS, ROOT, RUNS
from data.runtime import add_runtime_options, cli_main, init_device
from data.transforms import Preprocess
from evaluation import plots
from evaluation.metrics import baseline_row, metrics_row


def evaluation_groups(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Split rows into named evaluation sets: `<dataset>/<split>`, and ISIC's official splits kept apart."""
    keys = [c for c in ("dataset", "split", "official_split") if c in df.columns]
    groups = {}
    for values, part in df.groupby(keys, dropna=False, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        named = dict(zip(keys, values))
        groups[f"{named.get('dataset', 'data')}/{split_label(named['split'], named.get('official_split'))}"] = part
    return groups


class TrainingOverlap(ValueError):
    """Evaluation rows that the checkpoint was trained or selected on."""


def recorded_training_manifest(meta: dict, manifests: Path = MANIFESTS) -> Path | None:
    """The manifest the checkpoint was trained on, if it is still here unchanged (its sha256 is the recorded one):
    looked up by name in `manifests`, then at the path its training command was given (e.g. a grid's own folder)."""
    name, path = meta.get("manifest"), (meta.get("train_args") or {}).get("manifest")
    # A relative path was relative to where training ran: try the repository root and the current folder.
    candidates = ([manifests / name] if name else []) + ([ROOT / path, Path(path)] if path else [])
    return next((c for c in candidates if c.is_file() and file_sha256(c) == meta.get("manifest_sha256")), None)


def training_manifest(meta: dict, manifests: Path = MANIFESTS) -> Path:
    """The default evaluation manifest of every CLI, so that its held-out splits are the checkpoint's own: the one
    it was trained on (`recorded_training_manifest`), else one of that name in `manifests`, else `original.csv`."""
    named = manifests / str(meta.get("manifest", ""))
    return (recorded_training_manifest(meta, manifests)
            or (named if meta.get("manifest") and named.is_file() else manifests / "original.csv"))


def check_no_training_overlap(meta: dict, df: pd.DataFrame, manifests: Path = MANIFESTS) -> None:
    """Refuse to score images the checkpoint saw in `fit` or `val` (e.g. ISIC 2017 train rows, `external` in the
    original manifest, scored by a model trained on the mixed one). Checked when the training manifest is found
    unchanged (`recorded_training_manifest`)."""
    train_manifest = recorded_training_manifest(meta, manifests)
    if train_manifest is None:
        return
    trained = read_manifest(train_manifest).query("split in ('fit', 'val')")
    seen = df["path"].isin(set(trained["path"]))
    if seen.any():
        raise TrainingOverlap(f"{int(seen.sum())} of the {len(df)} evaluation images are in the fit/val splits of "
                              f"{train_manifest.name}, which this checkpoint was trained on (e.g. "
                              f"{Path(df.loc[seen, 'path'].iloc[0]).name}); evaluate on its own manifest")


def predict_ensemble(
    checkpoints: list[str], df: pd.DataFrame, device, tta: bool
) -> tuple[np.ndarray, dict, pd.DataFrame]:
    """Mean P(malignant) over checkpoints; returns (probs, first sidecar, rows that decoded)."""
    probs, first_meta, kept = [], None, None
    for path in checkpoints:
        model, meta = load_classifier(path)
        check_no_training_overlap(meta, df)
        model = model.to(device)
        data = CachedImages(df, meta["input_size"], meta["resize"])
        kept = data.df
        probs.append(predict_proba(model, data.images, Preprocess.from_meta(meta), device, tta=tta)[:, 1])
        first_meta = first_meta or meta
    return np.mean(probs, axis=0), first_meta, kept


def evaluate(
    checkpoints: list[str],
    df: pd.DataFrame,
    out: Path,
    device,
    tta: bool = False,
    threshold: float | None = None,
    model_name: str | None = None,
    plot: bool = True,
) -> pd.DataFrame:
    probs, meta, kept = predict_ensemble(checkpoints, df, device, tta)
    threshold = meta["malignant_threshold"] if threshold is None else threshold
    threshold_split = meta["threshold_split"] if len(checkpoints) == 1 else "val (first checkpoint)"
    name = model_name or "+".join(Path(c).stem for c in checkpoints) + ("+tta" if tta else "")
    kept = kept.assign(prob_malignant=probs, pred=(probs >= threshold).astype(int), y=label_index(kept["label"]))
    rows = []
    for group, part in evaluation_groups(kept).items():
        dataset, split = group.split("/", 1)
        common = {"config": meta.get("config", ""), "dataset": dataset, "split": split}
        rows.append(
            metrics_row(
                part["y"],
                part["prob_malignant"],
                threshold,
                model=name,
                **common,
                threshold_split=threshold_split,
                threshold_rule=meta.get("threshold_rule", ""),
                prob=part["prob_malignant"],
            )
        )
        rows.append(baseline_row(part["y"], **common))
        if plot:
            slug = group.replace("/", "_")
            plots.confusion_matrices({f"{name} {group}": (part["y"], part["pred"])}, out / f"confusion_{slug}.png")
            plots.roc_pr({name: (part["y"], part["prob_malignant"])}, out / f"roc_pr_{slug}.png", group)
    out.mkdir(parents=True, exist_ok=True)
    metrics = pd.DataFrame(rows)
    metrics.to_csv(out / "metrics.csv", index=False)
    columns = [c for c in ("path", "label", "prob_malignant", "pred", "split", "official_split", "dataset", "dx")
               if c in kept.columns]
    kept[columns].to_csv(out / "predictions.csv", index=False)
    return metrics


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="one checkpoint, or several for an ensemble")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--splits", nargs="+", default=["test", "external"], help="manifest splits to evaluate")
    p.add_argument("--folder", default=None, help="evaluate a folder <benign|malignant>/* instead of a manifest")
    p.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips")
    p.add_argument("--threshold", type=float, default=None, help="override the sidecar's malignant_threshold")
    p.add_argument("--name", default=None, help="model name in the metrics rows (default: checkpoint stems)")
    p.add_argument("--out", default=str(RUNS / "evaluation"), help="output folder")
    add_runtime_options(p)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    if a.folder:
        df = read_folder(a.folder, split="test").assign(dataset=Path(a.folder).name)
    else:
        df = read_manifest(a.manifest)
        df = df[df["split"].isin(a.splits)]
    try:
        metrics = evaluate(a.checkpoint, df, Path(a.out), device, a.tta, a.threshold, a.name)
    except (CheckpointError, FileNotFoundError, TrainingOverlap) as exc:
        sys.exit(f"error: {exc}")
    cols = [
        "model",
        "dataset",
        "split",
        "n",
        "auc",
        "auc_ci_low",
        "auc_ci_high",
        "sensitivity",
        "specificity",
        "balanced_accuracy",
    ]
    print(metrics[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {a.out}/metrics.csv and predictions.csv")
    return metrics


if __name__ == "__main__":
    main()
