"""The ConvVAE's score, threshold calibration, the rescue truth table, the hybrid predictor and ONNX parity."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly_detection.calibrate import SOURCE_RULE, candidate_thresholds, default_rule
from anomaly_detection.hybrid import HybridPredictor, load_vae, rescue
from anomaly_detection.vae import CENTRE_RADIUS, ConvVAE, VAEScorer, anomaly_score, centre_mask, vae_loss
from data.cache import build_cache
from data.images import load_rgb
from data.transforms import Preprocess, preprocess_meta


def test_score_is_deterministic_whatever_the_mode_and_batch():
    torch.manual_seed(0)
    vae = ConvVAE(64, latent_dim=16)
    x = torch.rand(3, 3, 64, 64)
    scorer = VAEScorer(vae)
    vae.train()  # a fresh module is in train mode: BatchNorm batch statistics would make scores batch-dependent
    first = scorer(x)[0]
    assert vae.training  # the caller's mode is left as it was
    vae.eval()
    assert torch.equal(first, scorer(x)[0])
    assert torch.allclose(scorer(x[:1])[0], first[:1], atol=1e-6)  # alone or in a batch: the same score


def test_anomaly_score_is_mean_absolute_error_per_image():
    x, recon = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    recon[1] = 0.5
    assert anomaly_score(x, recon).tolist() == [0.0, 0.5]


def test_centre_score_ignores_the_border():
    x, recon = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    recon[..., :8, :] = 1.0  # error only along the top edge, where the device's vignette sits
    assert anomaly_score(x, recon, "centre").item() == 0.0 and anomaly_score(x, recon, "image").item() == 0.125
    recon[..., 32, 32] = 1.0  # one centre pixel in all three channels
    mask = centre_mask(64, 64)
    assert anomaly_score(x, recon, "centre").item() == pytest.approx(1 / mask.sum().item())
    assert mask.sum().item() == pytest.approx(np.pi * (CENTRE_RADIUS * 64) ** 2, rel=0.03)


def test_score_region_travels_in_the_checkpoint(tmp_path):
    from data.checkpoint import save_checkpoint
    vae = ConvVAE(64, latent_dim=16, score_region="centre")
    save_checkpoint(tmp_path / "vae", vae, {"kind": "vae", "arch": "convvae", "input_size": 64,
                                            "arch_kwargs": {"latent_dim": 16, "channels": [32, 64, 128, 256],
                                                            "score_region": "centre"},
                                            **preprocess_meta(64, "squash", "unit")})
    loaded, _ = load_vae(tmp_path / "vae.safetensors")
    assert loaded.score_region == "centre"
    with pytest.raises(ValueError, match="score_region"):
        ConvVAE(64, latent_dim=16, score_region="corner")


def test_calibration_finds_the_known_best_thresholds():
    rng = np.random.default_rng(0)
    benign, malignant = rng.normal(0, 1, 20000), rng.normal(3, 1, 20000)
    y = np.r_[np.zeros(20000), np.ones(20000)]
    one_source = np.full(40000, "a")
    t, _ = candidate_thresholds(y, np.r_[benign, malignant], one_source, "calib", target_sensitivity=0.5,
                                benign_percentile=0.95, source_quantile=0.98)
    assert t["youden"] == pytest.approx(1.5, abs=0.1)            # equal-variance Gaussians: the midpoint
    assert t["target_sensitivity"] == pytest.approx(3.0, abs=0.05)  # median of the malignant scores
    assert t["benign_percentile"] == pytest.approx(1.645, abs=0.05)
    assert t[SOURCE_RULE] == pytest.approx(2.054, abs=0.05)
    with pytest.raises(ValueError, match="refusing to choose a threshold on the 'test' split"):
        candidate_thresholds(y, np.r_[benign, malignant], one_source, "test", 0.5, 0.95, 0.98)


def test_source_rule_bounds_every_source_benign_flag_rate():
    """A second clinic whose camera adds 1 to every score: pooled, the 95th percentile would flag a quarter of its
    benign images; the per-source rule flags at most 2% of each source's benign images."""
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(0, 1, 5000), rng.normal(1, 1, 1000), rng.normal(3, 1, 500)]
    sources = np.r_[np.full(5000, "ham"), np.full(1000, "isic"), np.full(500, "ham")]
    y = np.r_[np.zeros(6000), np.ones(500)]
    t, per_source = candidate_thresholds(y, scores, sources, "calib+val", 0.5, 0.95, 0.98)
    assert t[SOURCE_RULE] == per_source["isic"] == max(per_source.values())
    for source in ("ham", "isic"):
        benign = scores[(sources == source) & (y == 0)]
        assert (benign >= t[SOURCE_RULE]).mean() <= 0.02
    assert (scores[(sources == "isic") & (y == 0)] >= t["benign_percentile"]).mean() > 0.1
    assert default_rule(pd.DataFrame({"dataset": ["ham", "isic"], "split": ["calib", "val"]})) == SOURCE_RULE
    # original.csv: ISIC 2017 rows only in `external`, so one source to calibrate on; a manifest without `dataset`
    assert default_rule(pd.DataFrame({"dataset": ["ham", "isic"], "split": ["calib", "external"]})) == (
        default_rule(pd.DataFrame({"split": ["calib"]}))) == "benign_percentile"


