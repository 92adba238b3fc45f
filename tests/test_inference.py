"""inference.py end to end: the report and its JSON agree, every bad input gets one clear line and an exit code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import inference
from data.paths import ROOT


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        inference.main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def models(tiny_checkpoints) -> list[str]:
    return ["--classifier", str(tiny_checkpoints[0]), "--vae", str(tiny_checkpoints[1])]


@pytest.mark.real_data
def test_report_and_json_agree(capsys, models, real_images, tmp_path):
    out_json = tmp_path / "result.json"
    code, out, _ = run(capsys, "--image", str(real_images[2]), "--output", str(out_json), *models)
    assert code == 0
    result = json.loads(out_json.read_text())
    assert f"FINAL DECISION:   {result['decision'].upper()}" in out
    assert f"P(malignant) = {result['prob_malignant']:.3f}" in out
    assert "not a diagnosis" in out
    assert set(result) >= {"prob_malignant", "malignant_threshold", "vae_score", "anomaly_threshold", "rescued",
                           "final_malignant", "decision", "models"}
    assert result["final_malignant"] == (result["classifier_malignant"] or result["rescued"])


@pytest.mark.real_data
def test_grayscale_rgba_and_huge_aspect_images_work(capsys, models, real_images, tmp_path):
    """All three decode; the gate then refuses the greyscale and the 40 px high one (exit 5), which --no-gate
    lets through to a verdict."""
    base = Image.open(real_images[0])
    variants = {"gray.png": (base.convert("L"), "greyscale image"), "rgba.png": (base.convert("RGBA"), ""),
                "wide.bmp": (base.resize((900, 40)), "image too small to assess (900x40 px")}
    for name, (img, reason) in variants.items():
        img.save(tmp_path / name)
        code, out, err = run(capsys, "--image", str(tmp_path / name), *models)
        assert code == (5 if reason else 0), (name, err)
        assert reason in err and ("FINAL DECISION:   CANNOT ASSESS" in out) == bool(reason)
        code, out, err = run(capsys, "--image", str(tmp_path / name), *models, "--no-gate")
        assert code == 0 and "Lesion gate:      off (--no-gate)" in out, (name, err)


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    (b"", "empty file"),
    (b"this is not an image", "not a readable image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "not a readable image"),
], ids=["missing", "empty", "text", "truncated_jpeg"])
def test_bad_image_gives_one_line_and_exit_1(capsys, models, tmp_path, content, message):
    path = tmp_path / "input.jpg"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(capsys, "--image", str(path), *models)
    assert code == 1
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_tiny_image_is_rejected(capsys, models, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    code, _, err = run(capsys, "--image", str(tmp_path / "tiny.png"), *models)
    assert code == 1 and "too small" in err


def test_missing_and_wrong_checkpoints_exit_3(capsys, tiny_checkpoints, tmp_path):
    Image.new("RGB", (64, 64), (120, 80, 60)).save(tmp_path / "x.png")
    code, _, err = run(capsys, "--image", str(tmp_path / "x.png"), "--classifier", str(tmp_path / "none.safetensors"),
                       "--vae", str(tiny_checkpoints[1]))
    assert code == 3 and "not found" in err
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    garbage.with_suffix(".json").write_text(Path(tiny_checkpoints[0]).with_suffix(".json").read_text())
    code, _, err = run(capsys, "--image", str(tmp_path / "x.png"), "--classifier", str(garbage),
                       "--vae", str(tiny_checkpoints[1]))
    assert code == 3 and "not a safetensors file" in err
    code, _, err = run(capsys, "--image", str(tmp_path / "x.png"), "--classifier", str(tiny_checkpoints[1]),
                       "--vae", str(tiny_checkpoints[1]))
    assert code == 3 and "expected 'classifier'" in err


@pytest.mark.real_data
def test_folder_mode_survives_a_corrupt_file(capsys, models, real_images, tmp_path):
    folder = tmp_path / "batch" / "nested"
    folder.mkdir(parents=True)
    for p in real_images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "corrupt.jpg").write_bytes(real_images[0].read_bytes()[:200])
    csv = tmp_path / "out.csv"
    code, out, _ = run(capsys, "--folder", str(tmp_path / "batch"), "--csv", str(csv), *models)
    assert code == 0
    table = pd.read_csv(csv, keep_default_na=False)
    assert len(table) == len(real_images) + 1
    bad = table[table["error"] != ""]
    assert list(bad["path"].map(lambda p: Path(p).name)) == ["corrupt.jpg"] and bad["decision"].iloc[0] == "error"
    assert "1 not scored" in out


def test_missing_folder_exits_1(capsys, models, tmp_path):
    code, _, err = run(capsys, "--folder", str(tmp_path / "nope"), *models)
    assert code == 1 and "folder not found" in err


def test_cli_subprocess_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--image", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1  # the image is checked before the checkpoints, shipped or not
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


@pytest.mark.real_data
def test_gradcam_overlay_is_written(capsys, models, real_images, tmp_path):
    overlay = tmp_path / "cam.png"
    code, out, _ = run(capsys, "--image", str(real_images[3]), "--gradcam", str(overlay), *models)
    assert code == 0 and "explanation aid" in out
    with Image.open(overlay) as img:
        assert img.mode == "RGB" and min(img.size) > 0
