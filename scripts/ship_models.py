"""Ship a trained classifier + VAE: fp16 safetensors in checkpoints/, calibrated, evaluated, with a model card.

    python scripts/ship_models.py --classifier runs/classifiers/densenet121_original_s0/best.safetensors \
                                    --vae runs/vae/best.safetensors
    # GPU: add --device cuda (evaluation only; the files written are the same).

Steps, all on the fp16 files users will get (not on the fp32 run outputs):
1. write checkpoints/densenet121.* and checkpoints/convvae.* as fp16 safetensors + sidecars (the sidecar records the
   run it came from), and copy the classifier run's per-epoch training log (its metrics.csv) to results/classifier_training/;
2. calibrate the VAE's anomaly threshold on `calib` (anomaly_detection/calibrate.py) -> results/vae_calibration/;
3. evaluate the classifier on HAM10000 `test` and ISIC 2017 (classifiers/evaluate.py) -> results/classifier/;
4. compare the rescue rules (anomaly_detection/evaluate_hybrid.py) -> results/hybrid/;
5. write checkpoints/MODEL_CARD.md from those CSVs, so every number in it comes from this command, and
   checkpoints/SHA256SUMS (what scripts/download_weights.py verifies).
If any step fails (or the run is interrupted), every file and results folder it touched is put back as it was, so
the shipped model, its card and its results never come from two different runs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from anomaly_detection import calibrate, evaluate_hybrid  # noqa: E402
from anomaly_detection.hybrid import load_vae  # noqa: E402
from classifiers import evaluate  # noqa: E402
from classifiers.models import load_classifier  # noqa: E402
from data.atomic import atomic_write_text  # noqa: E402
from data.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from data.manifest import file_sha256, read_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAINING_LOG = Path("classifier_training") / "densenet121_metrics.csv"  # under --results-dir
NAMES = {
    "ham10000/test": "HAM10000 test",
    "isic2017/external-val": "ISIC 2017 val (external)",
    "isic2017/external-train": "ISIC 2017 train (external)",
}


def ship(source: str, target: Path, loader) -> None:
    model, meta = loader(source)
    meta = {
        **{k: v for k, v in meta.items() if k not in ("versions", "weights_dtype", "format_version")},
        "shipped_from": str(Path(source).resolve().relative_to(ROOT))
        if Path(source).resolve().is_relative_to(ROOT)
        else str(source),
    }
    save_checkpoint(target, model, meta, dtype=torch.float16)


@contextmanager
def restored_on_failure(paths: list[Path]) -> Iterator[None]:
    """Back up `paths` (files or folders; missing ones are noted as missing); if the block raises, even SystemExit or
    KeyboardInterrupt, put every one back as it was (a path that did not exist is removed, and so are the folders
    made for it, when empty) and say so on stderr. A path that cannot be put back is named, and the backup is then
    kept for the user to restore by hand."""
    backup = Path(tempfile.mkdtemp(prefix="ship-backup-"))
    saved = {}
    made = {folder for path in paths for folder in path.absolute().parents if not folder.exists()}
    for i, path in enumerate(paths):
        if path.is_dir() and not path.is_symlink():
            saved[path] = shutil.copytree(path, backup / str(i), symlinks=True)
        elif path.exists() or path.is_symlink():
            saved[path] = shutil.copy2(path, backup / str(i), follow_symlinks=False)
    try:
        yield
    except BaseException:
        failed = []
        for path in paths:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                if path in saved:
                    shutil.move(saved[path], path)
            except OSError as exc:
                failed.append(f"{path} ({exc})")
        for folder in sorted(made, key=lambda f: len(f.parts), reverse=True):  # the deepest first
            with suppress(OSError):  # never hide the failure being reported
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        if failed:
            print(f"shipping failed, and these could not be put back: {'; '.join(failed)}. "
                  f"The previous versions are in {backup}", file=sys.stderr)
        else:
            print("shipping failed: the previous model files and results are back in place", file=sys.stderr)
            shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def copy_training_log(classifier: str, results: Path) -> Path:
    """The shipped classifier's per-epoch log (loss, val AUCs, lr, images/s), from the run folder it was trained in."""
    log = Path(classifier).parent / "metrics.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log}: the classifier's run folder has no training log (metrics.csv); "
                                "ship a run's best.safetensors")
    out = results / TRAINING_LOG
    atomic_write_text(out, log.read_text())
    return out


