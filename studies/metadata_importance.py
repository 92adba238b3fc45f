"""Which inputs carry a metadata-fusion decision? Permutation importance of image score, age, sex and site.

A late-fusion logistic regression on [logit of the classifier's P(malignant), age/100, age missing, one-hot sex,
one-hot site] (the encoding of studies/metadata_fusion.py) is fit on HAM10000 `val`; its permutation importance
is measured on HAM10000 `calib`, which neither the classifier nor the regression saw: for each input group, the AUC
lost when that group's columns are shuffled across images. The 95% CI comes from 1000 seeded bootstrap resamples of
the calib images, each with a fresh shuffle. The fused model's AUC is reported beside the image score alone (paired
bootstrap CI of the difference) and the all-malignant baseline. `test` is not used: this is an analysis on the
validation side, not a reported result of a model.

    python studies/metadata_importance.py                      # the shipped default classifier, CPU
    python studies/metadata_importance.py --classifier densenet121 --out results/metadata_importance/densenet121
    # one GPU: add --device cuda (only the image scores run there); several GPUs gain nothing here.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from classifiers.models import load_classifier
from classifiers.predict import predict_proba
from classifiers.shipped import resolve_classifier
from data.atomic import write_rows
from data.cache import CachedImages
from data.manifest import read_manifest
from data.paths import MANIFESTS, RESULTS
from data.runtime import add_runtime_options, cli_main, init_device
from data.transforms import Preprocess
from evaluation.metrics import auc, paired_auc_difference
from evaluation.plots import save_figure
from studies.metadata_fusion import encode_metadata, metadata_vocabulary


def design(scores: np.ndarray, df: pd.DataFrame, vocabulary: dict[str, list[str]]) -> tuple[np.ndarray, dict]:
    """Columns [image logit | age, age missing | sex one-hots | site one-hots] and each group's column indices."""
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    meta = encode_metadata(df, vocabulary).numpy()
    n_sex = len(vocabulary["sex"]) + 1
    x = np.column_stack([np.log(p / (1 - p)), meta])
    groups = {"image score": [0], "age": [1, 2], "sex": list(range(3, 3 + n_sex)),
              "site": list(range(3 + n_sex, x.shape[1]))}
    return x, groups


def permutation_importance(model, x: np.ndarray, y: np.ndarray, groups: dict[str, list[int]], n_boot: int,
                           seed: int) -> pd.DataFrame:
    """Per group: AUC(all inputs) - AUC(group shuffled), mean and 95% CI over bootstrap resamples of the images."""
    rng = np.random.default_rng(seed)
    drops = {name: [] for name in groups}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        xb, yb = x[idx], y[idx]
        full = auc(yb, model.decision_function(xb))
        for name, cols in groups.items():
            shuffled = xb.copy()
            shuffled[:, cols] = xb[rng.permutation(len(yb))][:, cols]
            drops[name].append(full - auc(yb, model.decision_function(shuffled)))
    return pd.DataFrame([{"input": name, "auc_drop": float(np.mean(v)), "ci_low": float(np.percentile(v, 2.5)),
                          "ci_high": float(np.percentile(v, 97.5)), "n_boot": len(v)} for name, v in drops.items()])


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=None, help="checkpoint or shipped name (default: the shipped default)")
    p.add_argument("--manifest", default=str(MANIFESTS / "mixed.csv"),
                   help="manifest with HAM10000 val and calib rows and their age, sex, site")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of calib")
    add_runtime_options(p, seed=0)
    p.add_argument("--out", default=None, help="output folder (default: results/metadata_importance/<name>)")
    a = p.parse_args(argv)
    if a.n_boot < 10:
        p.error("--n-boot must be at least 10")
    device = init_device(a.device, a.threads)
    path = resolve_classifier(a.classifier)
    model, meta = load_classifier(path)
    model = model.to(device)
    df = read_manifest(a.manifest)
    df = df[df["dataset"] == "ham10000"]
    parts = {split: CachedImages(df[df["split"] == split], meta["input_size"], meta["resize"])
             for split in ("val", "calib")}
    prep = Preprocess.from_meta(meta)
    scores = {s: predict_proba(model, part.images, prep, device)[:, 1] for s, part in parts.items()}
    vocabulary = metadata_vocabulary(parts["val"].df)
    (x_val, groups), (x_cal, _) = (design(scores[s], parts[s].df, vocabulary) for s in ("val", "calib"))
    y_val, y_cal = parts["val"].targets.numpy(), parts["calib"].targets.numpy()
    fusion = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(x_val, y_val)
    table = permutation_importance(fusion, x_cal, y_cal, groups, a.n_boot, a.seed)
    fused = fusion.decision_function(x_cal)
    diff, lo, hi = paired_auc_difference(y_cal, fused, scores["calib"], a.n_boot, a.seed)
    summary = pd.DataFrame([
        {"input": "fused AUC", "auc_drop": auc(y_cal, fused)},
        {"input": "image score alone AUC", "auc_drop": auc(y_cal, scores["calib"])},
        {"input": "fused - image alone (paired)", "auc_drop": diff, "ci_low": lo, "ci_high": hi},
        {"input": "all-malignant baseline AUC", "auc_drop": 0.5}])
    table = pd.concat([table, summary], ignore_index=True).assign(
        classifier=path.stem, split="calib (ham10000)", n=len(y_cal), n_malignant=int(y_cal.sum()))
    out = Path(a.out or RESULTS / "metadata_importance" / path.stem)
    write_rows(out / "permutation_importance.csv", table.to_dict("records"))
    bars = table[table["n_boot"].notna()]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    err = [bars["auc_drop"] - bars["ci_low"], bars["ci_high"] - bars["auc_drop"]]
    ax.barh(bars["input"], bars["auc_drop"], xerr=err, color="tab:blue", capsize=4)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set(xlabel="AUC lost when the input is shuffled (95% bootstrap CI)",
           title=f"Late fusion on {path.stem}: HAM10000 calib (n={len(y_cal)})")
    save_figure(fig, out / "permutation_importance.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


if __name__ == "__main__":
    main()
