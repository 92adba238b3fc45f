"""Generators, the upscaler, sampling, quality metrics and the dataset configurations, on tiny generated inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import data.cache
from data import configs
from data.checkpoint import load_checkpoint, save_checkpoint
from data.manifest import read_manifest, write_manifest
from data.runtime import UserError
from data.training import load_state, save_state
from data.transforms import preprocess_meta
from generators import ddpm, latent, sample, train
from generators.dcgan import DCGANTrainer, build_generator
from generators.ddpm import DDPMTrainer
from generators.upscaler import Upscaler, UpscalerTrainer, bicubic, build_upscaler, load_upscaler, psnr, ssim
from studies import generator_quality as quality

TINY_DDPM = {"channels": [8, 16], "attention": [False, True], "norm_groups": 4, "image_size": 32}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private preprocessing cache, a seed, and one thread (the CLIs here set it; restored afterwards)."""
    monkeypatch.setattr(data.cache, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_image(rng: np.random.Generator, size: tuple[int, int] = (80, 60), dark: bool = False) -> Image.Image:
    """A skin-coloured background with a brown ellipse: enough structure for shapes and metrics."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.15, 0.35) * h
    inside = ((xx - cx) / (1.3 * r)) ** 2 + ((yy - cy) / r) ** 2 < 1
    img = np.empty((h, w, 3))
    img[:] = (220, 170, 150)
    img[inside] = (60, 35, 25) if dark else (140, 90, 60)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


@pytest.fixture
def manifest(tmp_path) -> Path:
    """A real-only manifest: fit 12 benign + 4 malignant; val, calib, test, external 4 each (2 + 2)."""
    rng = np.random.default_rng(0)
    rows = []
    plan = [("fit", "benign", 12), ("fit", "malignant", 4)] + \
           [(s, lab, 2) for s in ("val", "calib", "test", "external") for lab in ("benign", "malignant")]
    for split, label, n in plan:
        for i in range(n):
            path = tmp_path / "images" / split / label / f"{split}_{label}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            blob_image(rng, dark=label == "malignant").save(path)
            rows.append({"path": str(path), "label": label, "split": split, "source": "real",
                         "lesion_id": f"L_{split}_{label}_{i}"})
    out = tmp_path / "manifests" / "original.csv"
    write_manifest(pd.DataFrame(rows), out, {"seed": 0})
    return out


def uint8_batch(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 2


def blob_batch(n: int, size: int) -> torch.Tensor:
    """n seeded blob images as a uint8 N x 3 x size x size batch."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([np.array(blob_image(rng, (size, size))) for _ in range(n)])).permute(0, 3, 1, 2)


def trained_changes(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_dcgan_trains_and_samples_in_range():
    trainer = DCGANTrainer({"width": 8}, 2e-4, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.g.state_dict().items()}
    x, y = uint8_batch(4, 64)
    gen = torch.Generator().manual_seed(0)
    losses = [trainer.train_step(x, y, gen) for _ in range(2)]
    assert all(math.isfinite(v) for step in losses for v in step.values())
    assert trainer.steps == 2 and trained_changes(before, trainer.g)
    images = trainer.generate(torch.tensor([0, 1, 1]), gen)
    assert images.shape == (3, 3, 64, 64) and images.min() >= -1 and images.max() <= 1


def test_ddpm_trains_and_samples_with_ddim_and_ddpm():
    trainer = DDPMTrainer(TINY_DDPM, 1e-3, torch.device("cpu"), total_steps=10)
    x, y = uint8_batch(4, 32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        assert math.isfinite(trainer.train_step(x, y, gen)["loss"])
    assert trainer.steps == 2 and trainer.ema.steps == 2
    assert not torch.equal(trainer.ema.module.conv_in.weight, trainer.unet.conv_in.weight)  # EMA lags the model
    labels = torch.tensor([0, 1])
    outs = {s: ddpm.generate(trainer.export(), labels, torch.Generator().manual_seed(1), s, steps=3)
            for s in ddpm.SAMPLERS}
    for images in outs.values():
        assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert not torch.allclose(outs["ddim"], outs["ddpm"])
    again = ddpm.generate(trainer.export(), labels, torch.Generator().manual_seed(1), "ddim", steps=3)
    assert torch.equal(again, outs["ddim"])  # DDIM (eta 0) is deterministic given the initial noise
    with pytest.raises(ValueError, match="unknown sampler"):
        ddpm.scheduler("euler")


def test_latent_autoencoder_trains_scales_its_latents_and_encodes_eight_views():
    x = blob_batch(4, 32)
    trainer = latent.AutoencoderTrainer({"channels": [8, 16], "norm_groups": 4, "image_size": 32}, 1e-3,
                                        torch.device("cpu"), total_steps=10)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = [trainer.train_step(x, torch.zeros(4), torch.Generator().manual_seed(i))["l1"] for i in range(3)]
    assert all(math.isfinite(v) for v in losses) and trained_changes(before, trainer.model)
    model = trainer.export(x)
    assert model.config.scaling_factor == pytest.approx(1 / latent.latent_std(model, x))
    views = latent.encode_views(model, x)
    assert views.shape == (latent.VIEWS, 4, 4, 16, 16) and views.dtype == torch.float16
    assert float(views[0].float().std()) == pytest.approx(1.0, rel=1e-2)  # scaled to unit variance
    transforms = {tuple(latent.dihedral(x[:1], v).flatten()[:64].tolist()) for v in range(latent.VIEWS)}
    assert len(transforms) == latent.VIEWS and torch.equal(latent.dihedral(x, 0), x)


def test_perceptual_distance_ranks_a_blur_nearer_than_another_image_and_trains_in_bf16():
    x = blob_batch(4, 64)
    signed = x.float() / 127.5 - 1
    distance = latent.PerceptualDistance()
    assert not any(p.requires_grad for p in distance.parameters())
    with torch.no_grad():
        same, blurred = distance(signed, signed), distance(torch.nn.functional.avg_pool2d(signed, 3, 1, 1), signed)
        other = distance(signed.roll(1, 0), signed)
    assert same.shape == (4,) and torch.allclose(same, torch.zeros(4))
    assert (blurred > 0).all() and (blurred < other).all()
    trainer = latent.AutoencoderTrainer({"channels": [8, 16], "norm_groups": 4, "image_size": 64}, 1e-3,
                                        torch.device("cpu"), total_steps=4, perceptual_weight=0.1, autocast=True)
    row = trainer.train_step(x, torch.zeros(4), torch.Generator().manual_seed(0))
    assert row["perceptual"] > 0 and row["loss"] == pytest.approx(row["l1"] + 0.1 * row["perceptual"], rel=1e-3)


def test_patch_discriminator_joins_after_its_start_and_resumes_with_the_trainer():
    x = blob_batch(4, 64)
    arch = {"channels": [8, 16], "norm_groups": 4, "image_size": 64}
    trainer = latent.AutoencoderTrainer(arch, 1e-3, torch.device("cpu"), total_steps=5, adversarial_weight=0.5)
    assert trainer.disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # one logit per patch
    before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    rows = [trainer.train_step(x, torch.zeros(4), torch.Generator().manual_seed(i)) for i in range(4)]
    assert trainer.disc_start == 2 and rows[0]["adversarial"] == rows[0]["discriminator"] == 0
    assert rows[3]["discriminator"] > 0 and trained_changes(before, trainer.disc)
    again = latent.AutoencoderTrainer(arch, 1e-3, torch.device("cpu"), total_steps=5, adversarial_weight=0.5)
    again.load_state_dict(trainer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.disc.state_dict().values(), trainer.disc.state_dict().values()))


def test_latent_sampler_is_deterministic_with_a_seed_and_decodes_to_images():
    autoencoder = latent.build_autoencoder({"arch_kwargs": {"channels": [8, 16], "norm_groups": 4, "image_size": 32}})
    trainer = latent.LatentDiffusionTrainer({**TINY_DDPM, "num_classes": 2}, 1e-3, torch.device("cpu"), 10,
                                            autoencoder, {"channels": [8, 16], "norm_groups": 4, "image_size": 32})
    assert trainer.unet.config.in_channels == 4 and trainer.unet.config.sample_size == 16
    z, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 1, 0, 1])
    assert math.isfinite(trainer.train_step(z, y, torch.Generator().manual_seed(0))["loss"])
    labels = torch.tensor([0, 1])
    a, b, c = (latent.generate(trainer.export(), labels, torch.Generator().manual_seed(s), steps=3,
                               schedule=latent.LATENT_SCHEDULE) for s in (7, 7, 8))
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    z = ddpm.generate(trainer.export().unet, labels, torch.Generator().manual_seed(7), steps=10,
                      schedule=latent.LATENT_SCHEDULE, clamp=False)
    assert z.abs().max() <= latent.LATENT_SCHEDULE["clip_sample_range"] + 1e-4  # the final step returns the clipped x0


