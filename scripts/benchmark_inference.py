"""End-to-end inference speed (decode, preprocess, classifier + VAE), naive against optimized, in one run.

    python scripts/benchmark_inference.py                       # shipped checkpoints, 256 real HAM10000 test images
    python scripts/benchmark_inference.py --n 1000 --out results/benchmarks/inference.txt
    python scripts/benchmark_inference.py --device cuda   # torch path on GPU (ONNX Runtime uses CUDA if built so)

Paths measured side by side on the same files:
  naive                 eager fp32 torch, one image at a time (decode -> resize -> both models);
  <backend>, 1 at a time  an exported backend, one image at a time (the latency a single user waits for);
  <backend>, batch N      the same in batches, decoding in a thread pool ahead of the models (a folder run).
Backends: onnx (ONNX Runtime fp32), openvino (fp32), openvino-bf16 (bf16 where the CPU has it). It prints images/s,
median and p90 ms per image, the ratios against the naive path, and each backend's numerical parity with torch.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from anomaly_detection.hybrid import HybridPredictor
from classifiers.shipped import resolve_classifier
from data.atomic import atomic_write_text
from data.images import load_rgb
from data.manifest import read_manifest
from data.paths import CHECKPOINTS, MANIFESTS
from data.runtime import setup_cpu


def one_at_a_time(predictor: HybridPredictor, paths: list[str]) -> tuple[float, np.ndarray]:
    times = []
    start = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        predictor.predict_image(load_rgb(path), path)
        times.append(time.perf_counter() - t0)
    return len(paths) / (time.perf_counter() - start), np.array(times) * 1000


def batched(predictor: HybridPredictor, paths: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    predictor.predict_paths(paths, batch_size)
    seconds = time.perf_counter() - start
    return len(paths) / seconds, np.full(1, seconds * 1000 / len(paths))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--classifier", default=None,
        help="classifier checkpoint or the name of a shipped one (default: the shipped default; classifiers/shipped.py)"
    )
    p.add_argument("--vae", default=str(CHECKPOINTS / "convvae.safetensors"), help="VAE checkpoint")
    p.add_argument(
        "--manifest", default=str(MANIFESTS / "original.csv"), help="where the images come from"
    )
    p.add_argument("--n", type=int, default=256, help="number of real test images")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the batched paths")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["onnx", "openvino", "openvino-bf16"],
        help="exported backends to compare with the naive torch path",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="device of the torch path")
    p.add_argument("--out", default=None, help="also write the report to this text file")
    a = p.parse_args(argv)
    a.classifier = resolve_classifier(a.classifier)
    setup_cpu(a.threads)
    df = read_manifest(a.manifest)
    paths = list(df[df["split"] == "test"]["path"].iloc[: a.n])
    naive = HybridPredictor(a.classifier, a.vae, a.device, backend="torch")
    reference = naive.predict_paths(paths, a.batch_size)
    rows = {"naive: torch eager fp32, 1 at a time": one_at_a_time(naive, paths)}
    parity = {}
    for backend in a.backends:
        predictor = HybridPredictor(a.classifier, a.vae, backend=backend, threads=a.threads)
        results = predictor.predict_paths(paths, a.batch_size)  # also the warm-up
        parity[backend] = (
            max(abs(r.prob_malignant - q.prob_malignant) for r, q in zip(reference, results)),
            max(abs(r.vae_score - q.vae_score) for r, q in zip(reference, results)),
            sum(r.decision != q.decision for r, q in zip(reference, results)),
        )
        rows[f"{backend}, 1 at a time"] = one_at_a_time(predictor, paths)
        rows[f"{backend}, batch {a.batch_size}, threaded decode"] = batched(predictor, paths, a.batch_size)
    base_ips, base_ms = (
        rows["naive: torch eager fp32, 1 at a time"][0],
        float(np.median(rows["naive: torch eager fp32, 1 at a time"][1])),
    )
    lines = [
        f"# python scripts/benchmark_inference.py --n {a.n} --batch-size {a.batch_size}"
        + (f" --threads {a.threads}" if a.threads else ""),
        f"# {len(paths)} real HAM10000 test JPEGs, end to end (decode, resize, classifier + VAE); "
        f"{platform.machine()}, {a.threads or len(os.sched_getaffinity(0))} threads; "
        f"{Path(a.classifier).name} + {Path(a.vae).name}",
        f"{'path':<48} {'images/s':>9} {'median ms':>10} {'p90 ms':>8} {'x naive':>8}",
    ]
    for name, (ips, ms) in rows.items():
        lines.append(f"{name:<48} {ips:9.1f} {np.median(ms):10.1f} {np.quantile(ms, 0.9):8.1f} {ips / base_ips:8.2f}")
    lines.append("parity with torch fp32 on these images: max |dP(malignant)|, max |dVAE score|, decisions that differ")
    lines += [f"  {b:<16} {dp:.2e}  {ds:.2e}  {dd}" for b, (dp, ds, dd) in parity.items()]
    best_single = min(
        (float(np.median(ms)), name)
        for name, (ips, ms) in rows.items()
        if "1 at a time" in name and not name.startswith("naive")
    )
    best_batch = max((ips, name) for name, (ips, _) in rows.items())
    lines.append(
        f"single-image latency: naive {base_ms:.1f} ms -> {best_single[0]:.1f} ms ({best_single[1]}): "
        f"{base_ms / best_single[0]:.2f}x better"
    )
    lines.append(
        f"throughput: naive {base_ips:.1f} -> {best_batch[0]:.1f} images/s ({best_batch[1]}): "
        f"{best_batch[0] / base_ips:.2f}x"
    )
    report = "\n".join(lines)
    print(report)
    if a.out:
        atomic_write_text(a.out, report + "\n")
    return report


if __name__ == "__main__":
    main()