def training_data(meta: dict, manifests: Path = ROOT / "data" / "manifests") -> str:
    """'HAM10000 `fit` (6,408 images) + ISIC 2017 `fit` (1,700)', counted from the manifest the sidecar names."""
    df = read_manifest(manifests / meta["manifest"])
    datasets = (meta.get("train_args") or {}).get("datasets")
    fit = df[(df["split"] == "fit") & (df["dataset"].isin(datasets) if datasets else True)]
    names = {"ham10000": "HAM10000", "isic2017": "ISIC 2017 train"}
    return " + ".join(f"{names.get(d, d)} `fit` ({n:,} images)" for d, n in fit["dataset"].value_counts().items())


def fmt_ci(row: pd.Series, auc: str = "auc", lo: str = "auc_ci_low", hi: str = "auc_ci_high") -> str:
    return "n/a" if pd.isna(row[auc]) else f"{row[auc]:.3f} ({row[lo]:.3f}-{row[hi]:.3f})"


def model_card(
    classifier_meta: dict,
    vae_meta: dict,
    cls_metrics: pd.DataFrame,
    hybrid: pd.DataFrame,
    calibration: dict,
    command: str,
) -> str:
    rows = []
    for _, r in cls_metrics.iterrows():
        group = f"{r['dataset']}/{r['split']}"
        rows.append(
            f"| {NAMES.get(group, group)} | {r['model']} | {r['n']} ({r['n_malignant']} malignant) | {fmt_ci(r)} | "
            f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['balanced_accuracy']:.3f} |"
        )
    hyb = []
    for _, r in hybrid.iterrows():
        hyb.append(
            f"| {NAMES.get(r['Dataset'], r['Dataset'])} | {r['Model']} | {r['Recall']:.3f} | {r['Specificity']:.3f} | "
            f"{r['BalancedAcc']:.3f} | {fmt_ci(r, 'AUC', 'AUC_CI_low', 'AUC_CI_high')} |"
        )
    c = calibration
    cc = classifier_meta.get("color_constancy")
    colour = f", Shades-of-Gray colour constancy (p={cc['p']})" if cc else ""
    return f"""# Model card: DenseNet-121 + ConvVAE hybrid (research software, not a medical device)

Generated by `{command}`; every number below is read from the CSVs that command wrote.

## Models
- `densenet121.safetensors` (+ `.json`): DenseNet-121 ({classifier_meta["init"]}), trained on {training_data(classifier_meta)}
  - manifest `{classifier_meta["manifest"]}` (sha256 `{classifier_meta["manifest_sha256"][:12]}`); epoch {classifier_meta["epoch"]} chosen by val AUC.
  - Input {classifier_meta["input_size"]} px ({classifier_meta["resize"]} resize){colour}, ImageNet mean/std normalization.
  - Malignant threshold {classifier_meta["malignant_threshold"]:.4f} ({classifier_meta["threshold_rule"]} on `val`). Weights stored in fp16.
- `convvae.safetensors` (+ `.json`): convolutional VAE (latent {vae_meta["arch_kwargs"]["latent_dim"]}) trained on benign `fit` images only
  - epoch {vae_meta["epoch"]} chosen by val anomaly AUC; input {vae_meta["input_size"]} px in [0,1].
  - Score: mean absolute reconstruction error per image (latent mean, deterministic).
  - Anomaly threshold {c["anomaly_threshold"]:.5f} ({c["rule"]} on `calib`, n={c["n"]}); VAE AUC on calib {c["auc"]:.3f} ({c["auc_ci"][0]:.3f}-{c["auc_ci"][1]:.3f}).

## Training data and licence
HAM10000 (Tschandl et al., Sci. Data 2018, CC BY-NC-SA 4.0), 200x150 JPEGs; malignant = melanoma + basal cell
carcinoma + actinic keratosis/Bowen's; benign = nevus + benign keratosis + dermatofibroma + vascular. Splits are
grouped by lesion (no lesion in two splits). Where ISIC 2017 train is used (Codella et al., ISBI 2018; ISIC Archive,
mostly CC-0, some CC-BY-NC): malignant = melanoma; benign = nevus + seborrheic keratosis; near-duplicates are one
group, and its copies of ISIC 2017 val images are removed. The weights inherit the non-commercial licences.

## Classifier metrics (threshold chosen on val; AUC with 95% bootstrap CI, 1000 resamples)
| evaluation set | model | n | AUC (95% CI) | sensitivity | specificity | balanced acc. |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Hybrid rescue against the honest alternatives (all parameters chosen on val/calib)
| evaluation set | rule | sensitivity | specificity | balanced acc. | AUC (95% CI) |
|---|---|---|---|---|---|
{chr(10).join(hyb)}

## Intended use
Research and teaching: studying how a classifier and an anomaly detector combine on dermoscopic images. Not for
diagnosis, triage or any clinical decision.

## Known limits
- Trained on dermoscopy archives of mostly fair skin (HAM10000: Austrian and Australian clinics; ISIC 2017 where
  listed above): performance on other skin types, clinical (non-dermoscopic) photos, phone images or other devices
  is unknown, and drops on another archive (see the ISIC 2017 rows above).
- 200x150 downscaled inputs at {classifier_meta["input_size"]} px: fine structures visible at full resolution are lost.
- Trained from scratch on a CPU budget (no pretrained weights reachable), far from the state of the art.
- Thresholds were chosen on validation data from the same distribution; they do not transfer to another clinic
  without recalibration.
"""