def test_ddim_default_is_50_steps_and_ddpm_the_full_chain():
    assert len(ddpm.scheduler("ddpm").timesteps) == 1000
    ddim = ddpm.scheduler("ddim")
    ddim.set_timesteps(50)
    assert len(ddim.timesteps) == 50 and int(ddim.timesteps[0]) == 999


@pytest.mark.parametrize("scale", [2, 4])
def test_upscaler_starts_as_bicubic_and_trains(scale):
    model = Upscaler(scale=scale, channels=8, blocks=1)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(model(x), bicubic(x, 16 * scale))  # zero-initialised tail: exactly bicubic before training
    trainer = UpscalerTrainer({"scale": scale, "channels": 8, "blocks": 1}, 1e-3, torch.device("cpu"), 10, patch=32)
    hr, y = uint8_batch(4, 64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        trainer.train_step(hr, y, gen)
    assert trainer.model(x).shape == (2, 3, 16 * scale, 16 * scale)
    assert not torch.equal(trainer.model(x), bicubic(x, 16 * scale))


def test_bicubic_follows_pil():
    """The upscaler's baseline and its training pairs use the resize the rest of the project uses (PIL bicubic)."""
    hr = np.array(blob_image(np.random.default_rng(0), (128, 128)))
    lr = np.array(Image.fromarray(hr).resize((64, 64), Image.Resampling.BICUBIC))
    for src, size in ((hr, 64), (lr, 128)):
        ours = bicubic(torch.from_numpy(src).permute(2, 0, 1)[None].float() / 255, size)[0].permute(1, 2, 0)
        theirs = np.asarray(Image.fromarray(src).resize((size, size), Image.Resampling.BICUBIC))
        assert np.abs((ours * 255).round().clamp(0, 255).numpy() - theirs).max() <= 3


def test_psnr_and_ssim():
    a, _ = uint8_batch(3, 32)
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(3))
    noisy = [(a.float() + torch.randn(a.shape) * s).clamp(0, 255).round().to(torch.uint8) for s in (5, 30)]
    assert (ssim(a, noisy[0]) > ssim(a, noisy[1])).all() and (psnr(a, noisy[0]) > psnr(a, noisy[1])).all()
    # Constant images: SSIM reduces to its luminance term (2ab + c1) / (a^2 + b^2 + c1)
    p, q = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8), torch.full((1, 3, 16, 16), 180, dtype=torch.uint8)
    u, v, c1 = 100 / 255, 180 / 255, 0.01 ** 2
    assert ssim(p, q).item() == pytest.approx((2 * u * v + c1) / (u * u + v * v + c1), rel=1e-5)
    mse = ((100 - 180) / 255) ** 2
    assert psnr(p, q).item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    # Structured images: the fast float32 version against the textbook float64 one (full 11x11 window)
    real = blob_batch(3, 48)
    noisy = (real.float() + torch.randn(real.shape) * 10).clamp(0, 255).round().to(torch.uint8)
    assert torch.allclose(ssim(real, noisy).double(), textbook_ssim(real, noisy), atol=1e-5)


