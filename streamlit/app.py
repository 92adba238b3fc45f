r"""Streamlit demo of the hybrid melanoma screen: a classifier + benign-only VAE "rescue", with Grad-CAM, one-click
examples (real HAM10000 test images with their ground truth), a batch mode and the committed results. Research
software, not a diagnosis.

    streamlit run streamlit/app.py          # or `make app`; CPU is enough (a GPU is used when present)
    MELANOMA_CLASSIFIER=runs/classifiers/densenet121_original_s0/best.safetensors \
        MELANOMA_VAE=checkpoints/convvae.safetensors streamlit run streamlit/app.py
    OMP_NUM_THREADS=2 streamlit run streamlit/app.py   # CPU threads (default: all cores)

The sidebar offers every shipped classifier by name (classifiers/shipped.py), the default first: the one with the
best validation AUC recorded in its sidecar, as in inference.py. Then come any trained runs found.
Environment: MELANOMA_CLASSIFIER and MELANOMA_VAE put a checkpoint first in the model lists, preselected (default:
the shipped default classifier and checkpoints/convvae); MELANOMA_GATE names the out-of-distribution gate (default:
gate.safetensors in the checkpoints folder, when it is there); MELANOMA_CHECKPOINTS, MELANOMA_RESULTS and
MELANOMA_SAMPLES move the checkpoints/, results/ and samples/ folders (the tests point them at temporary folders).

The gate (anomaly_detection/gate.py) runs before any verdict, as in inference.py: an image that is not a dermoscopic
lesion shows "Cannot assess: <reason>" and no verdict, gauges or Grad-CAM. Without a gate checkpoint the sidebar
says that images are not screened.

Models load once per process (st.cache_resource); each image's model outputs and Grad-CAM are cached by content
(st.cache_data), so moving a threshold re-decides without re-running the networks. The decision itself is
HybridPredictor.decide with the thresholds of the sidebar.
"""
from __future__ import annotations

import copy
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image

import streamlit as st
from anomaly_detection.gate import GateResult
from anomaly_detection.hybrid import HybridPredictor, Prediction
from anomaly_detection.serving import DISCLAIMER
from classifiers.gradcam import gradcam_map, overlay
from classifiers.shipped import default_classifier, shipped_classifiers, val_auc
from data import paths
from data.checkpoint import CheckpointError, read_sidecar
from data.images import ImageError, list_images, load_rgb
from data.runtime import init_device

CHECKPOINTS = Path(os.environ.get("MELANOMA_CHECKPOINTS", paths.CHECKPOINTS))
RESULTS = Path(os.environ.get("MELANOMA_RESULTS", paths.RESULTS))
SAMPLES = Path(os.environ.get("MELANOMA_SAMPLES", paths.SAMPLES))
CLASSIFIER_GLOBS = ("runs/classifiers/*/best.safetensors", "checkpoints/grid/*.safetensors")  # trained runs
VAE_GLOBS = ("runs/vae/best.safetensors", "runs/vae/*/best.safetensors")
DEFAULT_MARK = " (default: best validation AUC)"
SAMPLE_COLUMNS = ("file", "label", "diagnosis", "source", "split", "image_id")  # of samples/labels.csv
DX_TYPES = {"histo": "histopathology", "follow_up": "follow-up", "consensus": "expert consensus",
            "confocal": "confocal microscopy"}  # HAM10000's dx_type: how the diagnosis was made
