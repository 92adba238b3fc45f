"""Hybrid melanoma screening on dermoscopic images: DenseNet-121 + benign-only VAE "rescue". Research software,
not a medical device: its output is not a diagnosis.

    python inference.py --image lesion.jpg                       # framed report on screen
    python inference.py --image lesion.jpg --output result.json --gradcam overlay.png
    python inference.py --folder images/ --csv predictions.csv   # recursive batch, progress bar, bad files listed
    python inference.py --folder images/ --csv out.csv --backend onnx   # faster on CPU (ONNX Runtime)
    python inference.py --image lesion.jpg --device cuda          # GPU (torch backend)

Decision: the classifier says malignant when P(malignant) >= malignant_threshold (chosen on the validation split);
the VAE flags the image as anomalous when its reconstruction error >= anomaly_threshold (calibrated on the
calibration split); a benign classifier verdict on an anomalous image is "rescued" to malignant.
JSON keys (--output): path, prob_malignant, malignant_threshold, classifier_malignant, vae_score,
anomaly_threshold, anomalous, rescued, final_malignant, out_of_distribution (VAE score above every benign
calibration image), error, decision, models (checkpoint paths, architecture, epoch, training manifest hash).
Exit codes: 0 success (in --folder mode also when some files were unreadable: they are listed in the CSV),
1 unreadable input image or path, 3 unusable checkpoint, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

DEFAULT_CLASSIFIER = ROOT / "checkpoints" / "densenet121.safetensors"
DEFAULT_VAE = ROOT / "checkpoints" / "convvae.safetensors"
DISCLAIMER = "Research software, not a diagnosis: any concerning lesion needs a clinician's examination."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one image file (JPEG, PNG, BMP or TIFF)")
    source.add_argument("--folder", help="a folder of images, searched recursively")
    p.add_argument("--output", help="write the single-image result as JSON to this file")
    p.add_argument("--csv", help="write the folder results (one row per file, errors included) to this CSV")
    p.add_argument("--gradcam", help="save a Grad-CAM overlay (an explanation aid, not evidence) to this PNG")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="classifier checkpoint (.safetensors)")
    p.add_argument("--vae", default=str(DEFAULT_VAE), help="calibrated VAE checkpoint (.safetensors)")
    p.add_argument("--malignant-threshold", type=float, help="override the classifier threshold from its sidecar")
    p.add_argument("--anomaly-threshold", type=float, help="override the VAE threshold from its sidecar")
    p.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx", "openvino", "openvino-bf16"),
        help="torch (eager); onnx (ONNX Runtime) or openvino (OpenVINO, CPU; -bf16 for bf16 where the CPU "
        "supports it): models are exported once into .cache/onnx",
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda, mps, cpu), cpu or cuda; the onnx backend picks its own"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per model call in --folder mode")
    p.add_argument("--quiet", action="store_true", help="no report on screen (files only)")
    return p.parse_args(argv)


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def framed_report(result: dict) -> str:
    yes = {True: "yes", False: "no"}
    lines = [
        f"Image:            {result['path']}",
        f"Classifier:       P(malignant) = {result['prob_malignant']:.3f}  "
        f"(threshold {result['malignant_threshold']:.3f})"
        f"  -> {'malignant' if result['classifier_malignant'] else 'benign'}",
        f"VAE anomaly:      score = {result['vae_score']:.4f}  (threshold {result['anomaly_threshold']:.4f})"
        f"  -> {'anomalous' if result['anomalous'] else 'typical of benign'}",
        f"Rescue fired:     {yes[result['rescued']]}",
        f"FINAL DECISION:   {result['decision'].upper()}",
    ]
    if result["out_of_distribution"]:
        lines.append(
            "Warning:          the image is unlike every benign calibration image (poor quality or not dermoscopy?)"
        )
    lines.append(DISCLAIMER)
    width = max(len(line) for line in lines) + 2
    return "\n".join(
        ["+" + "-" * width + "+", *[f"| {line.ljust(width - 1)}|" for line in lines], "+" + "-" * width + "+"]
    )


def run_image(predictor, args: argparse.Namespace) -> None:
    from data.images import ImageError, load_rgb

    try:
        image = load_rgb(args.image)
    except ImageError as exc:
        fail(str(exc), 1)
    prediction, _ = predictor.predict_image(image, str(args.image))
    result = {**prediction.to_dict(), "models": predictor.versions()}
    if not args.quiet:
        print(framed_report(result))
    if args.output:
        from data.atomic import atomic_write_text

        atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    if args.gradcam:
        from PIL import Image

        from classifiers.gradcam import gradcam_map, overlay

        pixels = predictor.cls_prep.pixels(image)
        Image.fromarray(overlay(pixels, gradcam_map(predictor.classifier, predictor.cls_meta, pixels))).save(
            args.gradcam
        )
        if not args.quiet:
            print(f"Grad-CAM overlay (explanation aid, not evidence): {args.gradcam}")


def run_folder(predictor, args: argparse.Namespace) -> None:
    import pandas as pd
    from tqdm import tqdm

    from data.atomic import atomic_write_csv
    from data.images import list_images

    try:
        paths = list_images(args.folder)
    except FileNotFoundError as exc:
        fail(str(exc), 1)
    if not paths:
        fail(f"{args.folder}: no JPEG/PNG/BMP/TIFF images found", 1)
    with tqdm(total=len(paths), desc="images", unit="img", disable=args.quiet) as bar:
        predictions = predictor.predict_paths(paths, args.batch_size, on_batch=bar.update)
    table = pd.DataFrame([p.to_dict() for p in predictions])
    if args.csv:
        atomic_write_csv(args.csv, table)
    if not args.quiet:
        bad = table[table["error"] != ""]
        counts = table["decision"].value_counts()
        print(
            f"{len(table)} images: {counts.get('malignant', 0)} malignant ({int(table['rescued'].sum())} by rescue), "
            f"{counts.get('benign', 0)} benign, {len(bad)} unreadable"
            + (f"; results in {args.csv}" if args.csv else "")
        )
        for _, row in bad.iterrows():
            print(f"  skipped: {row['error']}")
        print(DISCLAIMER)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.image and not Path(args.image).exists():
        fail(f"{args.image}: file not found", 1)
    if args.folder and not Path(args.folder).is_dir():
        fail(f"{args.folder}: folder not found", 1)
    for name in ("classifier", "vae"):
        if not Path(getattr(args, name)).with_suffix(".safetensors").is_file():
            fail(
                f"{getattr(args, name)}: {name} checkpoint not found (see checkpoints/README or "
                "scripts/download_weights.py)",
                3,
            )
    from anomaly_detection.hybrid import HybridPredictor
    from data.checkpoint import CheckpointError
    from data.runtime import init_device

    device = init_device(args.device)
    try:
        predictor = HybridPredictor(
            args.classifier, args.vae, device, args.backend, args.malignant_threshold, args.anomaly_threshold
        )
    except CheckpointError as exc:
        fail(str(exc), 3)
    if args.image:
        run_image(predictor, args)
    else:
        run_folder(predictor, args)


if __name__ == "__main__":
    main()