def textbook_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x, y = a.double() / 255, b.double() / 255
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).flatten(1).mean(1)


def run(model: str, manifest: Path, out: Path, *extra: str) -> dict:
    """A smoke-preset training run; an LDM gets a smoke autoencoder trained beside it first (once per folder)."""
    if model == "ldm" and "--autoencoder" not in extra:
        autoencoder = out.parent / "ldm_autoencoder"
        if not (autoencoder / "model.safetensors").is_file():
            run("autoencoder", manifest, autoencoder)
        extra = (*extra, "--autoencoder", str(autoencoder / "model.safetensors"))
    return train.main(["--model", model, "--preset", "smoke", "--manifest", str(manifest), "--out", str(out),
                       "--limit", "8", "--threads", "1", "--no-progress", *extra])


def assert_same_state(a, b, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class Killed(Exception):
    pass


@pytest.mark.parametrize("model", train.MODELS)
def test_train_cli_resume_restores_everything_exactly(model, manifest, tmp_path, monkeypatch, capsys):
    straight = run(model, manifest, tmp_path / "straight", "--epochs", "2")

    def save_then_die(path, state):  # the process is killed right after the first epoch's state is written
        save_state(path, state)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(train, "save_state", save_then_die)
        with pytest.raises(Killed):
            run(model, manifest, tmp_path / "resumed", "--epochs", "2")
    assert load_state(tmp_path / "resumed" / "state.pt")["epoch"] == 0
    capsys.readouterr()
    resumed = run(model, manifest, tmp_path / "resumed", "--epochs", "2", "--resume")
    assert "resumed from" in capsys.readouterr().out  # continued, not retrained from scratch (same seed, same end)
    a, b = load_state(tmp_path / "straight" / "state.pt"), load_state(tmp_path / "resumed" / "state.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["trainer"]["steps"] == b["trainer"]["steps"] == 4
    assert_same_state(a["trainer"], b["trainer"])  # weights, EMA, optimizers, schedules, step
    assert [r["loss" if model != "dcgan" else "loss_g"] for r in a["losses"]] == \
           [r["loss" if model != "dcgan" else "loss_g"] for r in b["losses"]]
    out = tmp_path / "resumed"
    for name in ("losses.csv", "losses.png", "epochs.csv", "samples/epoch_002.png", "model.json"):
        assert (out / name).is_file(), name
    assert resumed["meta"]["kind"] == model and resumed["meta"]["steps"] == 4 == straight["meta"]["steps"]
    assert resumed["meta"]["n_train_images"] == 8 and resumed["meta"]["trained_on"] == "split=fit, source=real"
    build = {"dcgan": build_generator, "ddpm": ddpm.build_unet, "upscaler": build_upscaler,
             "autoencoder": latent.build_autoencoder, "ldm": latent.build_ldm}[model]
    load_checkpoint(out / "model.safetensors", build, kind=model)


def test_generators_never_read_other_splits(manifest, tmp_path):
    result = run("dcgan", manifest, tmp_path / "run", "--limit", "100", "--batch-size", "4")
    assert result["meta"]["n_train_images"] == 16  # the 16 fit rows, none of the 16 others


@pytest.fixture
def smoke_checkpoints(manifest, tmp_path) -> dict[str, Path]:
    paths = {}
    for model in train.MODELS:
        run(model, manifest, tmp_path / model, "--ship", str(tmp_path / "ship" / model))
        paths[model] = tmp_path / "ship" / f"{model}.safetensors"
    return paths


def test_sample_cli_writes_pngs_and_a_manifest(smoke_checkpoints, tmp_path):
    up = str(smoke_checkpoints["upscaler"])
    cases = [("dcgan", [], 64), ("dcgan_up", ["--upscale", up], 128),
             ("ddpm_up", ["--steps", "2", "--upscale", up], 128), ("ldm", ["--steps", "2"], 64)]
    for source, extra, size in cases:
        kind = source.removesuffix("_up")
        out = tmp_path / "syn" / source
        sample.main(["--checkpoint", str(smoke_checkpoints[kind]), "--n", "3", "--batch-size", "2", "--out", str(out),
                     "--threads", "1", "--no-progress", "--grid", str(out / "grid.png"), *extra])
        df = read_manifest(out / "samples.csv")
        assert len(df) == 6 and set(df["source"]) == {source} and set(df["split"]) == {"fit"}
        assert df.groupby("label").size().to_dict() == {"benign": 3, "malignant": 3}
        assert all(Image.open(p).size == (size, size) for p in df["path"])
    first = tmp_path / "syn" / "dcgan" / "malignant" / "dcgan_malignant_00000.png"
    stamp = first.stat().st_mtime_ns
    sample.main(["--checkpoint", str(smoke_checkpoints["dcgan"]), "--n", "3", "--batch-size", "2", "--out",
                 str(tmp_path / "syn" / "dcgan"), "--threads", "1", "--no-progress"])
    assert first.stat().st_mtime_ns == stamp  # existing batches are skipped on a re-run
    with pytest.raises(SystemExit, match="other settings \\(seed differ\\)"):  # never a mix of two seeds
        sample.main(["--checkpoint", str(smoke_checkpoints["dcgan"]), "--n", "3", "--seed", "1", "--out",
                     str(tmp_path / "syn" / "dcgan"), "--threads", "1", "--no-progress"])
    assert first.stat().st_mtime_ns == stamp


def test_up_images_made_from_the_plain_pngs_equal_generated_ones(smoke_checkpoints, tmp_path, monkeypatch):
    model, meta = sample.load_generator(smoke_checkpoints["ddpm"])
    up = load_upscaler(smoke_checkpoints["upscaler"])[0]
    counts = {"malignant": 3}
    sample.sample_to_folder(model, meta, counts, tmp_path / "ddpm", steps=2, batch_size=2, progress=False)
    direct = sample.sample_to_folder(model, meta, counts, tmp_path / "direct", up, steps=2, batch_size=2,
                                     progress=False)
    calls = []
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    reused = sample.sample_to_folder(model, meta, counts, tmp_path / "reused", up, steps=2, batch_size=2,
                                     progress=False, upscale_from=tmp_path / "ddpm")
    assert not calls  # the DDPM did not run again
    assert len(direct) == len(reused) == sum(counts.values()) > 0
    for a, b in zip(direct["path"], reused["path"]):
        assert Path(a).name == Path(b).name
        assert np.array_equal(np.array(Image.open(a)), np.array(Image.open(b)))


def fake_synthetic(tmp_path: Path, source: str, n: int, size: int = 64) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for label in ("benign", "malignant"):
        for i in range(n):
            path = tmp_path / "syn" / source / label / f"{source}_{label}_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            blob_image(rng, (size, size), dark=label == "malignant").save(path)
            rows.append({"path": str(path), "label": label, "split": "fit", "source": source, "lesion_id": path.stem})
    out = tmp_path / "syn" / source / "samples.csv"
    write_manifest(pd.DataFrame(rows), out)
    return out


def test_configs_are_valid_balanced_and_synthetic_only_in_fit(manifest, tmp_path):
    lists = [fake_synthetic(tmp_path, "dcgan", 10), fake_synthetic(tmp_path, "dcgan_up", 10, 128)]
    written = configs.build_configs(manifest, lists, tmp_path / "configs")
    assert set(written) == {"original", "dcgan_aug", "dcgan_up"}  # no DDPM samples listed: those are skipped
    original = read_manifest(manifest)
    for name, path in written.items():
        df = read_manifest(path)
        assert (df.loc[df["source"] != "real", "split"] == "fit").all()
        fit = df[df["split"] == "fit"]
        balanced = {"benign": 12, "malignant": 4 if name == "original" else 12}  # 4 real + 8 synthetic
        assert fit["label"].value_counts().to_dict() == balanced
        assert set(df["source"]) == ({"real"} if name == "original" else {"real", configs.CONFIGS[name]})
        for split in ("val", "calib", "test", "external"):
            pd.testing.assert_frame_equal(df[df["split"] == split].reset_index(drop=True)[original.columns],
                                          original[original["split"] == split].reset_index(drop=True))
    half = configs.build_configs(manifest, lists, tmp_path / "half", ratio=0.5)
    fit = read_manifest(half["dcgan_aug"]).query("split == 'fit'")
    assert fit["label"].value_counts().to_dict() == {"benign": 12, "malignant": 6}
    with pytest.raises(ValueError, match="8 synthetic malignant images are needed and only 3"):
        configs.build_configs(manifest, [fake_synthetic(tmp_path / "few", "ddpm", 3)], tmp_path / "few")
    with pytest.raises(ValueError, match="ratio"):
        configs.needed(original, 1.5)


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm, to check the fast one against."""
    from scipy.linalg import sqrtm

    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real))


def test_fid_kid_precision_recall():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    shift = np.full(8, 0.5)
    assert quality.fid(a, a) == pytest.approx(0, abs=1e-6)
    few = rng.normal(size=(6, 8))  # fewer samples than dimensions: the other path, same definition
    assert quality.fid(few[:4], few[:4]) == pytest.approx(0, abs=1e-9)
    assert quality.fid(few[:4], few[2:]) == pytest.approx(reference_fid(few[:4], few[2:]), rel=1e-6)
    assert quality.fid(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)  # equal covariances
    assert quality.fid(a, 2 * a) > quality.fid(a, b) > 0
    assert quality.fid(a, 2 * b) == pytest.approx(reference_fid(a, 2 * b), rel=1e-6)
    same, _ = quality.kid(a, b, subsets=20, subset_size=200)
    shifted, _ = quality.kid(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.05 < shifted
    assert quality.precision_recall(a, a) == (1.0, 1.0)
    assert quality.precision_recall(a, a + 100) == (0.0, 0.0)
    precision, recall = quality.precision_recall(a, a[:, :] * 0.2)  # collapsed samples: precise, low recall
    assert precision > 0.9 and recall < 0.5


def test_memorisation_flags_copies_of_training_images():
    rng = np.random.default_rng(0)
    fit, held_out = rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
    syn = np.concatenate([fit[:3] + 1e-6, rng.normal(size=(20, 8))])
    table = quality.memorisation({"feature": syn}, {"feature": fit}, {"feature": held_out}, percentile=1.0)
    assert table["near_copy_feature"].tolist()[:3] == [True] * 3
    assert table["nearest_fit_feature"].tolist()[:3] == [0, 1, 2]
    assert table["near_copy_feature"].sum() <= 4


def test_quality_cli_with_a_classifier_extractor(manifest, tmp_path):
    from classifiers.models import create_model

    model = create_model("densenet121", img_size=32)
    meta = {"kind": "classifier", "arch": "densenet121", "arch_kwargs": {}, **preprocess_meta(32),
            "class_names": ["benign", "malignant"]}
    save_checkpoint(tmp_path / "clf", model, meta)
    lists = [str(fake_synthetic(tmp_path, "dcgan", 4)), str(fake_synthetic(tmp_path, "dcgan_up", 4, 128))]
    out = tmp_path / "quality.csv"
    quality.main(["--synthetic", *lists, "--manifest", str(manifest), "--classifier", str(tmp_path / "clf.safetensors"),
                  "--out", str(out), "--threads", "1", "--k", "1"])
    df = pd.read_csv(out)
    assert set(df["source"]) == {"dcgan", "dcgan_up", "real reference (calib)"}
    assert (df["n_scored"] == 2).all()  # synthetic subsampled to the 2 calib images per class
    assert df["fid"].notna().all() and df["precision"].between(0, 1).all()
    nearest = pd.read_csv(tmp_path / "quality_nearest.csv")
    assert len(nearest) == 16 and nearest["nearest_fit_feature"].str.contains("fit_").all()  # top 100: all 16
    assert Image.open(tmp_path / "quality_nearest.png").size[1] > 4 * 32  # four rows of 32-px images


def test_round_trip_row_is_the_reference_images_through_the_autoencoder(smoke_checkpoints, manifest, tmp_path):
    df, syn = read_manifest(manifest), read_manifest(fake_synthetic(tmp_path, "ldm", 4))
    real, ref, fit = (df[df["split"] == split] for split in ("val", "calib", "fit"))

    def extractor(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)

    def rows(round_trip) -> dict:
        found, _ = quality.evaluate(syn, real, ref, fit, extractor, 32, k=1, round_trip=round_trip)
        return {(r["source"], r["label"]): r for r in found}

    same, inverted = rows(lambda x: x), rows(lambda x: 255 - x)
    for label in ("benign", "malignant"):
        floor = same[("real reference (calib)", label)]
        assert same[("autoencoder round trip (calib)", label)]["fid"] == pytest.approx(floor["fid"])
        assert inverted[("autoencoder round trip (calib)", label)]["fid"] > floor["fid"] + 1
    rng = np.random.default_rng(0)
    images = np.stack([np.array(blob_image(rng, (64, 64), dark=i % 2 == 1)) for i in range(3)])
    for kind in ("autoencoder", "ldm"):  # an LDM checkpoint's own autoencoder, or one on its own
        trip = quality.autoencoder_round_trip(smoke_checkpoints[kind], torch.device("cpu"))
        out = trip(images)
        assert out.shape == images.shape and out.dtype == np.uint8 and not np.array_equal(out, images)
    with pytest.raises(UserError, match="encodes 64-px images"):
        trip(images[:, :32, :32])


def test_imagenet_lite0_extractor_gives_pretrained_features():
    extractor, size, name = quality.imagenet_lite0_extractor(torch.device("cpu"))
    assert size == 224 and "ImageNet" in name
    rng = np.random.default_rng(0)
    images = np.stack([np.array(blob_image(rng, (224, 224), dark=i % 2 == 1)) for i in range(4)])
    feats = quality.extract(extractor, images)
    assert feats.shape == (4, 1280) and np.isfinite(feats).all()
    assert np.array_equal(feats, quality.extract(extractor, images))  # deterministic
    dark, light = feats[1::2].mean(0), feats[0::2].mean(0)
    assert np.linalg.norm(dark - light) > 0.1 * np.linalg.norm(light)  # the features see the lesion's darkness


@pytest.mark.real_data
def test_smoke_training_on_real_fit_images(tmp_path):
    result = train.main(["--model", "upscaler", "--preset", "smoke", "--out", str(tmp_path / "up"), "--threads", "1",
                         "--no-progress"])
    assert result["meta"]["output_size"] == 128 and result["meta"]["n_train_images"] == 16
    assert result["epochs"][0]["val_psnr_bicubic"] > 20  # real lesions are smooth: bicubic is already good
