"""Does patient metadata help? Image-only against image + (age, sex, site) fusion, same architecture and budget.

    # CPU (2 cores): DenseNet-121 at 96 px, 3 epochs per arm (about 15 minutes on 1 thread)
    python studies/metadata_fusion.py --img-size 96 --epochs 3 --threads 1
    # one GPU: a fuller budget
    python studies/metadata_fusion.py --img-size 224 --epochs 20 --device cuda
    # several GPUs: not worth it; run the two arms on two GPUs with --arms image / --arms fusion and --report-only

Both arms are the same model but for the metadata branch: the registry backbone's pooled features, dropout and a
linear head. The fusion arm encodes HAM10000's metadata as [age/100, age missing, one-hot sex (+unknown), one-hot site
(+unknown)], passes it through a small MLP (-> 32) and concatenates it with the pooled image features before a
linear head; unknown sex/site and missing age are their own categories, so no row is dropped. Both arms share the
seed, fit images, augmentation, optimiser and schedule; each selects its epoch on `val` AUC. Reported on HAM10000
`test`: AUC with 95% CI per arm and AUC(fusion) - AUC(image) with a paired bootstrap CI (same images), in
--out/metadata_fusion.csv. The fusion model is an experiment only: the shipped pipeline takes images alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from classifiers.models import create_model, list_models
from data.atomic import write_rows
from data.cache import CachedImages
from data.manifest import read_manifest, stratified_subset
from data.paths import MANIFESTS, RESULTS
from data.runtime import add_runtime_options, cli_main, init_device, seed_everything
from data.training import EMA, warmup_cosine
from data.transforms import Preprocess, augment, preprocess_meta
from evaluation.metrics import auc, auc_ci, paired_auc_difference


def metadata_vocabulary(fit: pd.DataFrame) -> dict[str, list[str]]:
    """Categories seen in `fit` (so val/test values unseen in fit fall into `unknown`)."""
    return {c: sorted(fit[c].dropna().astype(str).unique()) for c in ("sex", "site")}


def encode_metadata(df: pd.DataFrame, vocabulary: dict[str, list[str]]) -> torch.Tensor:
    age = pd.to_numeric(df["age"], errors="coerce")
    columns = [age.fillna(0).to_numpy() / 100.0, age.isna().to_numpy(dtype=float)]
    for name, values in vocabulary.items():
        column = df[name].astype("string")
        columns += [(column == v).fillna(False).to_numpy(dtype=float) for v in values]
        columns.append((~column.isin(values)).fillna(True).to_numpy(dtype=float))  # unknown or unseen
    return torch.as_tensor(np.stack(columns, axis=1), dtype=torch.float32)


class MetadataFusion(nn.Module):
    """Pooled image features of a registry backbone, concatenated with an MLP embedding of the metadata
    (`n_metadata=0`: image features alone, the same head otherwise), then dropout and one linear layer."""

    def __init__(self, arch: str, n_metadata: int, img_size: int, embed: int = 32):
        super().__init__()
        self.image = create_model(arch, img_size=img_size)
        self.metadata = (nn.Sequential(nn.Linear(n_metadata, 64), nn.ReLU(), nn.Linear(64, embed), nn.ReLU())
                         if n_metadata else None)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.image.num_features + (embed if n_metadata else 0), 2))

    def forward(self, x: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        features = self.image.forward_features(x)
        if self.metadata is not None:
            features = torch.cat([features, self.metadata(metadata)], dim=1)
        return self.head(features)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, metadata: torch.Tensor, prep: Preprocess, device) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), 64):
        x = prep.tensor(torch.from_numpy(np.ascontiguousarray(images[i:i + 64])).permute(0, 3, 1, 2).to(device))
        out.append(model(x, metadata[i:i + 64].to(device)).float().softmax(1)[:, 1].cpu().numpy())
    return np.concatenate(out)


def train_arm(arm: str, a: argparse.Namespace, data: dict, device) -> np.ndarray:
    """Train one arm; return its test P(malignant) from the epoch with the best val AUC."""
    seed_everything(a.seed)
    fit, n_meta = data["fit"], data["fit_meta"].shape[1]
    model = MetadataFusion(a.arch, n_meta if arm == "fusion" else 0, a.img_size).to(device)
    ema = EMA(model, 0.998)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    steps = len(fit) // a.batch_size
    scheduler = warmup_cosine(optimizer, steps * a.epochs, max(1, steps // 2))
    weight = torch.tensor([1.0, (fit.targets == 0).sum().item() / max(1, (fit.targets == 1).sum().item())]) ** 0.5
    best, best_test = -1.0, None
    for epoch in range(a.epochs):
        gen = torch.Generator().manual_seed(a.seed * 1000 + epoch)
        order = torch.randperm(len(fit), generator=gen)[: steps * a.batch_size].view(steps, a.batch_size)
        model.train()
        for idx in tqdm(order, desc=f"{arm} epoch {epoch + 1}/{a.epochs}", disable=a.no_progress):
            x = torch.from_numpy(fit.images[idx.numpy()]).permute(0, 3, 1, 2).to(device)
            x = data["prep"].tensor(augment(x, gen))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type in ("cpu", "cuda")):
                logits = model(x, data["fit_meta"][idx].to(device))
            loss = F.cross_entropy(logits.float(), fit.targets[idx].to(device), weight=weight.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema.update(model)
        val_auc = auc(data["val"].targets.numpy(), predict(ema.module, data["val"].images, data["val_meta"],
                                                           data["prep"], device))
        print(f"{arm} epoch {epoch + 1}: val AUC {val_auc:.4f}", flush=True)
        if val_auc > best:
            best = val_auc
            best_test = predict(ema.module, data["test"].images, data["test_meta"], data["prep"], device)
    return best_test


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="densenet121", choices=list_models(), help="architecture of both arms")
    p.add_argument("--img-size", type=int, default=96, help="input size")
    p.add_argument("--epochs", type=int, default=3, help="epochs per arm")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--limit", type=int, default=None, help="at most this many fit images (val, test: a quarter)")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"), help="manifest CSV")
    p.add_argument("--out", default=str(RESULTS / "metadata_fusion"), help="output folder")
    add_runtime_options(p, seed=0, progress=True)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    df = read_manifest(a.manifest)
    df = df[df["dataset"] == "ham10000"]
    parts = {s: df[df["split"] == s] for s in ("fit", "val", "test")}
    if a.limit:
        parts = {s: stratified_subset(part, a.limit if s == "fit" else a.limit // 4, a.seed)
                 for s, part in parts.items()}
    vocabulary = metadata_vocabulary(parts["fit"])
    data: dict = {"prep": Preprocess.from_meta(preprocess_meta(a.img_size))}
    for split, part in parts.items():
        data[split] = CachedImages(part, a.img_size)
        data[f"{split}_meta"] = encode_metadata(data[split].df, vocabulary)
    y = data["test"].targets.numpy()
    probs = {arm: train_arm(arm, a, data, device) for arm in ("image", "fusion")}
    rows = []
    for arm, prob in probs.items():
        point, lo, hi = auc_ci(y, prob)
        rows.append({"arm": arm, "dataset": "ham10000", "split": "test", "n": len(y), "auc": point,
                     "auc_ci_low": lo, "auc_ci_high": hi})
    diff, lo, hi = paired_auc_difference(y, probs["fusion"], probs["image"])
    rows.append({"arm": "fusion - image (paired)", "dataset": "ham10000", "split": "test", "n": len(y),
                 "auc": diff, "auc_ci_low": lo, "auc_ci_high": hi})
    rows.append({"arm": "all-malignant baseline", "dataset": "ham10000", "split": "test", "n": len(y), "auc": 0.5})
    table = pd.DataFrame(rows).assign(arch=a.arch, img_size=a.img_size, epochs=a.epochs, limit=a.limit or "all")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_rows(Path(a.out) / "metadata_fusion.csv", table.to_dict("records"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


if __name__ == "__main__":
    main()