def test_rescue_truth_table():
    prob = np.array([0.9, 0.9, 0.1, 0.1])
    score = np.array([0.5, 0.0, 0.5, 0.0])
    r = rescue(prob, score, malignant_threshold=0.5, anomaly_threshold=0.3)
    assert r["pred_classifier"].tolist() == [True, True, False, False]
    assert r["anomalous"].tolist() == [True, False, True, False]
    assert r["rescued"].tolist() == [False, False, True, False]
    assert r["pred_hybrid"].tolist() == [True, True, True, False]
    at_threshold = rescue(np.array([0.5]), np.array([0.3]), 0.5, 0.3)  # >= on both thresholds
    assert at_threshold["pred_classifier"][0] and at_threshold["anomalous"][0]


@pytest.mark.real_data
def test_vae_learns_to_reconstruct_real_benign_images(original):
    benign = original[(original["split"] == "fit") & (original["label"] == "benign")].iloc[:64]
    cache = build_cache(list(benign["path"]), 64)
    prep = Preprocess.from_meta(preprocess_meta(64, normalization="unit"))
    x = prep.batch(list(cache.images))
    torch.manual_seed(0)
    vae = ConvVAE(64, latent_dim=32)
    before = VAEScorer(vae.eval())(x)[0].mean().item()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    for step in range(30):
        batch = x[(step * 16) % 64:(step * 16) % 64 + 16]
        loss = vae_loss(batch, *vae(batch))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = VAEScorer(vae.eval())(x)[0].mean().item()
    assert after < 0.7 * before


