"""End-to-end inference speed (decode, preprocess, classifier + VAE), naive against optimized, in one run.

    python scripts/benchmark_inference.py                       # shipped checkpoints, 256 real HAM10000 test images
    python scripts/benchmark_inference.py --n 1000 --out results/benchmarks/inference.txt
    python scripts/benchmark_inference.py --device cuda         # torch paths on GPU (ONNX Runtime uses CUDA if built so)

Paths measured side by side on the same files:
  naive      eager fp32 torch, one image at a time (decode -> resize -> both models);
  onnx-1     ONNX Runtime, one image at a time (the latency a single user waits for);
  onnx-batch ONNX Runtime in batches, with decoding in a thread pool ahead of the models (a folder run).
It prints images/s, median and p90 ms per image, and the ratios against the naive path.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from anomaly_detection.hybrid import HybridPredictor  # noqa: E402
from data.atomic import atomic_write_text  # noqa: E402
from data.images import load_rgb  # noqa: E402
from data.manifest import read_manifest  # noqa: E402
from data.runtime import setup_cpu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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
    p.add_argument("--classifier", default=str(ROOT / "checkpoints" / "densenet121.safetensors"), help="classifier checkpoint")
    p.add_argument("--vae", default=str(ROOT / "checkpoints" / "convvae.safetensors"), help="VAE checkpoint")
    p.add_argument("--manifest", default=str(ROOT / "data" / "manifests" / "original.csv"), help="where the images come from")
    p.add_argument("--n", type=int, default=256, help="number of real test images")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the batched path")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="device of the torch path")
    p.add_argument("--out", default=None, help="also write the report to this text file")
    a = p.parse_args(argv)
    setup_cpu(a.threads)
    df = read_manifest(a.manifest)
    paths = list(df[df["split"] == "test"]["path"].iloc[: a.n])
    naive = HybridPredictor(a.classifier, a.vae, a.device, backend="torch")
    onnx = HybridPredictor(a.classifier, a.vae, backend="onnx", threads=a.threads)
    for predictor in (naive, onnx):  # warm-up: first calls allocate and (for ONNX) optimise the graph
        predictor.predict_paths(paths[:8], 8)
    rows = {"naive (torch eager fp32, 1 at a time)": one_at_a_time(naive, paths),
            "onnx-1 (ONNX Runtime, 1 at a time)": one_at_a_time(onnx, paths),
            f"onnx-batch (ONNX Runtime, batch {a.batch_size}, threaded decode)": batched(onnx, paths, a.batch_size)}
    base_ips, base_ms = rows["naive (torch eager fp32, 1 at a time)"][0], None
    lines = [f"# scripts/benchmark_inference.py --n {a.n} --batch-size {a.batch_size}",
             f"# {len(paths)} real HAM10000 test JPEGs; {platform.processor() or platform.machine()}, "
             f"{a.threads or 'all'} threads; classifier {Path(a.classifier).name}, VAE {Path(a.vae).name}",
             f"{'path':<62} {'images/s':>9} {'median ms':>10} {'p90 ms':>8} {'x naive':>8}"]
    for name, (ips, ms) in rows.items():
        base_ms = base_ms or float(np.median(ms))
        lines.append(f"{name:<62} {ips:9.1f} {np.median(ms):10.1f} {np.quantile(ms, 0.9):8.1f} {ips / base_ips:8.2f}")
    onnx1_ms = float(np.median(rows["onnx-1 (ONNX Runtime, 1 at a time)"][1]))
    lines.append(f"single-image latency: naive {base_ms:.1f} ms -> onnx {onnx1_ms:.1f} ms ({base_ms / onnx1_ms:.2f}x better); "
                 f"throughput: {max(r[0] for r in rows.values()) / base_ips:.2f}x the naive path")
    report = "\n".join(lines)
    print(report)
    if a.out:
        atomic_write_text(a.out, report + "\n")
    return report


if __name__ == "__main__":
    main()
