"""Serving the hybrid's two models: backends that run the classifier + VAE pair on a batch, and their ONNX export.

`TorchBackend` runs the models eagerly; `OnnxBackend` (ONNX Runtime) and `OpenVinoBackend` (OpenVINO, CPU) run
exported ONNX files. An export is cached under the cache folder, keyed by the weights' sha256 and the sidecar fields
that shape the graph (`export_key`), so a retrained checkpoint never reuses a stale graph; a cached file the runtime
cannot open (damaged, truncated) is exported again (`open_exported`). The rescue rule and the predictor that uses
these backends live in hybrid.py, which imports this module, never the reverse. DISCLAIMER is the line every front
end (inference.py, the Streamlit demo) shows with a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly_detection.vae import ConvVAE, VAEScorer
from data.atomic import atomic_write
from data.cache import DEFAULT_CACHE_DIR
from data.checkpoint import CheckpointError, file_digest

BACKENDS = ("torch", "onnx", "openvino", "openvino-bf16")
DISCLAIMER = "Research software, not a diagnosis: any concerning lesion needs a clinician's examination."


class TorchBackend:
    def __init__(self, classifier: torch.nn.Module, vae: ConvVAE, device: torch.device):
        self.device = device
        self.classifier = classifier.to(device).eval().to(memory_format=torch.channels_last)
        self.scorer = VAEScorer(vae).to(device).eval()

    @torch.no_grad()
    def run(self, cls_x: np.ndarray, vae_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs = self.classifier(torch.from_numpy(cls_x).to(self.device).contiguous(memory_format=torch.channels_last))
        score, recon = self.scorer(torch.from_numpy(vae_x).to(self.device))
        return probs.softmax(1)[:, 1].cpu().numpy(), score.cpu().numpy(), recon.cpu().numpy()


class _Probabilities(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


def export_onnx(module: torch.nn.Module, size: int, path: Path, outputs: list[str]) -> Path:
    """Export with a dynamic batch axis, atomically (TorchScript-based exporter: no extra dependency)."""

    def export(file: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                (torch.rand(1, 3, size, size),),
                str(file),
                input_names=["x"],
                output_names=outputs,
                dynamic_axes={"x": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                opset_version=17,
                dynamo=False,
            )

    return atomic_write(path, export)


def export_key(path: str | os.PathLike, meta: dict[str, Any]) -> str:
    """The cache key of a checkpoint's exported graph: its weights' sha256 and the sidecar fields that shape it."""
    shape = {k: meta.get(k) for k in ("kind", "arch", "arch_kwargs", "input_size", "class_names", "tta")}
    weights = Path(path).with_suffix(".safetensors")
    return hashlib.sha256((file_digest(weights) + json.dumps(shape, sort_keys=True)).encode()).hexdigest()[:16]


def exported_models(
    classifier: torch.nn.Module,
    cls_meta: dict,
    cls_path: str,
    vae: ConvVAE,
    vae_meta: dict,
    vae_path: str,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """ONNX files of both models, exported once per checkpoint (`export_key`) into the cache folder."""
    folder = Path(cache_dir or DEFAULT_CACHE_DIR) / "onnx"
    cls_file = folder / f"classifier_{export_key(cls_path, cls_meta)}.onnx"
    vae_file = folder / f"vae_{export_key(vae_path, vae_meta)}.onnx"
    if not cls_file.exists():
        export_onnx(_Probabilities(classifier), cls_meta["input_size"], cls_file, ["probs"])
    if not vae_file.exists():
        export_onnx(VAEScorer(vae), vae_meta["input_size"], vae_file, ["score", "recon"])
    return cls_file, vae_file


class OnnxBackend:
    """ONNX Runtime sessions for both exported models (CUDA provider when the installed build has it)."""

    def __init__(self, files: tuple[Path, Path], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads would spin against torch's OpenMP pool (decode and resize run in torch): on 16 cores that
        # made one image take 212 ms instead of 20 (README, "On one GPU"); without spinning they sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.cls, self.vae = (ort.InferenceSession(str(f), options, providers=providers) for f in files)

    def run(self, cls_x: np.ndarray, vae_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs = self.cls.run(None, {"x": cls_x})[0]
        score, recon = self.vae.run(None, {"x": vae_x})
        return probs[:, 1], score, recon


class OpenVinoBackend:
    """OpenVINO on CPU from the same ONNX files; `bf16=True` asks for bf16 inference where the CPU has it (AVX-512
    BF16 / AMX): faster, at a measured cost in precision (scripts/benchmark_inference.py reports it)."""

    def __init__(self, files: tuple[Path, Path], threads: int | None = None, bf16: bool = False):
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "INFERENCE_NUM_THREADS": threads or len(os.sched_getaffinity(0)),
        }
        self.cls, self.vae = (core.compile_model(str(f), "CPU", config) for f in files)

    def run(self, cls_x: np.ndarray, vae_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs = self.cls({0: cls_x})[0]
        out = self.vae({0: vae_x})
        return np.asarray(probs)[:, 1], np.asarray(out[0]), np.asarray(out[1])


def open_exported(export: Callable[[], tuple[Path, Path]], open_backend: Callable[[tuple[Path, Path]], Any]) -> Any:
    """Open a backend on the cached exports; if the runtime cannot read them (a damaged or truncated cache file),
    delete them, export again and retry once."""
    files = export()
    try:
        return open_backend(files)
    except Exception:  # noqa: BLE001 - ONNX Runtime raises its own Exception subclasses, OpenVINO RuntimeError
        for file in files:
            file.unlink(missing_ok=True)
    files = export()
    try:
        return open_backend(files)
    except Exception as exc:  # noqa: BLE001 - as above
        raise CheckpointError(f"{files[0].parent}: the exported models cannot be opened even after exporting them "
                              f"again ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
