"""Speed of the generators: training images/s of each, and sampling images/s of DDIM against full DDPM.

    # CPU (2 cores; DDPM-1000 dominates: several minutes at --sample-batch 4)
    python scripts/benchmark_generators.py --threads 2
    # one GPU
    python scripts/benchmark_generators.py --device cuda --preset full --sample-batch 64
    # several GPUs: not applicable (each generator trains and samples on one device)

Models have the preset's architecture and random weights (speed does not depend on the weights) and train on random
uint8 images of the real size. Sampling runs DDIM (--ddim-steps) and ancestral DDPM (--ddpm-steps) on the same UNet
and batch, one after the other in this run, and prints both with their ratio, and DDIM with the UNet in
channels_last (NHWC), the layout generators/sample.py loads it in, timed right after DDIM in the default layout.
Timings drift by 2x or more on shared machines: compare numbers from one run.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from data.runtime import add_runtime_options, cli_main, init_device
from generators import ddpm
from generators.train import GeneratorConfig, build_trainer
from generators.upscaler import upscale

BENCHED = ("dcgan", "ddpm", "upscaler", "autoencoder")  # the LDM trains on latents of a trained autoencoder

def timed(fn, repeat: int, warmup: bool = True) -> float:
    """Seconds per call: the median of `repeat` calls, after one untimed warm-up call."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "full"), help="architectures and batch sizes")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per model (after one warm-up)")
    p.add_argument("--sample-batch", type=int, default=4, help="images per sampling call")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="ancestral DDPM steps (1000: the full chain)")
    p.add_argument("--skip-train", action="store_true", help="only time sampling")
    add_runtime_options(p)
    a = p.parse_args()
    device = init_device(a.device, a.threads)
    print(f"device {device}, {torch.get_num_threads()} threads, preset {a.preset}")
    gen = torch.Generator().manual_seed(0)
    trainers = {}
    for model in BENCHED:
        args = GeneratorConfig(model=model, preset=a.preset)
        trainers[model] = build_trainer(args, device, total_steps=1000)
        if a.skip_train:
            continue
        size = args.img_size * args.scale if model == "upscaler" else args.img_size
        x = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=gen)
        y = torch.randint(0, 2, (args.batch_size,), generator=gen)
        seconds = timed(lambda: trainers[model].train_step(x, y, gen), a.train_steps)
        n_params = sum(q.numel() for q in trainers[model].export().parameters()) / 1e6
        unit = f"{args.patch}-px patches" if model == "upscaler" else f"{size}-px images"
        print(f"train {model:>8} ({n_params:.2f}M params, batch {args.batch_size}, bf16 {args.bf16}): "
              f"{args.batch_size / seconds:8.1f} {unit}/s")

    labels = torch.arange(a.sample_batch) % 2
    unet, autocast = trainers["ddpm"].export(), trainers["ddpm"].autocast
    nhwc = ddpm.sampling_layout(copy.deepcopy(unet))  # the layout sample.load_generator gives
    ddpm.generate(unet, labels, gen, "ddim", 1, autocast=autocast)  # warm-up
    rates = {}
    for name, model, sampler, steps, repeat in (("ddim", unet, "ddim", a.ddim_steps, 3),  # median of 3: DDIM is short
                                                ("ddim_nhwc", nhwc, "ddim", a.ddim_steps, 3),
                                                ("ddpm", unet, "ddpm", a.ddpm_steps, 1)):
        seconds = timed(lambda: ddpm.generate(model, labels, gen, sampler, steps, autocast=autocast), repeat,
                        warmup=name == "ddim_nhwc")
        rates[name] = a.sample_batch / seconds
    print(f"sample DDIM-{a.ddim_steps}: {rates['ddim']:.3f} images/s | DDPM-{a.ddpm_steps}: {rates['ddpm']:.4f} "
          f"images/s | DDIM is {rates['ddim'] / rates['ddpm']:.1f}x faster (batch {a.sample_batch}, bf16 {autocast})")
    print(f"sample DDIM-{a.ddim_steps} channels_last: {rates['ddim_nhwc']:.3f} images/s, "
          f"{rates['ddim_nhwc'] / rates['ddim']:.2f}x the default layout")
    dcgan = trainers["dcgan"]
    seconds = timed(lambda: dcgan.generate(torch.arange(64) % 2, gen), 3)
    print(f"sample DCGAN: {64 / seconds:.1f} images/s (batch 64)")
    lr = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, generator=gen)
    seconds = timed(lambda: upscale(trainers["upscaler"].export().to(device), lr), 3)
    print(f"upscale 64 -> {64 * trainers['upscaler'].export().scale} px: {64 / seconds:.1f} images/s (batch 64)")


if __name__ == "__main__":
    main()
