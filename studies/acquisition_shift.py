r"""How does the shipped hybrid behave when the camera changes? The same lesions, re-imaged in software as another
device or clinic might deliver them: JPEG compression (quality 50 and 15), half and a quarter of the resolution,
defocus blur, sensor noise, a warm or cool white balance, under- and overexposure, and a 90-degree rotation (which
dermoscopy does not define).

Every condition is applied to the decoded image as stored (../shared/data holds HAM10000 at 200x150 and ISIC 2017 at
256x256), before the models' own preprocessing, and is deterministic (noise is seeded by the image's position in the
evaluation list). For each evaluation set and condition: the classifier's AUC
with its bootstrap 95% CI and the paired change against the unaltered images; sensitivity and specificity (exact 95%
CIs) of the classifier and of the hybrid at the shipped thresholds; the share of benign lesions the VAE finds
anomalous (what makes the rescue fire); the share of lesions the out-of-distribution gate refuses; and the
all-malignant baseline. Nothing is chosen here: every threshold is the one in the checkpoints' sidecars (val /
calib), and the decisions are counted over all images, whatever the gate says (its refusals are their own column).

    # CPU (about 4 minutes a condition for HAM10000 test + ISIC 2017 val on one thread; resumable per condition)
    python studies/acquisition_shift.py --threads 1
    python studies/acquisition_shift.py --conditions clean warm cool --limit 200   # a quick look
    python studies/acquisition_shift.py --sets "HAM10000 calib" --classifier <candidate>  # where a choice is made
    # one GPU: the same with --device cuda; several: one --conditions subset per GPU, then --report-only

Writes runs/acquisition_shift/<sets, models>/<condition>.csv (per image: set, label, P(malignant), VAE score, gate
verdict; the folder is named by the sets and the models' weights, so another classifier never reuses them) and
results/acquisition_shift/: summary.csv and acquisition_shift.png (change in AUC, and the hybrid's and classifier's
sensitivity and specificity, per condition).
"""
from __future__ import annotations

import argparse
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from tqdm import tqdm

from anomaly_detection.hybrid import HybridPredictor, rescue
from classifiers.shipped import resolve_classifier
from data.atomic import atomic_write_csv
from data.checkpoint import file_digest
from data.images import load_rgb
from data.manifest import read_manifest, stratified_subset
from data.paths import DEFAULT_GATE, DEFAULT_VAE, MANIFESTS, RESULTS, RUNS
from data.runtime import UserError, add_runtime_options, cli_main, init_device
from evaluation.metrics import decision_row, paired_auc_difference
from evaluation.plots import save_figure
from studies import compare

Condition = Callable[[Image.Image, int], Image.Image]


def _gains(r: float, g: float, b: float) -> Condition:
    def apply(img: Image.Image, _: int) -> Image.Image:
        a = np.asarray(img, dtype=np.float32) * np.array([r, g, b], dtype=np.float32)
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    return apply


def _jpeg(quality: int) -> Condition:
    def apply(img: Image.Image, _: int) -> Image.Image:
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer).convert("RGB")
    return apply


