"""The hybrid "rescue" rule and the predictor that serves it.

Rule (DESIGN.md): `P(malignant) >= malignant_threshold` -> the classifier says malignant; `vae_score >=
anomaly_threshold` -> anomalous; rescued = classifier benign AND anomalous; final = classifier malignant OR rescued.
Both thresholds come from the checkpoints' sidecars (classifier: chosen on val; VAE: calibrated on calib) unless the
caller overrides them. Each model gets its own preprocessing from its own sidecar: the classifier sees ImageNet-
normalised pixels, the VAE [0,1] pixels, from one decode of the file.

Out-of-distribution gate (anomaly_detection/gate.py), asked before any verdict when the predictor is given one: an
image that is not a dermoscopic lesion, or not one that can be assessed (too small, near-constant, greyscale, too
noisy, unlike every lesion in the ImageNet EfficientNet-Lite0 features, or like the non-lesion examples) gets
`decision = "cannot assess"` with the gate's reason and numbers, and no benign/malignant verdict (`final_malignant`
null; the classifier and VAE fields are still computed, for research). The gate is one extra Lite0 pass per image,
loaded on first use, batched with the other models, and always runs on torch whatever the serving backend.

A model output that is not a finite number (NaN or infinity) is never passed on as a decision: the image's
`Prediction` carries `error` and null numbers instead. The backends that run the two models (torch, ONNX Runtime,
OpenVINO) and the ONNX export are in serving.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomaly_detection.gate import GateResult, LesionScreen, Original
from anomaly_detection.serving import (
    BACKENDS,
    OnnxBackend,
    OpenVinoBackend,
    TorchBackend,
    exported_models,
    open_exported,
)
from anomaly_detection.vae import ConvVAE
from classifiers.models import PretrainedWeightsError, load_classifier
from data.checkpoint import CheckpointError, load_checkpoint, verify_checkpoint
from data.images import ImageError, load_rgb
from data.transforms import Preprocess

NON_FINITE = "the model output is not a finite number (NaN or infinity): the checkpoint is unusable"


def build_vae(meta: dict[str, Any]) -> ConvVAE:
    kwargs = meta["arch_kwargs"]
    return ConvVAE(meta["input_size"], kwargs["latent_dim"], tuple(kwargs["channels"]),
                   kwargs.get("score_region", "image"))


def load_vae(path: str | os.PathLike) -> tuple[ConvVAE, dict[str, Any]]:
    return load_checkpoint(path, build_vae, kind="vae")


def rescue(
    prob: np.ndarray, score: np.ndarray, malignant_threshold: float, anomaly_threshold: float
) -> dict[str, np.ndarray]:
    """The rescue truth table, vectorised."""
    classifier = np.asarray(prob) >= malignant_threshold
    anomalous = np.asarray(score) >= anomaly_threshold
    rescued = ~classifier & anomalous
    return {
        "pred_classifier": classifier,
        "anomalous": anomalous,
        "rescued": rescued,
        "pred_hybrid": classifier | rescued,
    }


@dataclass
class Prediction:
    """One image's result; the keys of `inference.py --output` JSON. An image without a result (`error` set) has
    null numbers, never NaN. `gate_ok` is None when no gate ran, False for "cannot assess" (then `final_malignant`
    is None whatever the models said). `status`: assessed, cannot assess or error; `decision`: malignant, benign,
    cannot assess or error."""

    path: str
    prob_malignant: float | None = None
    malignant_threshold: float | None = None
    classifier_malignant: bool = False
    vae_score: float | None = None
    anomaly_threshold: float | None = None
    anomalous: bool = False
    rescued: bool = False
    final_malignant: bool | None = False
    out_of_distribution: bool = False
    error: str = ""
    gate_ok: bool | None = None
    gate_reason: str = ""
    gate_distance: float | None = None
    gate_threshold: float | None = None
    gate_probe_score: float | None = None
    gate_probe_threshold: float | None = None
    status: str = field(default="", init=False)
    decision: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.gate_ok is False:
            self.final_malignant = None
        self.status = "error" if self.error else ("cannot assess" if self.gate_ok is False else "assessed")
        if self.status == "assessed":
            self.decision = "malignant" if self.final_malignant else "benign"
        else:
            self.decision = self.status

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_fields(result: GateResult | None) -> dict[str, Any]:
    """A gate verdict as Prediction keyword arguments (a score that was not computed, NaN, becomes None)."""
    if result is None:
        return {}

    def number(value: float) -> float | None:
        return float(value) if math.isfinite(value) else None

    return {"gate_ok": bool(result.ok), "gate_reason": result.reason, "gate_distance": number(result.distance),
            "gate_threshold": number(result.threshold), "gate_probe_score": number(result.probe_score),
            "gate_probe_threshold": number(result.probe_threshold)}


class HybridPredictor:
    """Classifier + VAE + rescue, behind the out-of-distribution gate when `gate` (a gate checkpoint) is given.
    `predict_paths`/`predict_batches` decode files (in parallel threads), `predict_image` takes a decoded image;
    both return per-image `Prediction`s."""

    def __init__(
        self,
        classifier_path: str | os.PathLike,
        vae_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        backend: str = "torch",
        malignant_threshold: float | None = None,
        anomaly_threshold: float | None = None,
        threads: int | None = None,
        gate: str | os.PathLike | None = None,
    ):
        classifier, self.cls_meta = load_classifier(classifier_path)
        vae, self.vae_meta = load_vae(vae_path)
        if self.cls_meta.get("malignant_threshold") is None and malignant_threshold is None:
            raise CheckpointError(
                f"{classifier_path}: no malignant_threshold in its sidecar (train it with classifiers/train.py)"
            )
        if self.vae_meta.get("anomaly_threshold") is None and anomaly_threshold is None:
            raise CheckpointError(
                f"{vae_path}: no anomaly_threshold in its sidecar; run anomaly_detection/calibrate.py"
            )
        self.malignant_threshold = float(
            malignant_threshold if malignant_threshold is not None else self.cls_meta["malignant_threshold"]
        )
        self.anomaly_threshold = float(
            anomaly_threshold if anomaly_threshold is not None else self.vae_meta["anomaly_threshold"]
        )
        if not (math.isfinite(self.malignant_threshold) and math.isfinite(self.anomaly_threshold)):
            raise ValueError("thresholds must be finite numbers (a NaN threshold would call every image benign)")
        self.integrity = {"classifier": verify_checkpoint(classifier_path), "vae": verify_checkpoint(vae_path)}
        self.gate_path, self._screen, self.device = gate, None, torch.device(device)
        if gate is not None:
            self.integrity["gate"] = verify_checkpoint(gate)
        self.cls_prep, self.vae_prep = Preprocess.from_meta(self.cls_meta), Preprocess.from_meta(self.vae_meta)
        quantiles = self.vae_meta.get("calib_benign_score_quantiles", {})
        self.ood_score = float(quantiles["1.0"]) if "1.0" in quantiles else float("inf")
        self.paths = {"classifier": str(classifier_path), "vae": str(vae_path)}
        if gate is not None:
            self.paths["gate"] = str(gate)
        self.backend_name = backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        if backend == "torch":
            self.backend = TorchBackend(classifier, vae, torch.device(device))
        else:
            def export() -> tuple[Path, Path]:
                return exported_models(
                    classifier, self.cls_meta, str(classifier_path), vae, self.vae_meta, str(vae_path)
                )

            def open_backend(files: tuple[Path, Path]) -> OnnxBackend | OpenVinoBackend:
                if backend == "onnx":
                    return OnnxBackend(files, threads)
                return OpenVinoBackend(files, threads, bf16=backend == "openvino-bf16")

            self.backend = open_exported(export, open_backend)
        self.classifier, self.vae = classifier, vae

    def load_gate(self) -> LesionScreen | None:
        """The gate (None without one), loaded on first use and kept: a predictor that never predicts, or runs
        without a gate, does not load the backbone."""
        if self.gate_path is not None and self._screen is None:
            try:
                self._screen = LesionScreen.load(self.gate_path, device=self.device)
            except PretrainedWeightsError as exc:
                raise CheckpointError(f"{self.gate_path}: the gate's backbone cannot be loaded ({exc})") from None
        return self._screen

    def versions(self) -> dict[str, Any]:
        keys = ("arch", "epoch", "config", "manifest_sha256", "threshold_rule", "tta", "anomaly_threshold_rule")
        return {
            "classifier": {
                "path": self.paths["classifier"],
                **{k: self.cls_meta.get(k) for k in keys if k in self.cls_meta},
            },
            "vae": {"path": self.paths["vae"], **{k: self.vae_meta.get(k) for k in keys if k in self.vae_meta}},
            "gate": {"path": self.paths["gate"], "backend": "torch"} if self.gate_path is not None else None,
            "backend": self.backend_name,
            "integrity": self.integrity,
        }

    def pixels(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """One decoded image -> (classifier uint8, VAE uint8), each by its own checkpoint's resize rule."""
        cls_px = self.cls_prep.pixels(image)
        same = (self.vae_prep.size, self.vae_prep.rule) == (self.cls_prep.size, self.cls_prep.rule)
        return cls_px, cls_px if same else self.vae_prep.pixels(image)

    def run_arrays(self, cls_px: np.ndarray, vae_px: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 N x H x W x 3 batches -> (P(malignant), VAE score, reconstruction N x 3 x H x W in [0,1])."""
        cls_x = self.cls_prep.tensor(
            torch.from_numpy(np.require(cls_px, requirements=["C", "W"])).permute(0, 3, 1, 2)
        ).numpy()
        vae_x = self.vae_prep.tensor(
            torch.from_numpy(np.require(vae_px, requirements=["C", "W"])).permute(0, 3, 1, 2)
        ).numpy()
        return self.backend.run(np.ascontiguousarray(cls_x), np.ascontiguousarray(vae_x))

    def check_gate(self, inputs: Sequence[tuple[np.ndarray, Original] | None]) -> list[GateResult | None]:
        """The gate's verdicts for images given as `gate_input(image)`; all None without a gate."""
        screen = self.load_gate()
        if screen is None or not len(inputs):
            return [None] * len(inputs)
        pixels, originals = zip(*inputs)
        return screen.run(np.stack(pixels), originals).gate

    def gate_input(self, image: Image.Image) -> tuple[np.ndarray, Original] | None:
        """What the gate needs of an image: its pixels at the backbone's size and its Original (None: no gate)."""
        screen = self.load_gate()
        return None if screen is None else screen.inputs(image)

    def decide(self, names: list[str], probs: np.ndarray, scores: np.ndarray,
               gates: Sequence[GateResult | None] | None = None) -> list[Prediction]:
        """The rescue rule per image, behind the gate's verdicts (`gates`, one per image, None where no gate ran);
        an image whose outputs are not finite (or missing: None) gets `error` (NON_FINITE) instead of a decision."""
        probs, scores = np.asarray(probs, dtype=float), np.asarray(scores, dtype=float)
        gates = gates if gates is not None else [None] * len(names)
        finite = np.isfinite(probs) & np.isfinite(scores)
        with np.errstate(invalid="ignore"):
            r = rescue(probs, scores, self.malignant_threshold, self.anomaly_threshold)
        return [
            Prediction(name, error=f"{name}: {NON_FINITE}", **gate_fields(gates[i]))
            if not finite[i]
            else Prediction(
                name,
                float(p),
                self.malignant_threshold,
                bool(r["pred_classifier"][i]),
                float(s),
                self.anomaly_threshold,
                bool(r["anomalous"][i]),
                bool(r["rescued"][i]),
                bool(r["pred_hybrid"][i]),
                bool(s > self.ood_score),
                **gate_fields(gates[i]),
            )
            for i, (name, p, s) in enumerate(zip(names, probs, scores))
        ]

    def image_outputs(self, image: Image.Image) -> tuple[float, float, np.ndarray, GateResult | None]:
        """One PIL image -> what the networks say before any decision: (P(malignant), VAE score, VAE reconstruction
        H x W x 3 uint8, the gate's verdict or None without a gate)."""
        cls_px, vae_px = self.pixels(image)
        probs, scores, recon = self.run_arrays(cls_px[None], vae_px[None])
        gate = self.check_gate([self.gate_input(image)])[0]
        return float(probs[0]), float(scores[0]), (recon[0].transpose(1, 2, 0) * 255).round().astype(np.uint8), gate

    def predict_image(self, image: Image.Image, name: str = "<image>") -> tuple[Prediction, np.ndarray]:
        """One PIL image -> (Prediction, VAE reconstruction H x W x 3 uint8)."""
        prob, score, recon, gate = self.image_outputs(image)
        return self.decide([name], [prob], [score], [gate])[0], recon

    def predict_batches(
        self, paths: Iterable[str | os.PathLike], batch_size: int = 32, workers: int = 2
    ) -> Iterator[list[Prediction]]:
        """Files -> one list of Predictions per batch, in input order, as each batch is done (a caller can save them
        before the next batch runs). Unreadable files give a Prediction with `error` set; the run goes on. Decoding
        runs in a thread pool ahead of the models (PIL releases the GIL while decoding)."""
        paths = [str(p) for p in paths]
        screen = self.load_gate()  # here, once, not by several decoding threads at once

        def prepare(path: str) -> tuple[str, tuple | None, str]:
            """(path, (classifier px, VAE px, gate input) or None, error)."""
            try:
                image = load_rgb(path)
                return path, (*self.pixels(image), None if screen is None else screen.inputs(image)), ""
            except ImageError as exc:
                return path, None, str(exc)

        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        with ThreadPoolExecutor(workers) as pool:
            pending = [pool.submit(prepare, p) for p in batches[0]] if batches else []
            for k in range(len(batches)):
                items = [f.result() for f in pending]
                # Decode the next batch while the models run on this one.
                pending = [pool.submit(prepare, p) for p in batches[k + 1]] if k + 1 < len(batches) else []
                good = [(path, px) for path, px, err in items if not err]
                decided = {}
                if good:
                    names, (cls_px, vae_px, gate_in) = [g[0] for g in good], zip(*[g[1] for g in good])
                    probs, scores, _ = self.run_arrays(np.stack(cls_px), np.stack(vae_px))
                    gates = self.check_gate(gate_in)
                    decided = dict(zip(names, self.decide(names, probs, scores, gates)))
                yield [decided.get(path) or Prediction(path, error=err) for path, _, err in items]

    def predict_paths(
        self, paths: Iterable[str | os.PathLike], batch_size: int = 32, workers: int = 2
    ) -> list[Prediction]:
        """All of `predict_batches` as one list."""
        return [p for batch in self.predict_batches(paths, batch_size, workers) for p in batch]
