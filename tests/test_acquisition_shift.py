"""studies/acquisition_shift.py: each image condition is deterministic and does what its name says; the summary's
rows are hand-checkable; a small run on real images scores every condition end to end and resumes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.manifest import read_manifest, write_manifest
from data.runtime import UserError
from studies import acquisition_shift as shift


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(40, 200, (90, 120, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", list(shift.CONDITIONS))
def test_condition_is_deterministic_rgb_and_changes_the_image(name: str, photo: Image.Image) -> None:
    once, again = shift.CONDITIONS[name](photo, 3), shift.CONDITIONS[name](photo, 3)
    assert once.mode == "RGB" and np.array_equal(np.asarray(once), np.asarray(again))
    changed = once.size != photo.size or not np.array_equal(np.asarray(once), np.asarray(photo))
    assert changed == (name != "clean")


def test_conditions_do_what_their_names_say(photo: Image.Image) -> None:
    mean = {k: np.asarray(shift.CONDITIONS[k](photo, 0), dtype=float).mean(axis=(0, 1))
            for k in ("clean", "warm", "cool", "dark", "bright")}
    assert mean["warm"][0] > mean["clean"][0] > mean["cool"][0] and mean["warm"][2] < mean["cool"][2]
    assert mean["dark"].sum() < mean["clean"].sum() < mean["bright"].sum()
    assert shift.CONDITIONS["quarter_resolution"](photo, 0).size == (30, 22)
    assert shift.CONDITIONS["half_resolution"](photo, 0).size == (60, 45)
    error = {k: np.abs(np.asarray(shift.CONDITIONS[k](photo, 0), dtype=float) - np.asarray(photo)).mean()
             for k in ("jpeg_q50", "jpeg_q15")}
    assert 0 < error["jpeg_q50"] < error["jpeg_q15"]
    assert shift.CONDITIONS["rotate_90"](photo, 0).size == (90, 120)
    noisy = [np.asarray(shift.CONDITIONS["noise"](photo, i)) for i in (0, 1)]
    assert not np.array_equal(*noisy)  # seeded by the image's position, not one pattern for all


def test_summary_rows_by_hand() -> None:
    y = ["benign", "benign", "benign", "malignant", "malignant"]
    clean = pd.DataFrame({"set": "s", "path": list("abcde"), "label": y, "condition": "clean",
                          "prob": [0.1, 0.2, 0.6, 0.7, 0.3], "vae_score": [0.0, 0.9, 0.0, 0.0, 0.9],
                          "gate_ok": [True, True, True, True, False]})
    inverted = clean.assign(condition="inverted", prob=1 - clean["prob"], gate_ok=None)
    rows = {(r["condition"], r["model"]): r for r in shift.summary_rows(pd.concat([clean, inverted]), 0.5, 0.5)}
    cls, hyb = rows["clean", "classifier"], rows["clean", "hybrid"]
    # classifier: malignant at p >= 0.5 -> c, d; hybrid adds the anomalous benign-called b and e
    assert (cls["sensitivity"], cls["specificity"]) == (0.5, pytest.approx(2 / 3))
    assert (hyb["sensitivity"], hyb["specificity"]) == (1.0, pytest.approx(1 / 3))
    assert cls["benign_vae_anomalous"] == pytest.approx(1 / 3) and cls["gate_refused"] == pytest.approx(0.2)
    assert np.isnan(cls["auc_change"]) and cls["auc"] == pytest.approx(5 / 6)
    flipped = rows["inverted", "classifier"]
    assert flipped["auc_change"] == pytest.approx(1 / 6 - 5 / 6) and np.isnan(flipped["gate_refused"])
    assert rows["inverted", "all_malignant_baseline"]["specificity"] == 0


def test_a_missing_evaluation_set_is_a_user_error(original: pd.DataFrame) -> None:
    with pytest.raises(UserError, match="ISIC 2017 val"):
        shift.evaluation_images(original[original["dataset"] == "ham10000"])
    images = shift.evaluation_images(original, limit=20)
    assert images.groupby("set")["label"].nunique().eq(2).all() and images.groupby("set").size().between(19, 21).all()


def test_small_run_end_to_end_and_resume(original: pd.DataFrame, tiny_checkpoints: tuple[Path, Path],
                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = pd.concat([original[(original["dataset"] == "ham10000") & (original["split"] == "test")],
                      original[(original["dataset"] == "isic2017") & (original["official_split"] == "val")]])
    rows = rows.groupby(["dataset", "label"]).sample(2, random_state=0)
    manifest = tmp_path / "m.csv"
    write_manifest(rows, manifest)
    classifier, vae = tiny_checkpoints
    argv = ["--manifest", str(manifest), "--classifier", str(classifier), "--vae", str(vae), "--conditions",
            "clean", "blur", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--no-progress",
            "--device", "cpu", "--threads", "1"]
    shift.main(argv)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert len(summary) == 2 * 2 * 3 and summary["auc"].dropna().between(0, 1).all()
    assert summary["gate_refused"].between(0, 1).all()
    folder = next((tmp_path / "work").iterdir())
    assert folder.name.startswith("all_")  # the default sets, named by the models' weights
    scored = pd.read_csv(folder / "blur.csv")
    assert len(scored) == len(read_manifest(manifest)) and scored["prob"].between(0, 1).all()
    refused = scored["gate_reason"].fillna("") != ""  # a reason exactly where the gate refused the image
    assert refused.equals(~scored["gate_ok"].astype(bool))
    stamp = (folder / "blur.csv").stat().st_mtime_ns
    shift.main(argv)  # a second run finds every condition scored: nothing is scored again
    assert (folder / "blur.csv").stat().st_mtime_ns == stamp
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: the manifest has no HAM10000 calib images"):
        shift.main(argv + ["--sets", "HAM10000 calib"])


def test_scores_folder_is_named_by_sets_limit_and_every_model_file(tmp_path: Path) -> None:
    for name in ("classifier", "vae"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"weights")
        (tmp_path / f"{name}.json").write_text("{}")
    predictor = SimpleNamespace(paths={k: str(tmp_path / f"{k}.safetensors") for k in ("classifier", "vae")})
    first = shift.scores_folder(predictor, shift.DEFAULT_SETS, None)
    assert first.startswith("all_") and shift.scores_folder(predictor, shift.DEFAULT_SETS, None) == first
    assert shift.scores_folder(predictor, ("HAM10000 calib",), 50).startswith("HAM10000_calib_limit_50_")
    (tmp_path / "classifier.json").write_text('{"tta": "flips"}')  # same weights, another sidecar
    assert shift.scores_folder(predictor, shift.DEFAULT_SETS, None) != first