# The uploader takes any file (no `type=` filter, no widget size limit below the server's): a file the widget refused
# would only get a small icon in the browser, while the app's own checks below show the CLI's message in plain view.
MAX_UPLOAD_MB = 20
RED, GREEN, ORANGE = "#c0392b", "#2e8b57", "#e67e22"
LIMITS = """
- **Not a diagnosis.** A research prototype; it has not been validated clinically and must not guide care.
- **Trained on dermoscopy.** The shipped classifiers and VAE learned from dermoscopic images (HAM10000, ISIC 2017;
  each sidecar names its training manifest). Phone photos, clinical (non-dermoscopic) pictures, other devices and
  other hospitals are outside what they saw: accuracy there is lower and can be much lower (see the external
  evaluations in the Results tab).
- **"Cannot assess" is a screen too.** The out-of-distribution gate refuses images that do not look like dermoscopic
  lesions (blank, greyscale, tiny, patterns, photographs...) or are too noisy to judge; it was checked on generated
  and cropped images (results/rescue_sources), so an unusual real picture can still pass it, and a rare real lesion
  can be refused.
- **Thresholds are operating points.** The classifier threshold was chosen on the validation split and the anomaly
  threshold calibrated on benign images of the calibration splits of every source. Moving them trades missed
  melanomas against false alarms; the Results tab shows that trade-off.
- **The rescue is a screen, not a finding.** A high VAE score says the image is unlike the benign training
  images, which is also true of blurred, hairy, badly lit or non-dermoscopic images.
- **Grad-CAM is an explanation aid, not evidence.** It shows where the classifier's gradient was largest; it can
  highlight artefacts and does not localise a lesion.
- **Bundled samples are real HAM10000 test images** (CC BY-NC-SA 4.0, Tschandl et al. 2018; samples/ATTRIBUTION.md),
  shown with their ground truth from samples/labels.csv. Eight images say little about accuracy: the Results tab
  measures it on whole test sets.
"""


# ---------------------------------------------------------------------------------------------------------------
# Models and cached computations

def shown(path: str | Path) -> Path:
    """A path as the page shows it: relative to the repository when inside it."""
    full = Path(path).resolve()
    return full.relative_to(paths.ROOT) if full.is_relative_to(paths.ROOT) else full


def globbed(patterns: tuple[str, ...]) -> list[Path]:
    return [weights for pattern in patterns for weights in sorted(paths.ROOT.glob(pattern))]


def discover(env_var: str, candidates: list[Path], threshold_key: str) -> tuple[list[str], list[str]]:
    """(offered checkpoints, notes on the ones left out). The env var's checkpoint is always offered first, so a
    wrong path gets its own error message when loaded instead of silently falling back to another model."""
    offered = [os.environ[env_var]] if os.environ.get(env_var) else []
    seen = {Path(p).resolve() for p in offered}
    notes = []
    for weights in candidates:
        if weights.resolve() in seen:
            continue
        seen.add(weights.resolve())
        try:
            meta = read_sidecar(weights)
        except CheckpointError as exc:
            notes.append(str(exc))
            continue
        if meta.get(threshold_key) is None:
            notes.append(f"{shown(weights)}: no {threshold_key} in its sidecar (not calibrated yet)")
        else:
            offered.append(str(weights))
    return offered, notes


def classifier_candidates() -> tuple[list[Path], dict[Path, str]]:
    """The shipped classifiers (the default first, then by name) and the trained runs found; the shipped ones'
    labels by resolved path: their name, the default's marked 'name (default: best validation AUC)'."""
    shipped = shipped_classifiers(CHECKPOINTS)
    default = default_classifier(CHECKPOINTS) if shipped else None
    labels = {weights.resolve(): name + (DEFAULT_MARK if weights == default else "")
              for name, weights in shipped.items()}
    ordered = sorted(shipped.values(), key=lambda w: w != default)  # stable: the rest stay in name order
    return ordered + globbed(CLASSIFIER_GLOBS), labels


def recorded_auc(path: str) -> str:
    """'; validation AUC 0.769' from a classifier's sidecar, or '' when it records none (or cannot be read: loading
    the checkpoint reports that)."""
    try:
        auc = val_auc(json.loads(Path(path).with_suffix(".json").read_text()))
    except (OSError, ValueError, AttributeError):  # AttributeError: a sidecar that is not a JSON object
        return ""
    return f"; validation AUC {auc:.3f}" if np.isfinite(auc) else ""