@pytest.mark.real_data
def test_predictor_on_paths_keeps_going_past_a_corrupt_file(tiny_checkpoints, real_images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(real_images[0].read_bytes()[:300])
    predictor = HybridPredictor(*tiny_checkpoints)
    results = predictor.predict_paths([real_images[0], bad, real_images[2]], batch_size=2)
    assert [r.path for r in results] == [str(real_images[0]), str(bad), str(real_images[2])]
    assert "broken.jpg" in results[1].error and results[1].decision == "error"
    assert all(0 <= r.prob_malignant <= 1 and r.vae_score > 0 for r in (results[0], results[2]))
    single, recon = predictor.predict_image(load_rgb(real_images[0]))
    assert single.prob_malignant == pytest.approx(results[0].prob_malignant, abs=1e-5)
    assert recon.shape == (64, 64, 3) and recon.dtype == np.uint8


@pytest.mark.real_data
def test_threshold_overrides_change_the_decision(tiny_checkpoints, real_images):
    always = HybridPredictor(*tiny_checkpoints, malignant_threshold=0.0, anomaly_threshold=1e9)
    never = HybridPredictor(*tiny_checkpoints, malignant_threshold=1.01, anomaly_threshold=0.0)
    a, b = always.predict_paths(real_images), never.predict_paths(real_images)
    assert all(r.classifier_malignant and not r.rescued for r in a)
    assert all(not r.classifier_malignant and r.rescued and r.final_malignant for r in b)


@pytest.mark.real_data
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_backend_matches_torch_on_real_images(tiny_checkpoints, real_images, tmp_path, monkeypatch, backend):
    import anomaly_detection.serving as serving

    monkeypatch.setattr(serving, "DEFAULT_CACHE_DIR", tmp_path)
    torch_results = HybridPredictor(*tiny_checkpoints, backend="torch").predict_paths(real_images)
    onnx_results = HybridPredictor(*tiny_checkpoints, backend=backend).predict_paths(real_images)
    assert max(abs(a.prob_malignant - b.prob_malignant) for a, b in zip(torch_results, onnx_results)) < 1e-3
    assert max(abs(a.vae_score - b.vae_score) for a, b in zip(torch_results, onnx_results)) < 1e-3
    assert list(tmp_path.glob("onnx/*.onnx"))


def test_predictor_refuses_an_uncalibrated_vae(tiny_checkpoints, tmp_path):
    from data.checkpoint import CheckpointError, read_sidecar, save_checkpoint

    vae, meta = load_vae(tiny_checkpoints[1])
    save_checkpoint(tmp_path / "raw_vae", vae, {**read_sidecar(tiny_checkpoints[1]), "anomaly_threshold": None})
    with pytest.raises(CheckpointError, match="calibrate"):
        HybridPredictor(tiny_checkpoints[0], tmp_path / "raw_vae.safetensors")
    with pytest.raises(CheckpointError, match="expected 'vae'"):
        HybridPredictor(tiny_checkpoints[0], tiny_checkpoints[0])


@pytest.mark.real_data
def test_calibrate_cli_writes_the_source_rule_into_the_sidecar(tiny_checkpoints, tiny_df, tmp_path):
    from anomaly_detection import calibrate
    from data.checkpoint import read_sidecar, save_checkpoint
    from data.manifest import write_manifest

    vae, meta = load_vae(tiny_checkpoints[1])
    weights = save_checkpoint(tmp_path / "vae", vae, meta)
    two_sources = tiny_df.assign(dataset=np.where(np.arange(len(tiny_df)) % 2, "ham10000", "isic2017"))
    manifest = tmp_path / "two.csv"
    write_manifest(two_sources, manifest)
    result = calibrate.main(["--vae", str(weights), "--manifest", str(manifest), "--out", str(tmp_path / "out"),
                             "--device", "cpu", "--threads", "1"])
    sidecar = read_sidecar(weights)
    assert (sidecar["anomaly_threshold_rule"], sidecar["anomaly_threshold_split"]) == (SOURCE_RULE, "calib+val")
    assert sidecar["anomaly_threshold"] == max(sidecar["anomaly_threshold_per_source"].values())
    assert set(result["per_source"]) == {"ham10000", "isic2017"} and result["n"] == 12  # calib + val rows only
    assert set(result["per_source"]["ham10000"]["benign_flagged_by_other_source_threshold"]) == {"isic2017"}
    before = read_sidecar(weights)
    whole = calibrate.main(["--vae", str(weights), "--manifest", str(manifest), "--out", str(tmp_path / "whole"),
                            "--score-region", "image", "--keep-sidecar", "--device", "cpu", "--threads", "1"])
    assert whole["score_region"] == "image" and read_sidecar(weights) == before  # compared, not stored
    calibrate.main(["--vae", str(weights), "--manifest", str(manifest), "--out", str(tmp_path / "whole"),
                    "--score-region", "image", "--device", "cpu", "--threads", "1"])
    assert read_sidecar(weights)["arch_kwargs"]["score_region"] == "image"
    assert load_vae(weights)[0].score_region == "image"
    with pytest.raises(SystemExit, match="refusing to calibrate on \\['test'\\]"):
        calibrate.main(["--vae", str(weights), "--manifest", str(manifest), "--split", "calib,test",
                        "--out", str(tmp_path / "out"), "--device", "cpu"])