def ship_and_evaluate(a: argparse.Namespace, source_meta: dict, cls_path: Path, vae_path: Path, results: Path,
                      command: str) -> Path:
    """Steps 1-5 of the module docstring; returns where the training log was copied."""
    log = copy_training_log(a.classifier, results)
    ship(a.classifier, cls_path, load_classifier)
    ship(a.vae, vae_path, load_vae)
    data = ["--manifest", a.manifest or str(evaluate.training_manifest(source_meta))]
    calibration = calibrate.main(
        ["--vae", str(vae_path), "--device", a.device, "--out", str(results / "vae_calibration"), *data])
    cls_metrics = evaluate.main(["--checkpoint", str(cls_path), "--name", "densenet121", "--device", a.device,
                                 "--out", str(results / "classifier"), *data])
    hybrid = evaluate_hybrid.main(["--classifier", str(cls_path), "--vae", str(vae_path), "--device", a.device,
                                   "--out", str(results / "hybrid"), *data])
    card = model_card(load_classifier(cls_path)[1], load_vae(vae_path)[1], cls_metrics, hybrid, calibration, command)
    out = cls_path.parent
    atomic_write_text(out / "MODEL_CARD.md", card)
    shipped = sorted(f for f in out.iterdir()
                     if f.suffix in (".safetensors", ".json") and f.stem in ("densenet121", "convvae"))
    atomic_write_text(out / "SHA256SUMS", "".join(f"{file_sha256(f)}  {f.name}\n" for f in shipped))
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", required=True,
                   help="trained DenseNet-121 checkpoint (a run's best.safetensors; the hybrid's classifier)")
    p.add_argument("--vae", required=True, help="trained VAE checkpoint (a run's best.safetensors)")
    p.add_argument("--out", default=str(ROOT / "checkpoints"), help="folder for the shipped files")
    p.add_argument(
        "--manifest",
        default=None,
        help="manifest with the calib, test and external splits (default: the classifier's training manifest, so "
        "no evaluation image was seen in training)",
    )
    p.add_argument("--results-dir", default=str(ROOT / "results"), help="where the evaluation outputs go")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (evaluation)")
    a = p.parse_args(argv)
    try:
        source_meta = load_classifier(a.classifier)[1]
    except (FileNotFoundError, CheckpointError) as exc:
        p.error(str(exc))
    if source_meta["arch"] != "densenet121":
        p.error(f"{a.classifier} is a {source_meta['arch']}; the shipped hybrid's classifier is a DenseNet-121")
    out, results = Path(a.out), Path(a.results_dir)
    cls_path, vae_path = out / "densenet121.safetensors", out / "convvae.safetensors"
    touched = [cls_path, cls_path.with_suffix(".json"), vae_path, vae_path.with_suffix(".json"),
               out / "MODEL_CARD.md", out / "SHA256SUMS", results / TRAINING_LOG,
               *(results / name for name in ("vae_calibration", "classifier", "hybrid"))]  # steps 2-4's --out
    command = "python scripts/ship_models.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        with restored_on_failure(touched):
            log = ship_and_evaluate(a, source_meta, cls_path, vae_path, results, command)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:  # ValueError: ManifestError, TrainingOverlap
        sys.exit(f"error: {exc}")
    print(f"wrote {cls_path}, {vae_path}, {out / 'MODEL_CARD.md'} and {log}")


if __name__ == "__main__":
    main()
