r"""Filter synthetic lesions with a classifier, as one more dataset configuration for studies/synthetic_data.py.

    # CPU: score 7,808 latent diffusion samples (two seeds' folders) with the shipped default (about 5 minutes on one
    # thread) and keep the 3,904 it finds most malignant: runs/synthetic_data/manifests/ldm_filtered.csv
    python generators/sample.py --checkpoint runs/generators/ldm_perceptual_fixed_final.safetensors \
        --classes malignant --n 3904 --seed 1 --out runs/generators/synthetic/ldm_s1 --threads 1
    python studies/filter_synthetic.py --samples runs/generators/synthetic/ldm/samples.csv \
        runs/generators/synthetic/ldm_s1/samples.csv --threads 1

The filter the seed proposes: drop the samples a strong classifier rejects. Per class, the samples with the highest
probability of the class they were generated for are kept, as many as balancing `fit` needs (data/configs.needed),
and listed as source `ldm_filtered`; the configuration then differs from `ldm_aug` only in which synthetic images it
adds (real `val`, `calib` and `test` are untouched, and the classifier never saw these images). Writes
<out>/ldm_filtered.csv and <out>/ldm_filtered_scores.csv (every scored sample, its probability and whether it was kept).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from classifiers.models import load_classifier
from classifiers.predict import predict_proba
from classifiers.shipped import resolve_classifier
from data import configs, paths
from data.cache import CachedImages
from data.manifest import read_manifest, write_manifest
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from data.transforms import Preprocess


def score(samples: pd.DataFrame, checkpoint: str, device) -> pd.DataFrame:
    """The samples that decode, with the classifier's probability of the class each was generated for."""
    model, meta = load_classifier(checkpoint)
    data = CachedImages(samples, meta["input_size"], meta["resize"])
    probs = predict_proba(model.to(device), data.images, Preprocess.from_meta(meta), device)
    classes = list(meta["class_names"])
    own = [probs[i, classes.index(label)] for i, label in enumerate(data.df["label"])]
    return data.df.assign(prob_own_class=own)


def keep_best(scored: pd.DataFrame, counts: dict[str, int]) -> pd.DataFrame:
    """Per class, the counts[class] samples with the highest probability of their own class."""
    kept = []
    for label, n in counts.items():
        pool = scored[scored["label"] == label]
        if n > len(pool):
            raise UserError(f"{n} {label} samples are needed and only {len(pool)} were scored; sample more")
        kept.append(pool.nlargest(n, "prob_own_class"))
    return pd.concat(kept)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", required=True,
                   help="samples.csv lists of latent diffusion samples (generators/sample.py)")
    p.add_argument("--classifier", default=None,
                   help="the classifier that filters: a shipped name or a path (default: the hybrid's default)")
    p.add_argument("--original", default=str(paths.MANIFESTS / "original.csv"), help="real manifest")
    p.add_argument("--out", default=str(paths.RUNS / "synthetic_data" / "manifests"), help="manifests folder")
    p.add_argument("--ratio", type=float, default=1.0, help="minority:majority ratio of fit after adding (1: 1:1)")
    add_runtime_options(p, seed=0)
    a = p.parse_args(argv)
    device = init_device(a.device, a.threads)
    samples = pd.concat([read_manifest(s) for s in a.samples], ignore_index=True)
    if set(samples["source"]) != {"ldm"}:
        raise UserError(f"--samples must list latent diffusion samples (source ldm), not "
                        f"{sorted(set(samples['source']))}")
    counts = {k: n for k, n in configs.needed(read_manifest(a.original), a.ratio).items() if n > 0}
    classifier = str(resolve_classifier(a.classifier))
    scored = score(samples, classifier, device)
    kept = keep_best(scored, counts)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scored.assign(kept=scored.index.isin(kept.index)).to_csv(out / "ldm_filtered_scores.csv", index=False)
    listed = out / "ldm_filtered_samples.csv"
    write_manifest(kept.drop(columns="prob_own_class").assign(source="ldm_filtered"), listed,
                   {"filter": "highest probability of the generated class", "classifier": classifier,
                    "scored": len(scored), "kept": counts})
    written = configs.build_configs(a.original, [listed], out, a.ratio, a.seed, names=["ldm_filtered"])
    lowest = kept.groupby("label")["prob_own_class"].min().round(3).to_dict()
    print(f"kept {len(kept)} of {len(scored)} samples (lowest kept probability per class: {lowest}); "
          f"wrote {written['ldm_filtered']}")


if __name__ == "__main__":
    main()