def describe(path: str) -> str:
    try:
        meta = read_sidecar(path)
    except CheckpointError:
        return path
    details = [str(meta[k]) for k in ("arch", "config") if meta.get(k)]
    return f"{' · '.join(details)} ({shown(path)})" if details else str(shown(path))


def gate_checkpoint() -> str | None:
    """MELANOMA_GATE (a missing file is then an error when the models load), else the checkpoints folder's gate
    when it is there, else None (no gate: the sidebar says so)."""
    if os.environ.get("MELANOMA_GATE"):
        return os.environ["MELANOMA_GATE"]
    default = CHECKPOINTS / paths.DEFAULT_GATE.name
    return str(default) if default.is_file() else None


@st.cache_resource(show_spinner="Loading the models...")
def load_predictor(classifier: str, vae: str, gate: str | None) -> HybridPredictor:
    predictor = HybridPredictor(classifier, vae, init_device("auto"), gate=gate)
    predictor.load_gate()  # now, so that an unusable gate is reported with the other checkpoints
    return predictor


@st.cache_resource
def model_lock() -> threading.Lock:
    """Sessions share the cached models; Grad-CAM hooks into them, so one image at a time goes through."""
    return threading.Lock()


def decode(name: str, data: bytes) -> Image.Image:
    """Uploaded bytes -> RGB image, or ImageError naming the uploaded file with the CLI's message for a file."""
    if len(data) > MAX_UPLOAD_MB * 2**20:
        raise ImageError(f"{name}: {len(data) / 2**20:.1f} MB is over the {MAX_UPLOAD_MB} MB upload limit")
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        return load_rgb(data, name)
    except ImageError as exc:  # PIL names an in-memory upload by its Python object; name the file instead
        raise ImageError(re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", repr(name), str(exc))) from None


@st.cache_data(max_entries=256, show_spinner=False)
def model_outputs(classifier: str, vae: str, gate: str | None, name: str, data: bytes) -> dict[str, Any]:
    """One image through the networks: P(malignant), VAE score, the gate's verdict, and the pixels to show."""
    predictor = load_predictor(classifier, vae, gate)
    image = decode(name, data)
    with model_lock():
        prob, score, recon, verdict = predictor.image_outputs(image)
    _, vae_px = predictor.pixels(image)
    return {"prob": prob, "score": score, "gate": verdict, "vae_px": vae_px, "recon": recon}


@st.cache_data(max_entries=64, show_spinner=False)
def gradcam_overlay(classifier: str, vae: str, gate: str | None, name: str, data: bytes) -> np.ndarray:
    predictor = load_predictor(classifier, vae, gate)
    pixels = predictor.cls_prep.pixels(decode(name, data))
    with model_lock():
        return overlay(pixels, gradcam_map(predictor.classifier, predictor.cls_meta, pixels))


def decide(predictor: HybridPredictor, thresholds: tuple[float, float], names: list[str], probs: list[float],
           scores: list[float], gates: list[GateResult | None]) -> list[Prediction]:
    """The predictor's own rule at the sidebar's thresholds (a shallow copy: the cached predictor is shared)."""
    view = copy.copy(predictor)
    view.malignant_threshold, view.anomaly_threshold = thresholds
    return view.decide(names, np.asarray(probs), np.asarray(scores), gates)


def model_paths(predictor: HybridPredictor) -> tuple[str, str, str | None]:
    """The cache keys of a predictor's models: classifier, VAE and gate (None without one)."""
    return predictor.paths["classifier"], predictor.paths["vae"], predictor.paths.get("gate")


@dataclass(frozen=True)
class Example:
    """A bundled sample: its file, its button text and, when labels.csv lists it, its row (the ground truth)."""
    path: Path
    label: str
    truth: dict[str, str] | None = None


def examples(folder: Path) -> tuple[list[Example], list[str]]:
    """The samples folder's images as one-click examples, in labels.csv's order and named by their true diagnosis
    and source (e.g. 'Melanoma (malignant) · HAM10000 test · ISIC_0033871'), plus notes on what could not be
    offered. A folder without labels.csv offers its images by file name, without ground truth."""
    if not folder.is_dir():
        return [], []
    table = folder / "labels.csv"
    if not table.is_file():
        return [Example(path, path.name) for path in list_images(folder)], []
    try:
        rows = pd.read_csv(table, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        return [], [f"{shown(table)}: could not be read ({exc})"]
    missing = [c for c in SAMPLE_COLUMNS if c not in rows.columns]
    if missing:
        return [], [f"{shown(table)}: missing columns {missing}"]
    found, notes = [], []
    for row in rows.to_dict("records"):
        path = folder / row["file"]
        if not path.is_file():
            notes.append(f"{shown(path)}: listed in {table.name} but absent")
            continue
        diagnosis = row["diagnosis"][:1].upper() + row["diagnosis"][1:]
        label = f"{diagnosis} ({row['label']}) · {row['source']} {row['split']} · {row['image_id']}"
        found.append(Example(path, label, row))
    return found, notes


def ground_truth(truth: dict[str, str], p: Prediction) -> str:
    """The sample's true label beside the model's decision, marked as known for the bundled samples only."""
    method = DX_TYPES.get(truth.get("dx_type", ""))
    right = p.final_malignant == (truth["label"] == "malignant")
    return (f"**Ground truth** (known for this bundled sample only, from its labels.csv): "
            f"**{truth['label'].upper()}**, {truth['diagnosis']}" + (f" (diagnosed by {method})" if method else "")
            + f"; {truth['source']} {truth['split']} image {truth['image_id']}. The model's final decision is "
            f"**{'right' if right else 'wrong'}** on this image.")


# ---------------------------------------------------------------------------------------------------------------
# Pictures

def gauge(value: float, threshold: float, upper: float, color: str, dashed: float | None = None) -> str:
    """HTML for a horizontal bar of `value` on [0, upper] with a black tick at the threshold and, optionally, a
    dashed grey tick (the out-of-distribution limit); the sentence under it gives the numbers."""
    def left(v: float) -> str:
        return f"{100 * min(max(v / upper, 0.0), 1.0):.2f}%"

    tick = "position:absolute;top:-5px;bottom:-5px;margin-left:-1px;"
    extra = (f'<div style="{tick}left:{left(dashed)};border-left:2px dashed #666"></div>' if dashed is not None else "")
    return (f'<div style="position:relative;height:24px;background:#e8e8e8;border-radius:3px;margin:10px 0 4px">'
            f'<div style="width:{left(value)};height:100%;background:{color};border-radius:3px"></div>'
            f'<div style="{tick}left:{left(threshold)};border-left:3px solid #000"></div>{extra}</div>'
            f'<div style="display:flex;justify-content:space-between;font-size:0.75rem;color:#777">'
            f'<span>0</span><span>{upper:.3g}</span></div>')


def error_heatmap(vae_px: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pixel |input - reconstruction| (mean over RGB, [0,1] units) as an inferno image scaled to its maximum."""
    error = np.abs(vae_px.astype(np.float32) - recon.astype(np.float32)).mean(-1) / 255.0
    peak = float(error.max()) or 1.0
    return (matplotlib.colormaps["inferno"](error / peak)[..., :3] * 255).astype(np.uint8), peak


# ---------------------------------------------------------------------------------------------------------------
# Sidebar

def reset_thresholds(predictor: HybridPredictor) -> None:
    st.session_state["malignant_threshold"] = predictor.malignant_threshold
    st.session_state["anomaly_threshold"] = predictor.anomaly_threshold


def origin(meta: dict[str, Any], rule_key: str, split_key: str) -> str:
    """How a sidecar's threshold was chosen, e.g. 'youden on val'."""
    return " on ".join(str(meta[k]) for k in (rule_key, split_key) if meta.get(k)) or "from the sidecar"


def sidebar() -> tuple[HybridPredictor | None, tuple[float, float], str]:
    """Model choice and thresholds -> (predictor or None, thresholds, error message when there is no predictor)."""
    st.sidebar.header("Models")
    candidates, labels = classifier_candidates()
    classifiers, cls_notes = discover("MELANOMA_CLASSIFIER", candidates, "malignant_threshold")
    vaes, vae_notes = discover("MELANOMA_VAE", [CHECKPOINTS / paths.DEFAULT_VAE.name, *globbed(VAE_GLOBS)],
                               "anomaly_threshold")
    if cls_notes + vae_notes:
        with st.sidebar.expander(f"{len(cls_notes + vae_notes)} checkpoint(s) not offered"):
            st.markdown("\n".join(f"- {n}" for n in cls_notes + vae_notes))
    if not classifiers or not vaes:
        missing = " and ".join(k for k, v in (("classifier", classifiers), ("VAE", vaes)) if not v)
        message = (f"No usable {missing} checkpoint found. The demo expects a classifier in {shown(CHECKPOINTS)} "
                   f"and {shown(CHECKPOINTS / paths.DEFAULT_VAE.name)} (with their .json sidecars); set "
                   "MELANOMA_CLASSIFIER / MELANOMA_VAE to use other checkpoints.")
        st.sidebar.error(message)
        return None, (float("nan"), float("nan")), message
    classifier = st.sidebar.selectbox(
        "Classifier", classifiers, format_func=lambda p: labels.get(Path(p).resolve()) or describe(p),
        key="classifier", help="The shipped classifiers by name, then any trained runs found. The default is the "
        "shipped one with the best validation AUC recorded in its sidecar (no test number takes part).")
    st.sidebar.caption(describe(classifier) + recorded_auc(classifier))
    vae = st.sidebar.selectbox("Anomaly detector (VAE)", vaes, format_func=describe, key="vae")
    gate = gate_checkpoint()
    try:
        predictor = load_predictor(classifier, vae, gate)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError, as is an unknown architecture
        message = f"Cannot load the models: {exc}"
        st.sidebar.error(message)
        return None, (float("nan"), float("nan")), message
    if gate is None:
        st.sidebar.warning(f"No out-of-distribution gate ({shown(CHECKPOINTS / paths.DEFAULT_GATE.name)} is absent): "
                           "every image gets a verdict, even one that is not a dermoscopic lesion.")
    else:
        st.sidebar.caption(f"Out-of-distribution gate: {describe(gate)}. An image that is not a dermoscopic lesion "
                           "gets 'cannot assess' instead of a verdict.")

    state = st.session_state
    # A new model pair starts at its calibrated thresholds (so does a session whose sliders were not drawn).
    if state.get("thresholds_for") != (classifier, vae) or "malignant_threshold" not in state:
        reset_thresholds(predictor)
        state["thresholds_for"] = (classifier, vae)
    st.sidebar.header("Thresholds")
    st.sidebar.slider("Malignant threshold on P(malignant)", 0.0, 1.0, step=0.001, format="%.3f",
                      key="malignant_threshold")
    finite_ood = predictor.ood_score if np.isfinite(predictor.ood_score) else 0.0
    upper = float(np.ceil(max(2 * predictor.anomaly_threshold, 1.5 * finite_ood, 1e-3) * 1000) / 1000)
    st.sidebar.slider("Anomaly threshold on the VAE score", 0.0, upper, step=0.0001, format="%.4f",
                      key="anomaly_threshold")
    st.sidebar.button("Reset to calibrated thresholds", on_click=reset_thresholds, args=(predictor,),
                      key="reset_thresholds")
    st.sidebar.caption(f"Calibrated: {predictor.malignant_threshold:.3f} "
                       f"({origin(predictor.cls_meta, 'threshold_rule', 'threshold_split')}) and "
                       f"{predictor.anomaly_threshold:.4f} "
                       f"({origin(predictor.vae_meta, 'anomaly_threshold_rule', 'anomaly_threshold_split')}).")
    st.sidebar.divider()
    st.sidebar.caption(DISCLAIMER)
    return predictor, (float(state["malignant_threshold"]), float(state["anomaly_threshold"])), ""


# ---------------------------------------------------------------------------------------------------------------
# Tabs

def show_result(predictor: HybridPredictor, thresholds: tuple[float, float], name: str, data: bytes,
                truth: dict[str, str] | None = None) -> None:
    """The whole single-image report (with the ground truth beside the verdict when `truth`, a bundled sample's
    labels.csv row, is given); an unreadable file gets one readable error and nothing else."""
    keys = model_paths(predictor)
    try:
        with st.spinner("Running the classifier and the VAE..."):
            out = model_outputs(*keys, name, data)
    except ImageError as exc:
        st.error(f"Could not analyse this file. {exc}. Please upload a JPEG, PNG, BMP or TIFF image.")
        return
    p = decide(predictor, thresholds, [name], [out["prob"]], [out["score"]], [out["gate"]])[0]
    if p.error:  # the models gave NaN or infinity: no decision to show
        st.error(f"Could not analyse this file. {p.error}.")
        return
    if p.status == "cannot assess":  # no verdict, so no gauges and no Grad-CAM to read one into
        st.error(f"Cannot assess: {p.gate_reason}. {name} is not a dermoscopic lesion image the models can "
                 f"judge, so no benign/malignant verdict is given. {DISCLAIMER}")
        st.image(out["vae_px"], caption=f"{name}, as the models see it", width=256)
        st.caption(f"Out-of-distribution gate: feature distance {p.gate_distance:.0f} (limit {p.gate_threshold:.0f})"
                   + (f", non-lesion probe score {p.gate_probe_score:.1f} (limit {p.gate_probe_threshold:.1f})"
                      if p.gate_probe_score is not None and p.gate_probe_threshold is not None else "")
                   + ". anomaly_detection/gate.py lists its checks.")
        return
    how = (" (rescued: the classifier said benign, the VAE found the image anomalous)" if p.rescued else
           " (the classifier says malignant)" if p.classifier_malignant else " (classifier benign, VAE not anomalous)")
    verdict = f"Final decision: **{p.decision.upper()}**{how}. {DISCLAIMER}"
    if truth is None:
        (st.error if p.final_malignant else st.success)(verdict)
    else:
        left, right = st.columns(2)
        with left:
            (st.error if p.final_malignant else st.success)(verdict)
        with right:
            st.info(ground_truth(truth, p))
    if p.out_of_distribution:
        st.warning(f"This image looks out of distribution: its VAE score {p.vae_score:.4f} is above every benign "
                   f"calibration image (max {predictor.ood_score:.4f}). It may be of poor quality or not a dermoscopic "
                   "image; the decision above is unreliable.")

    left, right = st.columns(2)
    with left:
        st.subheader("Classifier")
        st.html(gauge(p.prob_malignant, p.malignant_threshold, 1.0, RED if p.classifier_malignant else GREEN))
        st.markdown(f"P(malignant) = **{p.prob_malignant:.3f}** {'≥' if p.classifier_malignant else '<'} threshold "
                    f"{p.malignant_threshold:.3f} (black line): the classifier says "
                    f"**{'malignant' if p.classifier_malignant else 'benign'}**.")
    with right:
        st.subheader("VAE anomaly score")
        ood = predictor.ood_score if np.isfinite(predictor.ood_score) else None
        upper = max(p.vae_score, p.anomaly_threshold, ood or 0.0) * 1.15
        st.html(gauge(p.vae_score, p.anomaly_threshold, upper, ORANGE if p.anomalous else GREEN, ood))
        st.markdown(f"Score = **{p.vae_score:.4f}** {'≥' if p.anomalous else '<'} threshold "
                    f"{p.anomaly_threshold:.4f} (black line): "
                    f"**{'anomalous' if p.anomalous else 'typical of the benign training images'}**."
                    + (f" Dashed line: the highest score of any benign calibration image ({ood:.4f})."
                       if ood is not None else "")
                    + (f" The score is the {predictor.vae_meta['score']}." if predictor.vae_meta.get("score") else ""))
    st.markdown(f"**Rescue fired:** {'yes' if p.rescued else 'no'}. The rescue turns a benign classifier verdict into "
                "malignant when the VAE finds the image anomalous.")

    heat, peak = error_heatmap(out["vae_px"], out["recon"])
    size = out["vae_px"].shape[0]
    cols = st.columns(4)
    cols[0].image(out["vae_px"], caption=f"Input as the VAE sees it ({size} px)", width="stretch")
    cols[1].image(out["recon"], caption="VAE reconstruction", width="stretch")
    cols[2].image(heat, caption=f"Reconstruction error (brightest = {peak:.3f})", width="stretch")
    with cols[3], st.spinner("Grad-CAM..."):
        cols[3].image(gradcam_overlay(*keys, name, data), width="stretch",
                      caption="Grad-CAM for 'malignant': an explanation aid, not evidence")


def choose_example(path: str | None) -> None:
    """An example's button picks it; a change in the uploader drops it (path None): the latest action wins."""
    st.session_state["example"] = path


def image_tab(predictor: HybridPredictor, thresholds: tuple[float, float]) -> None:
    samples, notes = examples(SAMPLES)
    upload = st.file_uploader(f"Dermoscopic image (JPEG, PNG, BMP or TIFF, up to {MAX_UPLOAD_MB} MB)",
                              key="single_upload", on_change=choose_example, args=(None,))
    chosen = st.session_state.get("example")
    if samples:
        st.markdown("**Or one click on an example**" + (", named by its true diagnosis:" if samples[0].truth else ":"))
        columns = st.columns(4)
        for i, example in enumerate(samples):
            columns[i % 4].button(example.label, key=f"example_{i}", on_click=choose_example,
                                  args=(str(example.path),), width="stretch", wrap=True,
                                  type="primary" if str(example.path) == chosen else "secondary")
        st.caption("Real HAM10000 test images (CC BY-NC-SA 4.0, Tschandl et al. 2018; samples/ATTRIBUTION.md)."
                   if (SAMPLES / "ATTRIBUTION.md").is_file() else f"Images from {SAMPLES}.")
    for note in notes:
        st.warning(f"Example not offered: {note}")
    picked = next((e for e in samples if str(e.path) == chosen), None)
    if picked is not None:
        show_result(predictor, thresholds, picked.path.name, picked.path.read_bytes(), picked.truth)
    elif upload is not None:
        show_result(predictor, thresholds, upload.name, upload.getvalue())
    else:
        st.info("Upload a dermoscopic image" + (" or click an example" if samples else
                                                f" (no bundled samples found in {SAMPLES})")
                + " to see the classifier, the VAE and the final decision.")


def batch_tab(predictor: HybridPredictor, thresholds: tuple[float, float]) -> None:
    uploads = st.file_uploader(f"Several images (JPEG, PNG, BMP or TIFF, up to {MAX_UPLOAD_MB} MB each)",
                               accept_multiple_files=True, key="batch_upload")
    if not uploads:
        st.info("Upload several images to get one row per image and a CSV.")
        return
    keys = model_paths(predictor)
    outputs: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    progress = st.progress(0.0, text="Analysing...")
    for i, upload in enumerate(uploads):
        try:
            outputs[i] = model_outputs(*keys, upload.name, upload.getvalue())
        except ImageError as exc:
            errors[i] = str(exc)
        progress.progress((i + 1) / len(uploads), text=f"{i + 1}/{len(uploads)} images")
    progress.empty()
    good = sorted(outputs)
    decided = dict(zip(good, decide(predictor, thresholds, [uploads[i].name for i in good],
                                    [outputs[i]["prob"] for i in good], [outputs[i]["score"] for i in good],
                                    [outputs[i]["gate"] for i in good])))
    table = pd.DataFrame([(decided.get(i) or Prediction(u.name, error=errors[i])).to_dict()
                          for i, u in enumerate(uploads)]).rename(columns={"path": "file"})
    counts = table["decision"].value_counts()
    bad = table["error"][table["error"] != ""]
    gated = table[table["status"] == "cannot assess"]
    rescued = int((table["rescued"] & (table["decision"] == "malignant")).sum())
    st.markdown(f"{len(table)} images: **{counts.get('malignant', 0)} malignant** ({rescued} by rescue), "
                f"{counts.get('benign', 0)} benign, {len(gated)} cannot assess, {len(bad)} not scored.")
    for file, reason in zip(gated["file"], gated["gate_reason"]):
        st.warning(f"Cannot assess {file}: {reason}")
    for message in bad:
        st.warning(f"Not scored: {message}")
    st.dataframe(table, hide_index=True)
    st.download_button("Download CSV", table.to_csv(index=False).encode(), file_name="melanoma_predictions.csv",
                       mime="text/csv")


def show_folder(folder: Path) -> None:
    """A results folder's notes (*.md), tables (*.csv) and figures (*.png), in that order."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        if path.suffix == ".md":
            st.markdown(path.read_text())
    for path in files:
        if path.suffix == ".csv":
            st.caption(str(path.relative_to(RESULTS)))
            try:
                st.dataframe(pd.read_csv(path), hide_index=True)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
                st.warning(f"{path.name}: could not be read ({exc})")
    for path in files:
        if path.suffix == ".png":
            st.image(str(path), caption=str(path.relative_to(RESULTS)), width="stretch")


def results_tab() -> None:
    st.caption(f"Everything here is read from {RESULTS} as committed; each folder says which command made it.")
    sections = {"hybrid": ("Hybrid rescue against the classifier alone", "comparison_metrics.csv"),
                "models_evaluation": ("Classifier grid: architectures x training configurations", None)}
    for sub, (title, key_file) in sections.items():
        st.subheader(title)
        folder = RESULTS / sub
        if not folder.is_dir() or not any(folder.iterdir()):
            st.info(f"Not available yet: {folder} is absent (the evaluation has not been run or committed).")
            continue
        if key_file and not any(folder.rglob(key_file)):  # at the top or in a per-model subfolder
            st.info(f"Not available yet: no {key_file} in {folder}.")
        show_folder(folder)
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
        if subfolders:
            pick = st.selectbox("More", subfolders, format_func=lambda p: p.name, key=f"more_{sub}")
            show_folder(pick)
    others = sorted(p for p in RESULTS.iterdir() if p.is_dir() and p.name not in sections) if RESULTS.is_dir() else []
    if others:
        st.subheader("Other results")
        show_folder(st.selectbox("Folder", others, format_func=lambda p: p.name, key="more_results"))


def model_card_tab(predictor: HybridPredictor | None) -> None:
    card = CHECKPOINTS / "MODEL_CARD.md"
    if card.is_file():
        st.markdown(card.read_text())
    else:
        st.info(f"Model card not available: {shown(card)} is absent.")
    st.subheader("Limits")
    st.markdown(LIMITS)
    if predictor is not None:
        st.subheader("Loaded checkpoints")
        st.json(predictor.versions())
        for kind, meta in (("Classifier", predictor.cls_meta), ("VAE", predictor.vae_meta)):
            with st.expander(f"{kind} sidecar"):
                st.json(meta, expanded=False)


def main() -> None:
    st.set_page_config(page_title="Melanoma screening demo (research)", layout="wide")
    st.title("Melanoma screening: classifier + VAE rescue")
    st.warning(f"**{DISCLAIMER}** This demo shows what the research models output; it is not a medical device.")
    predictor, thresholds, problem = sidebar()
    tabs = st.tabs(["Single image", "Batch", "Results", "Model card and limits"])
    for tab, run in zip(tabs[:2], (image_tab, batch_tab)):
        with tab:
            if predictor is None:
                st.error(problem)
            else:
                run(predictor, thresholds)
    with tabs[2]:
        results_tab()
    with tabs[3]:
        model_card_tab(predictor)


main()