def _downscale(factor: int) -> Condition:
    def apply(img: Image.Image, _: int) -> Image.Image:
        return img.resize((max(1, img.width // factor), max(1, img.height // factor)), Image.Resampling.BILINEAR)
    return apply


def _blur(img: Image.Image, _: int) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=0.01 * min(img.size)))  # 1% of the side: device-relative


def _noise(img: Image.Image, index: int) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    a = a + np.random.default_rng(index).normal(0, 12, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


CONDITIONS: dict[str, Condition] = {
    "clean": lambda img, _: img,
    "jpeg_q50": _jpeg(50),
    "jpeg_q15": _jpeg(15),
    "half_resolution": _downscale(2),
    "quarter_resolution": _downscale(4),
    "blur": _blur,
    "noise": _noise,
    "warm": _gains(1.2, 1.0, 0.8),
    "cool": _gains(0.8, 1.0, 1.2),
    "dark": _gains(0.6, 0.6, 0.6),
    "bright": _gains(1.4, 1.4, 1.4),
    "rotate_90": lambda img, _: img.transpose(Image.Transpose.ROTATE_90),
}
# evaluation set -> (dataset, split, official split or None): studies/compare.py's definitions under shorter names;
# HAM10000 calib, which no classifier trains or selects on, is where a decision between classifiers is made
SETS = {"HAM10000 test": compare.SETS["HAM10000 test"], "ISIC 2017 val": compare.SETS["ISIC 2017 val (held out)"],
        "HAM10000 calib": compare.SETS["HAM10000 calib (selection)"]}
DEFAULT_SETS = ("HAM10000 test", "ISIC 2017 val")


def evaluation_images(manifest: pd.DataFrame, limit: int | None = None,
                      sets: tuple[str, ...] = DEFAULT_SETS) -> pd.DataFrame:
    """The rows of `sets` with a `set` column (at most `limit` per set, both classes kept, seeded)."""
    parts = []
    for name in sets:
        dataset, split, official = SETS[name]
        part = manifest[(manifest["dataset"] == dataset) & (manifest["split"] == split)]
        if official is not None:
            part = part[part["official_split"] == official]
        if part.empty:
            raise UserError(f"the manifest has no {name} images (build mixed.csv with scripts/01_prepare_data.py "
                            "--mixed)")
        parts.append((part if limit is None else stratified_subset(part, limit, seed=0)).assign(set=name))
    return pd.concat(parts, ignore_index=True)


def scores_folder(predictor: HybridPredictor, sets: tuple[str, ...], limit: int | None) -> str:
    """Where one set of models' scores on `sets` are kept: named by the sets, the limit and the models' files
    (sha256 of weights and sidecars: TTA and preprocessing live in the sidecar), so another classifier, a retrained
    one or the same weights with another sidecar never reuse them."""
    files = [Path(p).with_suffix(suffix) for p in predictor.paths.values() for suffix in (".safetensors", ".json")]
    digest = hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()[:10]
    subset = "all" if sets == DEFAULT_SETS else "+".join(sorted(sets)).replace(" ", "_")
    return f"{subset}{f'_limit_{limit}' if limit else ''}_{digest}"


def score_condition(predictor: HybridPredictor, images: pd.DataFrame, condition: str, batch_size: int = 32,
                    progress: bool = True) -> pd.DataFrame:
    """One row per image: its P(malignant), VAE score and the gate's verdict under `condition`."""
    apply = CONDITIONS[condition]
    probs, scores, gate_ok, gate_reason = [], [], [], []
    paths = list(images["path"])
    for start in tqdm(range(0, len(paths), batch_size), desc=condition, unit="batch", disable=not progress):
        altered = [apply(load_rgb(p), start + i) for i, p in enumerate(paths[start:start + batch_size])]
        cls_px, vae_px = zip(*[predictor.pixels(img) for img in altered])
        p, s, _ = predictor.run_arrays(np.stack(cls_px), np.stack(vae_px))
        gates = predictor.check_gate([predictor.gate_input(img) for img in altered])
        probs += list(p)
        scores += list(s)
        gate_ok += [None if g is None else g.ok for g in gates]
        gate_reason += [None if g is None else g.reason for g in gates]
    return pd.DataFrame({"set": images["set"].to_numpy(), "path": paths, "label": images["label"].to_numpy(),
                         "condition": condition, "prob": probs, "vae_score": scores, "gate_ok": gate_ok,
                         "gate_reason": gate_reason})


def summary_rows(scored: pd.DataFrame, malignant_threshold: float, anomaly_threshold: float) -> list[dict]:
    """Per set and condition: classifier, hybrid and all-malignant rows (see the module docstring)."""
    rows = []
    for (name, condition), part in scored.groupby(["set", "condition"], sort=False):
        clean = scored[(scored["set"] == name) & (scored["condition"] == "clean")]
        y = (part["label"] == "malignant").to_numpy()
        prob, score = part["prob"].to_numpy(), part["vae_score"].to_numpy()
        r = rescue(prob, score, malignant_threshold, anomaly_threshold)
        gate = part["gate_ok"].dropna().astype(bool)
        common = {"set": name, "condition": condition,
                  "benign_vae_anomalous": float(r["anomalous"][~y].mean()),
                  "gate_refused": float((~gate).mean()) if len(gate) else float("nan")}
        change = (float("nan"),) * 3
        if condition != "clean" and list(clean["path"]) == list(part["path"]):
            change = paired_auc_difference(y, prob, clean["prob"].to_numpy())
        rows.append({**common, "model": "classifier", **decision_row(y, r["pred_classifier"], prob),
                     "auc_change": change[0], "auc_change_ci_low": change[1], "auc_change_ci_high": change[2]})
        rows.append({**common, "model": "hybrid", **decision_row(y, r["pred_hybrid"])})
        rows.append({**common, "model": "all_malignant_baseline", **decision_row(y, np.ones_like(y))})
    return rows


def plot(summary: pd.DataFrame, path: Path) -> Path:
    sets = list(summary["set"].unique())
    fig, axes = plt.subplots(len(sets), 2, figsize=(13, 3.6 * len(sets)), squeeze=False)
    for row, name in zip(axes, sets):
        part = summary[summary["set"] == name]
        cls, hyb = part[part["model"] == "classifier"], part[part["model"] == "hybrid"]
        x = np.arange(len(cls))
        err = np.vstack([cls["auc_change"] - cls["auc_change_ci_low"], cls["auc_change_ci_high"] - cls["auc_change"]])
        row[0].errorbar(x, cls["auc_change"].fillna(0), yerr=np.nan_to_num(err), fmt="o", capsize=3)
        row[0].axhline(0, color="grey", lw=0.8)
        row[0].set(title=f"{name}: classifier AUC change vs clean (95% CI)", ylabel="AUC change")
        for frame, marker, label in ((cls, "o", "classifier"), (hyb, "s", "hybrid")):
            row[1].plot(x, frame["sensitivity"], marker=marker, ls="-", label=f"{label} sensitivity")
            row[1].plot(x, frame["specificity"], marker=marker, ls="--", label=f"{label} specificity")
        row[1].set(title=f"{name}: at the shipped thresholds", ylim=(0, 1.02))
        row[1].legend(fontsize=7, loc="lower left")
        for ax in row:
            ax.set_xticks(x, cls["condition"], rotation=35, ha="right", fontsize=8)
    return save_figure(fig, path)


def report(scored: pd.DataFrame, predictor_thresholds: tuple[float, float], out: Path) -> pd.DataFrame:
    summary = pd.DataFrame(summary_rows(scored, *predictor_thresholds))
    atomic_write_csv(out / "summary.csv", summary)
    plot(summary, out / "acquisition_shift.png")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=str(MANIFESTS / "mixed.csv"),
                   help="manifest holding the --sets (mixed.csv: HAM10000 test and calib, ISIC 2017 val as "
                        "external with official split val)")
    p.add_argument("--classifier", default=None,
                   help="a shipped classifier's name or a checkpoint path (default: the shipped default)")
    p.add_argument("--vae", default=str(DEFAULT_VAE), help="VAE checkpoint with its calibrated anomaly threshold")
    p.add_argument("--gate", default=str(DEFAULT_GATE), help="out-of-distribution gate checkpoint")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS),
                   help="image conditions to score ('clean' is the reference for the AUC change and always scored)")
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), choices=list(SETS),
                   help="evaluation sets (HAM10000 calib: where a choice between classifiers is made)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per evaluation set (seeded, "
                                                           "stratified by class; for a quick look)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--work", default=str(RUNS / "acquisition_shift"), help="per-condition scores (resumable)")
    p.add_argument("--out", default=str(RESULTS / "acquisition_shift"), help="summary.csv and the figure")
    p.add_argument("--report-only", action="store_true", help="only report the conditions already scored")
    add_runtime_options(p, progress=True)
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    predictor = HybridPredictor(resolve_classifier(a.classifier), a.vae, init_device(a.device, a.threads), gate=a.gate)
    images = evaluation_images(read_manifest(a.manifest), a.limit, tuple(a.sets))
    work, out = Path(a.work) / scores_folder(predictor, tuple(a.sets), a.limit), Path(a.out)
    conditions = ["clean"] + [c for c in a.conditions if c != "clean"]
    scored, missing = [], []
    for condition in conditions:
        file = work / f"{condition}.csv"
        if file.is_file():
            done = pd.read_csv(file)
            if list(done["path"]) == list(images["path"]):
                scored.append(done)
                continue
        if a.report_only:
            missing.append(condition)
            continue
        frame = score_condition(predictor, images, condition, a.batch_size, not a.no_progress)
        atomic_write_csv(file, frame)
        scored.append(frame)
    if not scored:
        raise UserError(f"nothing scored in {work} yet (run without --report-only)")
    if missing:
        print(f"not scored yet, left out of the report: {', '.join(missing)}")
    summary = report(pd.concat(scored, ignore_index=True),
                     (predictor.malignant_threshold, predictor.anomaly_threshold), out)
    columns = ["set", "condition", "model", "auc", "auc_change", "sensitivity", "specificity",
               "benign_vae_anomalous", "gate_refused"]
    print(summary[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'summary.csv'} and {out / 'acquisition_shift.png'}")


if __name__ == "__main__":
    main()
