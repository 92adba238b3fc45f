"""Training throughput (images/s) of every registry architecture, side by side, from one run.

    # CPU (what results/benchmarks/training_throughput.csv holds; a few minutes on 2 cores):
    python scripts/benchmark_training.py --warmup 2 --steps 4 --threads 1 --note "shared with a training job"
    # one GPU (bf16 autocast + channels_last there too; larger inputs):
    python scripts/benchmark_training.py --device cuda --img-size 224 --batch-size 64 --steps 20
    # several GPUs: throughput is per device, so run it once on one device of each kind.

One step = normalisation + forward + backward + AdamW step on a batch of real uint8 HAM10000 `fit` images from the
preprocessing cache (augmentation and EMA are left out: they cost the same for every architecture). Every
architecture is timed with bf16 autocast and channels_last, the CPU training setting, at its registry default input
size unless --img-size is given; DenseNet-121 is also timed in fp32 NCHW right after, in the same run, so the gain of
that setting is measured here rather than assumed. Images/s = batch size / median step time. The CSV goes to --out
and a Markdown note beside it records the command, the machine, --note and the table.
"""
from __future__ import annotations

import argparse
import inspect
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from classifiers.models import MODELS, create_model, list_models
from data.cache import CachedImages
from data.checkpoint import atomic_write_text
from data.manifest import read_manifest
from data.paths import MANIFESTS, RESULTS
from data.runtime import UserError, add_runtime_options, cli_main, init_device, seed_everything
from data.transforms import Preprocess, preprocess_meta

SETTINGS = {"bf16_channels_last": (True, torch.channels_last), "fp32_nchw": (False, torch.contiguous_format)}
BASELINE_ARCH = "densenet121"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list_models(), choices=list_models(), help="architectures to time")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size for every architecture (default: each one's registry default)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per architecture and setting")
    p.add_argument("--steps", type=int, default=5, help="timed steps per architecture and setting")
    p.add_argument("--manifest", type=Path, default=MANIFESTS / "original.csv",
                   help="manifest whose fit split supplies the images (through the preprocessing cache)")
    p.add_argument("--synthetic", action="store_true", help="random uint8 images instead of the manifest's")
    add_runtime_options(p, seed=0)
    p.add_argument("--note", default="", help="free text for the Markdown note (e.g. what else ran on the machine)")
    p.add_argument("--out", type=Path, default=RESULTS / "benchmarks" / "training_throughput.csv",
                   help="CSV to write; the note goes beside it with the suffix .md")
    return p.parse_args(argv)


def default_size(arch: str) -> int:
    return inspect.signature(MODELS[arch]).parameters["img_size"].default


def batches(args: argparse.Namespace, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """warmup + steps batches of uint8 N x 3 x size x size images and their labels, the same for every model."""
    n = (args.warmup + args.steps) * args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    if args.synthetic:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 2, (n,), generator=gen)
    else:
        df = read_manifest(args.manifest)
        fit = CachedImages(df[df["split"] == "fit"], size, in_memory=False)
        rows = torch.randperm(len(fit), generator=gen)[:n].tolist()
        if len(rows) < n:
            raise UserError(f"{args.manifest}: fit split has {len(fit)} images, the run needs {n}")
        images, labels = (torch.stack(t) for t in zip(*(fit[i] for i in rows)))
    return list(zip(images.split(args.batch_size), labels.split(args.batch_size)))


def time_training(arch: str, size: int, setting: str, data: list[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, warmup: int, seed: int) -> tuple[float, list[float]]:
    """Parameters (millions) and the seconds of each timed training step."""
    bf16, memory_format = SETTINGS[setting]
    seed_everything(seed)
    model = create_model(arch, img_size=size).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    preprocess = Preprocess.from_meta(preprocess_meta(size))
    seconds = []
    for images, labels in data:
        t0 = time.perf_counter()
        x = preprocess.tensor(images.to(device)).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return sum(p.numel() for p in model.parameters()) / 1e6, seconds[warmup:]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


@cli_main
def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    device = init_device(args.device, args.threads)
    rows, data = [], {}
    for arch in args.archs:
        size = args.img_size or default_size(arch)
        if size not in data:
            data[size] = batches(args, size)
        for setting in ("bf16_channels_last", "fp32_nchw") if arch == BASELINE_ARCH else ("bf16_channels_last",):
            params, seconds = time_training(arch, size, setting, data[size], device, args.warmup, args.seed)
            median = float(pd.Series(seconds).median())
            rows.append({"arch": arch, "setting": setting, "params_m": round(params, 2), "img_size": size,
                         "batch_size": args.batch_size, "images_per_s": round(args.batch_size / median, 2),
                         "step_s_median": round(median, 3), "step_s_min": round(min(seconds), 3),
                         "warmup": args.warmup, "steps": args.steps, "device": str(device),
                         "threads": torch.get_num_threads() if device.type == "cpu" else None,
                         "data": "synthetic" if args.synthetic else f"{args.manifest.name}:fit"})
            print(f"{arch:12s} {setting:18s} {rows[-1]['images_per_s']:8.2f} images/s "
                  f"(median step {median:.3f} s)", flush=True)
    df = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, df.to_csv(index=False))
    table = df[["arch", "setting", "params_m", "img_size", "images_per_s", "step_s_median", "step_s_min"]]
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    command = shlex.join(["python", "scripts/benchmark_training.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# Training throughput ({args.out.name})", "", f"Command: `{command}`",
             f"Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()}, device {device}{gpu}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}.", ""]
    if args.note:
        lines += [f"Note: {args.note}", ""]
    lines += ["```", table.to_string(index=False), "```", ""]
    base = df[df["arch"] == BASELINE_ARCH].set_index("setting")["images_per_s"]
    if len(base) == 2:
        ratio = base["bf16_channels_last"] / base["fp32_nchw"]
        lines += [f"DenseNet-121, bf16 autocast + channels_last vs fp32 NCHW, same run: {ratio:.2f}x.", ""]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n" + table.to_string(index=False))
    if len(base) == 2:
        print(lines[-2])
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return df


if __name__ == "__main__":
    main()
