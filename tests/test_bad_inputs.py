"""Every bad or unusual input to inference.py, as one table (issue 23), and the same inputs through the demo.

Each kind builds its inputs under a temporary folder and runs the CLI in-process. For every kind the test checks the
exit code, that stderr is exactly one line holding the expected message (none on success) and no traceback, that no
temporary file is left behind, and that nothing already finished is lost: a run that stops before its results
leaves the folder exactly as it was; one that stops after (a failed write, Ctrl-C, NaN outputs) keeps what it wrote.
Kinds that must be refused before the models load run with HybridPredictor made to fail if it is built.
The out-of-distribution gate (the shipped checkpoints/gate.*) is on only in the kinds marked `gate`: the others test
the plumbing around a verdict on small random-noise images, which the gate would rightly refuse ("cannot assess",
exit 5), so they run with --no-gate. The gate kinds cover images that decode but are not lesions (unusual formats
included) and a gate checkpoint that cannot be used.
The image kinds that a demo user can upload go through the Streamlit app (AppTest), which must show the CLI's line.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_inference import run as run_cli

from anomaly_detection.hybrid import HybridPredictor
from anomaly_detection.serving import export_key
from data.checkpoint import read_sidecar, save_checkpoint
from data.paths import ROOT

APP = ROOT / "streamlit" / "app.py"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Env:
    tmp: Path
    classifier: Path
    vae: Path
    monkeypatch: pytest.MonkeyPatch

    def image(self, name: str = "lesion.png", size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0,
              **save: object) -> Path:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert(mode).save(path, **save)
        return path

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def checkpoint(self, source: Path, name: str, changes: dict | None = None, sidecar: str | None = None) -> Path:
        """A copy of a checkpoint in tmp/ckpt/, its sidecar edited (`changes`; None deletes a key) or replaced."""
        target = self.tmp / "ckpt" / f"{name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        meta = {k: v for k, v in {**json.loads(source.with_suffix(".json").read_text()), **(changes or {})}.items()
                if v is not None}
        target.with_suffix(".json").write_text(sidecar if sidecar is not None else json.dumps(meta))
        return target

    def saved(self, model: torch.nn.Module, name: str, meta_from: Path, changes: dict | None = None) -> Path:
        """`model` saved through the checkpoint contract with `meta_from`'s sidecar (edited by `changes`)."""
        meta = {k: v for k, v in {**read_sidecar(meta_from), **(changes or {})}.items() if v is not None}
        return save_checkpoint(self.tmp / "ckpt" / name, model, meta)

    def folder(self, name: str = "batch", n: int = 3) -> Path:
        for i in range(n):
            self.image(f"{name}/img{i}.png", seed=i)
        return self.tmp / name


def flip(path: Path, count: int = 4096) -> Path:
    """Invert `count` bytes in the middle of a file (inside the tensor data, past the safetensors header)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))
    return path


def classifier_model(env: Env, num_classes: int = 2) -> torch.nn.Module:
    from classifiers.models import create_model

    torch.manual_seed(0)
    return create_model("medvit", img_size=64, num_classes=num_classes)


def overflowing_classifier(env: Env) -> Path:
    """Finite weights whose logits overflow to infinity: softmax gives NaN, which must never become a decision."""
    model = classifier_model(env)
    with torch.no_grad():
        model.head[1].weight.fill_(3e38)
        model.head[1].bias.fill_(3e38)
    return env.saved(model, "overflow", env.classifier)


def json_without_nan(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert not [v for row in rows for v in row.values() if v.lower() in ("nan", "inf", "-inf")], rows
    return rows


# ---------------------------------------------------------------------------------------------------------------
# What "nothing already finished is lost" means for the kinds that stop after producing something

def report_on_screen(env: Env, out: str) -> None:
    assert "FINAL DECISION" in out


def json_kept(env: Env, out: str) -> None:
    result = json_without_nan((env.tmp / "result.json").read_text())
    assert result["decision"] in ("benign", "malignant") and "FINAL DECISION" in out


def previous_result_untouched(env: Env, out: str) -> None:
    assert (env.tmp / "result.json").read_text() == "previous result\n" and "FINAL DECISION" not in out


def csv_has_every_file(env: Env, out: str) -> None:
    rows = {Path(r["path"]).name: r for r in csv_rows(env.tmp / "out.csv")}
    scored = {"a.png", "e.png"}
    skipped = {"b.gif": "unsupported file type .gif", "c.webp": "unsupported file type .webp",
               "notes.txt": "unsupported file type .txt", "dangling.jpg": "broken symbolic link",
               "pipe.png": "not a regular file", "corrupt.jpg": "not a readable image"}
    assert set(rows) == scored | set(skipped), sorted(rows)
    for name, reason in skipped.items():
        row = rows[name]
        assert reason in row["error"] and row["decision"] == "error" and row["prob_malignant"] == ""
    assert all(rows[n]["error"] == "" and 0 <= float(rows[n]["prob_malignant"]) <= 1 for n in scored)
    assert "8 files" in out and "6 not scored" in out and out.count("not scored: ") == 6


def csv_of_finished_rows(env: Env, out: str) -> None:
    rows = csv_rows(env.tmp / "out.csv")
    assert [Path(r["path"]).name for r in rows] == ["img0.png", "img1.png"]  # the two batches done before Ctrl-C
    assert all(r["decision"] in ("benign", "malignant") for r in rows)


def csv_rows_with_errors(env: Env, out: str) -> None:
    rows = csv_rows(env.tmp / "out.csv")
    assert len(rows) == 3 and all(r["decision"] == "error" and r["prob_malignant"] == "" for r in rows)
    assert all("not a finite number" in r["error"] for r in rows)


def re_exported(env: Env, out: str) -> None:
    assert "FINAL DECISION" in out
    assert all(f.stat().st_size > 10_000 for f in (env.tmp / "cache" / "onnx").glob("*.onnx"))


def created(env: Env, out: str) -> None:
    assert json_without_nan((env.tmp / "new" / "deeper" / "result.json").read_text())["error"] == ""


def cannot_assess_on_screen(env: Env, out: str) -> None:
    assert "FINAL DECISION:   CANNOT ASSESS" in out and "P(malignant)" not in out


def gated_json_without_overlay(env: Env, out: str) -> None:
    result = json_without_nan((env.tmp / "result.json").read_text())
    assert (result["decision"], result["status"], result["gate_ok"], result["final_malignant"]) == (
        "cannot assess", "cannot assess", False, None)
    assert result["gate_reason"].startswith("near-constant image") and result["models"]["gate"]["path"]
    assert not (env.tmp / "cam.png").exists()


def csv_of_non_lesions(env: Env, out: str) -> None:
    rows = csv_rows(env.tmp / "out.csv")
    assert len(rows) == 3 and all(r["status"] == r["decision"] == "cannot assess" for r in rows)
    assert all(r["gate_reason"] and r["final_malignant"] == "" and r["error"] == "" for r in rows)
    assert "3 files: 0 malignant (0 by rescue), 0 benign, 3 cannot assess, 0 not scored" in out


# ---------------------------------------------------------------------------------------------------------------
# The table

@dataclass(frozen=True)
class Kind:
    name: str
    code: int
    message: str  # a substring of the one stderr line ("" for a success: stderr stays empty)
    argv: Callable[[Env], list[str]]  # builds the inputs, returns the arguments (the tiny models are added)
    before_models: bool = False  # must be refused before any model loads
    kept: Callable[[Env, str], None] | None = None  # None: the run must leave the folder exactly as it was
    upload: bool = False  # an image kind the demo can receive as an upload
    gate: bool = False  # run with the out-of-distribution gate (the default); the other kinds get --no-gate
    marks: tuple = ()


def interrupt_after_two_batches(env: Env) -> None:
    original = HybridPredictor.predict_batches

    def interrupted(self, paths, batch_size=32, workers=2):
        for i, batch in enumerate(original(self, paths, batch_size, workers)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    env.monkeypatch.setattr(HybridPredictor, "predict_batches", interrupted)


def ctrl_c_in_folder(env: Env) -> list[str]:
    interrupt_after_two_batches(env)
    return ["--folder", str(env.folder(n=4)), "--csv", str(env.tmp / "out.csv"), "--batch-size", "1", "--quiet"]


def ctrl_c_while_loading(env: Env) -> list[str]:
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    env.monkeypatch.setattr(HybridPredictor, "__init__", stop)
    return ["--image", str(env.image())]


def mixed_folder(env: Env) -> list[str]:
    folder = env.tmp / "mixed"
    env.image("mixed/a.png")
    env.image("mixed/b.gif")
    env.image("mixed/c.webp")
    env.file("mixed/notes.txt", b"notes")
    env.file("mixed/corrupt.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 40)
    env.image("mixed/sub/e.png", seed=4)
    os.symlink(folder / "missing.jpg", folder / "dangling.jpg")
    os.symlink(folder, folder / "sub" / "loop")  # a link back up: scanned once, not forever
    os.mkfifo(folder / "pipe.png")  # opening it would block for ever
    return ["--folder", str(folder), "--csv", str(env.tmp / "out.csv")]


def corrupt_onnx_cache(env: Env) -> list[str]:
    import anomaly_detection.serving as serving

    env.monkeypatch.setattr(serving, "DEFAULT_CACHE_DIR", env.tmp / "cache")
    for prefix, path in (("classifier", env.classifier), ("vae", env.vae)):
        env.file(f"cache/onnx/{prefix}_{export_key(path, read_sidecar(path))}.onnx", b"truncated export")
    return ["--image", str(env.image()), "--backend", "onnx"]


def same_checkpoint_in_shipped_folder(env: Env, damage: bool) -> list[str]:
    """The VAE in a folder whose SHA256SUMS lists it, as checkpoints/ does; `damage` flips 4 KB after listing."""
    from data.manifest import file_sha256

    weights = env.checkpoint(env.vae, "convvae", {"weights_sha256": None})
    (weights.parent / "SHA256SUMS").write_text("".join(f"{file_sha256(f)}  {f.name}\n"
                                                       for f in (weights, weights.with_suffix(".json"))))
    if damage:
        flip(weights)
    return ["--image", str(env.image()), "--vae", str(weights)]


def broken_symlink(env: Env) -> list[str]:
    os.symlink(env.tmp / "gone.jpg", env.tmp / "link.jpg")
    return ["--image", str(env.tmp / "link.jpg")]


def folder_without_images(env: Env) -> list[str]:
    env.image("f/a.gif")
    env.image("f/b.webp")
    env.file("f/c.txt", b"x")
    return ["--folder", str(env.tmp / "f")]


def empty_folder(env: Env) -> list[str]:
    (env.tmp / "empty").mkdir()
    return ["--folder", str(env.tmp / "empty")]


def read_only_output(env: Env) -> list[str]:
    os.chmod(env.file("result.json", b"old"), 0o444)
    return ["--image", str(env.image()), "--output", str(env.tmp / "result.json")]


def full_disk(env: Env, name: str) -> Path:
    """A path that looks like a file and accepts no bytes: a link to /dev/full."""
    os.symlink("/dev/full", env.tmp / name)
    return env.tmp / name


def folder_checkpoint(env: Env) -> list[str]:
    (env.tmp / "dir.safetensors").mkdir()
    return ["--image", str(env.image()), "--classifier", str(env.tmp / "dir.safetensors")]


def sidecar_missing(env: Env) -> list[str]:
    weights = env.checkpoint(env.classifier, "c")
    weights.with_suffix(".json").unlink()
    return ["--image", str(env.image()), "--classifier", str(weights)]


def pickle_renamed(env: Env) -> list[str]:
    weights = env.checkpoint(env.classifier, "c")
    torch.save({"w": torch.zeros(2)}, weights)
    return ["--image", str(env.image()), "--classifier", str(weights)]


def sidecar_edited_after_shipping(env: Env) -> list[str]:
    argv = same_checkpoint_in_shipped_folder(env, damage=False)
    sidecar = Path(argv[-1]).with_suffix(".json")
    sidecar.write_text(sidecar.read_text().replace('"anomaly_threshold": 0.2', '"anomaly_threshold": 0.9'))
    return argv


def nan_weights_without_hash(env: Env) -> list[str]:
    """One NaN written into the weights of a checkpoint that records no sha256: only the finite check can tell."""
    from safetensors.torch import load_file, save_file

    weights = env.checkpoint(env.classifier, "c", {"weights_sha256": None})
    state = load_file(str(weights))
    state["head.1.bias"][0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    return ["--image", str(env.image()), "--classifier", str(weights)]


def nan_model_output(env: Env) -> list[str]:
    env.file("result.json", b"previous result\n")
    return ["--image", str(env.image()), "--output", str(env.tmp / "result.json"), "--classifier",
            str(overflowing_classifier(env))]


def edited(which: str, changes: dict | None = None, sidecar: str | None = None) -> Callable[[Env], list[str]]:
    """A one-image run whose --classifier or --vae is a copy (c or v) with an edited or replaced sidecar."""
    def argv(env: Env) -> list[str]:
        source = env.classifier if which == "classifier" else env.vae
        return ["--image", str(env.image()), f"--{which}", str(env.checkpoint(source, which[0], changes, sidecar))]

    return argv


def flat_image(env: Env, name: str = "flat.png") -> Path:
    """A skin-coloured flat picture, large enough for every check: the gate finds it near-constant."""
    path = env.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (200, 160), (190, 140, 120)).save(path)
    return path


def non_lesion_folder(env: Env) -> list[str]:
    flat_image(env, "plain/flat.png")
    env.image("plain/noise.png", (128, 128))
    env.image("plain/tiny.png", (40, 9))
    return ["--folder", str(env.tmp / "plain"), "--csv", str(env.tmp / "out.csv")]


def pixel_bomb(env: Env) -> Path:
    path = env.tmp / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)  # 81 Mpx, ~10 KB on disk
    return path


KINDS = [
    # --image inputs that cannot be read: exit 1, before the models load
    Kind("image_missing", 1, "nope.jpg: file not found", lambda e: ["--image", str(e.tmp / "nope.jpg")], True),
    Kind("image_empty", 1, "empty file", lambda e: ["--image", str(e.file("empty.jpg", b""))], True, upload=True),
    Kind("image_text", 1, "not a readable image",
         lambda e: ["--image", str(e.file("notes.jpg", b"this is not an image"))], True, upload=True),
    Kind("image_truncated_jpeg", 1, "not a readable image",
         lambda e: ["--image", str(e.file("cut.jpg", e.image("full.jpg").read_bytes()[:300]))], True, upload=True),
    Kind("image_gif", 1, "unsupported format GIF", lambda e: ["--image", str(e.image("anim.gif"))], True, upload=True),
    Kind("image_webp", 1, "unsupported format WEBP", lambda e: ["--image", str(e.image("x.webp"))], True, upload=True),
    Kind("image_pickle", 1, "not a readable image",
         lambda e: ["--image", str(e.file("weights.png", b"\x80\x04\x95" + os.urandom(64)))], True, upload=True),
    Kind("image_too_small", 1, "is too small", lambda e: ["--image", str(e.image("tiny.png", (4, 4)))], True,
         upload=True),
    Kind("image_pixel_bomb", 1, "pixel limit", lambda e: ["--image", str(pixel_bomb(e))], True, upload=True),
    Kind("image_is_a_folder", 1, "is a folder, not an image (use --folder)",
         lambda e: ["--image", str(e.folder())], True),
    Kind("image_broken_symlink", 1, "broken symbolic link", broken_symlink, True),
    # arguments: exit 2, before the models load
    Kind("threshold_nan", 2, "'nan' is not a finite number",
         lambda e: ["--image", str(e.image()), "--malignant-threshold", "nan"], True),
    Kind("threshold_above_1", 2, "2 is outside 0 to 1",
         lambda e: ["--image", str(e.image()), "--malignant-threshold", "2"], True),
    Kind("threshold_text", 2, "'high' is not a number",
         lambda e: ["--image", str(e.image()), "--malignant-threshold", "high"], True),
    Kind("anomaly_threshold_negative", 2, "-1 is negative",
         lambda e: ["--image", str(e.image()), "--anomaly-threshold", "-1"], True),
    Kind("anomaly_threshold_inf", 2, "'inf' is not a finite number",
         lambda e: ["--image", str(e.image()), "--anomaly-threshold", "inf"], True),
    Kind("batch_size_0", 2, "0 is outside 1 to 4096", lambda e: ["--folder", str(e.folder()), "--batch-size", "0"],
         True),
    Kind("batch_size_negative_quiet", 2, "-3 is outside 1 to 4096",
         lambda e: ["--folder", str(e.folder()), "--batch-size", "-3", "--quiet"], True),
    Kind("batch_size_fraction", 2, "'2.5' is not a whole number",
         lambda e: ["--folder", str(e.folder()), "--batch-size", "2.5"], True),
    Kind("device_unknown", 2, "'foo': choose auto, cpu", lambda e: ["--image", str(e.image()), "--device", "foo"],
         True),
    Kind("device_mps_absent", 2, "MPS is not available", lambda e: ["--image", str(e.image()), "--device", "mps"],
         True, marks=(pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is present"),)),
    Kind("device_cuda_absent", 2, "CUDA is not available", lambda e: ["--image", str(e.image()), "--device", "cuda"],
         True, marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),)),
    Kind("device_cuda_index", 2, "--device cuda:99: ",
         lambda e: ["--image", str(e.image()), "--device", "cuda:99"], True),
    Kind("image_empty_path", 2, "empty path", lambda e: ["--image", ""], True),
    Kind("image_and_folder", 2, "not allowed with argument",
         lambda e: ["--image", str(e.image()), "--folder", str(e.folder())], True),
    Kind("no_input", 2, "one of the arguments --image --folder is required", lambda e: ["--quiet"], True),
    Kind("csv_with_image", 2, "--csv does not apply to --image",
         lambda e: ["--image", str(e.image()), "--csv", str(e.tmp / "out.csv")], True),
    Kind("output_and_gradcam_with_folder", 2, "--output and --gradcam do not apply to --folder",
         lambda e: ["--folder", str(e.folder()), "--output", "r.json", "--gradcam", "g.png"], True),
    Kind("two_outputs_one_file", 2, "name the same file",
         lambda e: ["--image", str(e.image()), "--output", str(e.tmp / "x.png"), "--gradcam", str(e.tmp / "x.png")],
         True),
    Kind("output_overwrites_input", 2, "would overwrite the input image",
         lambda e: ["--image", str(e.image()), "--gradcam", str(e.tmp / "lesion.png")], True),
    Kind("backend_unknown", 2, "invalid choice: 'tensorflow'",
         lambda e: ["--image", str(e.image()), "--backend", "tensorflow"], True),
    Kind("unknown_flag", 2, "unrecognized arguments: --threshold",
         lambda e: ["--image", str(e.image()), "--threshold", "0.5"], True),
    # --folder inputs: exit 1, before the models load
    Kind("folder_missing", 1, "nope: folder not found", lambda e: ["--folder", str(e.tmp / "nope")], True),
    Kind("folder_is_a_file", 1, "is a file, not a folder (use --image)", lambda e: ["--folder", str(e.image())], True),
    Kind("folder_without_images", 1, "no JPEG/PNG/BMP/TIFF images found (3 other file(s)", folder_without_images,
         True),
    Kind("folder_empty", 1, "no JPEG/PNG/BMP/TIFF images found", empty_folder, True),
    # outputs that cannot be written, found before the models load: exit 4
    Kind("output_is_a_folder", 4, "is a folder; give a file name",
         lambda e: ["--image", str(e.image()), "--output", str(e.folder())], True),
    Kind("output_below_a_file", 4, "is a file, not a folder",
         lambda e: ["--image", str(e.image()), "--output", str(e.file("x.txt", b"x") / "result.json")], True),
    Kind("csv_in_unwritable_folder", 4, "cannot write in /sys (Permission denied)",
         lambda e: ["--folder", str(e.folder()), "--csv", "/sys/melanoma.csv"], True),
    Kind("gradcam_unknown_extension", 4, "unknown image extension '.xyz'",
         lambda e: ["--image", str(e.image()), "--gradcam", str(e.tmp / "overlay.xyz")], True),
    # root may write a read-only file, so as root this kind is not in the table (a skip would fail CI's no-skip rule)
    *([] if IS_ROOT else [Kind("output_read_only", 4, "the file is read-only", read_only_output, True)]),
    # outputs that fail while being written, after the result exists: exit 4, what was done is kept
    Kind("output_disk_full", 4, "--output /dev/full: cannot write it (No space left on device)",
         lambda e: ["--image", str(e.image()), "--output", "/dev/full"], kept=report_on_screen),
    Kind("gradcam_disk_full", 4, "cannot write it (No space left on device)",
         lambda e: ["--image", str(e.image()), "--output", str(e.tmp / "result.json"), "--gradcam",
                    str(full_disk(e, "full.png"))], kept=json_kept),
    Kind("csv_disk_full", 4, "cannot write it (No space left on device) after 0 row(s)",
         lambda e: ["--folder", str(e.folder()), "--csv", str(full_disk(e, "full.csv")), "--quiet"],
         kept=lambda e, out: None),  # nothing was finished: the header itself could not be written
    # checkpoints: exit 3
    Kind("classifier_missing", 3, "none.safetensors: checkpoint not found",
         lambda e: ["--image", str(e.image()), "--classifier", str(e.tmp / "none.safetensors")]),
    Kind("classifier_is_a_folder", 3, "checkpoint not found (it is a folder)", folder_checkpoint),
    Kind("sidecar_missing", 3, "its sidecar c.json is missing", sidecar_missing),
    Kind("sidecar_not_json", 3, "not valid JSON",
         edited("classifier", sidecar="{oops")),
    Kind("sidecar_is_a_list", 3, "must be a JSON object, not a list",
         edited("classifier", sidecar="[1]")),
    Kind("sidecar_without_normalization", 3, "a classifier sidecar needs 'normalization'",
         edited("classifier", {"normalization": None})),
    Kind("sidecar_input_size_0", 3, "'input_size' must be an integer",
         edited("vae", {"input_size": 0})),
    Kind("sidecar_threshold_text", 3, "'malignant_threshold' must be null or a number from 0 to 1",
         edited("classifier", {"malignant_threshold": "high"})),
    Kind("sidecar_resize_stretch", 3, "'resize' must be one of",
         edited("classifier", {"resize": "stretch"})),
    Kind("sidecar_unknown_architecture", 3, "unknown architecture 'resnet9000'",
         edited("classifier", {"arch": "resnet9000"})),
    Kind("pickle_renamed_safetensors", 3, "not a safetensors file", pickle_renamed),
    Kind("vae_given_as_classifier", 3, "is a 'vae' checkpoint, expected 'classifier'",
         lambda e: ["--image", str(e.image()), "--classifier", str(e.vae)]),
    Kind("seven_class_classifier", 3, "predicts ['akiec'",
         lambda e: ["--image", str(e.image()), "--classifier", str(e.saved(
             classifier_model(e, 7), "dx", e.classifier,
             {"class_names": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]}))]),
    Kind("weights_bytes_flipped", 3, "its sha256 does not match the weights_sha256 of c.json",
         lambda e: ["--image", str(e.image()), "--classifier", str(flip(e.checkpoint(e.classifier, "c")))]),
    Kind("shipped_vae_4kb_flipped", 3, "its sha256 does not match",
         lambda e: same_checkpoint_in_shipped_folder(e, damage=True)),
    Kind("sidecar_edited_after_shipping", 3, "convvae.json: its sha256 does not match", sidecar_edited_after_shipping),
    Kind("nan_weights_without_hash", 3, "1 tensor(s) hold NaN or infinite values (head.1.bias)",
         nan_weights_without_hash),
    Kind("uncalibrated_vae", 3, "no anomaly_threshold in its sidecar; run anomaly_detection/calibrate.py",
         edited("vae", {"anomaly_threshold": None})),
    Kind("nan_model_output", 3, "not a finite number (NaN or infinity)", nan_model_output,
         kept=previous_result_untouched),
    Kind("nan_model_output_folder", 3, "3 image(s) got the model output is not a finite number",
         lambda e: ["--folder", str(e.folder()), "--csv", str(e.tmp / "out.csv"), "--quiet", "--classifier",
                    str(overflowing_classifier(e))], kept=csv_rows_with_errors),
    # interruptions: exit 130
    Kind("ctrl_c_in_folder_run", 130, "Ctrl-C after 2 of 4 images; their rows are in", ctrl_c_in_folder,
         kept=csv_of_finished_rows),
    Kind("ctrl_c_while_loading", 130, "Ctrl-C before any result was written", ctrl_c_while_loading),
    # unusual inputs that must simply work
    Kind("folder_of_mixed_files", 0, "", mixed_folder, kept=csv_has_every_file),
    Kind("corrupt_onnx_cache", 0, "", corrupt_onnx_cache, kept=re_exported),
    Kind("output_folder_created", 0, "",
         lambda e: ["--image", str(e.image()), "--output", str(e.tmp / "new" / "deeper" / "result.json")],
         kept=created),
    Kind("shipped_style_folder_intact", 0, "", lambda e: same_checkpoint_in_shipped_folder(e, damage=False),
         kept=report_on_screen),
    Kind("folder_of_non_lesions", 0, "", non_lesion_folder, kept=csv_of_non_lesions, gate=True),
    # images that decode but are not lesions (unusual formats included): the gate says "cannot assess", exit 5
    Kind("cmyk_jpeg", 5, "cmyk.jpg: image too noisy to assess (estimated noise",
         lambda e: ["--image", str(e.image("cmyk.jpg", (128, 128), mode="CMYK"))], kept=cannot_assess_on_screen,
         upload=True, gate=True),
    Kind("palette_png", 5, "p.png: image too noisy to assess (estimated noise",
         lambda e: ["--image", str(e.image("p.png", (128, 128), mode="P"))], kept=cannot_assess_on_screen,
         upload=True, gate=True),
    Kind("grey_16_bit_png", 5, "g16.png: greyscale image (dermoscopic images are in colour)",
         lambda e: ["--image", str(e.image("g16.png", (128, 128), mode="I;16"))], kept=cannot_assess_on_screen,
         upload=True, gate=True),
    Kind("noise_too_small_to_assess", 5, "image too small to assess (64x48 px; a side needs at least 64 px)",
         lambda e: ["--image", str(e.image())], kept=cannot_assess_on_screen, upload=True, gate=True),
    Kind("flat_image", 5, "flat.png: near-constant image (pixel spread 0.0 of 255)",
         lambda e: ["--image", str(flat_image(e))], kept=cannot_assess_on_screen, upload=True, gate=True),
    Kind("gated_image_keeps_json", 5, "near-constant image (pixel spread 0.0 of 255) (no --gradcam overlay written)",
         lambda e: ["--image", str(flat_image(e)), "--output", str(e.tmp / "result.json"), "--gradcam",
                    str(e.tmp / "cam.png")], kept=gated_json_without_overlay, gate=True),
    # the gate's own arguments and checkpoint
    Kind("gate_and_no_gate", 2, "--gate and --no-gate contradict each other",
         lambda e: ["--image", str(e.image()), "--gate", str(e.vae), "--no-gate"], True, gate=True),
    Kind("gate_missing", 3, "none.safetensors: checkpoint not found",
         lambda e: ["--image", str(e.image()), "--gate", str(e.tmp / "none.safetensors")], gate=True),
    Kind("vae_given_as_gate", 3, "is a 'vae' checkpoint, expected 'gate'",
         lambda e: ["--image", str(e.image()), "--gate", str(e.vae)], gate=True),
]


def snapshot(folder: Path) -> dict[str, int]:
    """Every entry under `folder` (links not followed) with its size: what a refused run must not change."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(top) / name
            found[str(path.relative_to(folder))] = path.lstat().st_size
    return found


@pytest.fixture
def env(tmp_path: Path, tiny_checkpoints: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Env:
    torch.set_num_threads(1)
    return Env(tmp_path / "work", *tiny_checkpoints, monkeypatch)


def test_the_table_is_large_enough():
    failing = [k for k in KINDS if k.code != 0]
    assert len(failing) >= 40 and len({k.name for k in KINDS}) == len(KINDS)
    assert {k.code for k in KINDS} == {0, 1, 2, 3, 4, 5, 130}


@pytest.mark.parametrize("kind", [pytest.param(k, id=k.name, marks=k.marks) for k in KINDS])
def test_bad_input(kind: Kind, env: Env, capsys: pytest.CaptureFixture) -> None:
    env.tmp.mkdir()
    argv = kind.argv(env)
    argv += [a for flag, path in (("--classifier", env.classifier), ("--vae", env.vae)) if flag not in argv
             for a in (flag, str(path))]
    argv += [] if kind.gate else ["--no-gate"]
    if kind.before_models:
        def loaded(*args, **kwargs):
            raise AssertionError("the models loaded before the input was refused")

        env.monkeypatch.setattr(HybridPredictor, "__init__", loaded)
    before = snapshot(env.tmp)
    code, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and "img/s]" not in line]  # not the progress bar
    assert code == kind.code, (code, err)
    assert "Traceback" not in err and not re.search(r"\bnan\b", out, re.IGNORECASE)
    if kind.code == 0:
        assert lines == [], err
    else:
        assert len(lines) == 1 and lines[0].startswith(("error: ", "interrupted: ", "cannot assess: ")), err
        assert kind.message in lines[0], lines[0]
    assert not [p for p in snapshot(env.tmp) if p.endswith(".tmp")]
    if kind.kept is None:
        assert snapshot(env.tmp) == before
    else:
        kind.kept(env, out)


N_CTRL_C = 2000


def test_real_ctrl_c_keeps_a_valid_csv(tiny_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGINT to a real folder run: exit 130, one line, and a CSV of exactly the images it finished."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(N_CTRL_C):  # enough that the run is still going when the signal comes, even on a busy machine
        Image.fromarray(np.full((16, 16, 3), i % 256, np.uint8)).save(folder / f"{i:04d}.png")
    out_csv = tmp_path / "out.csv"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "inference.py"), "--folder", str(folder), "--csv", str(out_csv), "--quiet",
         "--batch-size", "1", "--classifier", str(tiny_checkpoints[0]), "--vae", str(tiny_checkpoints[1]),
         "--no-gate"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell's background job (`pytest ... &`) ignores SIGINT and its children inherit that: restore the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out_csv.is_file() and out_csv.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    done = int(err.split("Ctrl-C after ")[1].split(f" of {N_CTRL_C}")[0])
    rows = csv_rows(out_csv)
    assert 2 <= done < N_CTRL_C and done <= len(rows) <= done + 1  # a signal between writing a row and counting it
    assert all(r["decision"] in ("benign", "malignant") for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# The same kinds through the demo

@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch, tiny_checkpoints: tuple[Path, Path], tmp_path: Path):
    from streamlit.testing.v1 import AppTest, element_tree

    if not hasattr(element_tree, "FileUploader"):
        pytest.skip("this streamlit's AppTest cannot drive st.file_uploader")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(tiny_checkpoints[0]))
    monkeypatch.setenv("MELANOMA_VAE", str(tiny_checkpoints[1]))
    monkeypatch.setenv("MELANOMA_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MELANOMA_SAMPLES", str(tmp_path / "samples"))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def upload(at, name: str, data: bytes) -> list[str]:
    """Upload one file to the single-image tab; returns the errors the page shows."""
    at.file_uploader(key="single_upload").set_value((name, data, "application/octet-stream"))
    at.run()
    assert not at.exception, at.exception
    shown = [str(e.value) for kind in ("markdown", "error", "warning", "success", "info") for e in getattr(at, kind)]
    assert not [t for t in shown if "object at 0x" in t], shown
    assert not [t for t in shown if t.startswith("Upload a dermoscopic image")], shown  # no prompt beside an error
    return shown


@pytest.mark.parametrize("kind", [pytest.param(k, id=k.name) for k in KINDS if k.upload])
def test_demo_shows_the_cli_message(kind: Kind, demo, env: Env, capsys: pytest.CaptureFixture) -> None:
    env.tmp.mkdir()
    path = Path(kind.argv(env)[1])
    code, out, err = run_cli(capsys, "--image", str(path), "--classifier", str(env.classifier), "--vae", str(env.vae))
    shown = upload(demo, path.name, path.read_bytes())
    assert code == kind.code and not [t for t in shown if t.startswith("Final decision:")], (code, err, shown)
    cli_message = re.sub(r"^(error|cannot assess): ", "", err.strip()).replace(str(path), path.name)
    if code == 5:  # the CLI says "cannot assess: <file>: <reason>", the demo "Cannot assess: <reason>"
        cli_message = "Cannot assess: " + cli_message.removeprefix(f"{path.name}: ")
    assert any(cli_message in t for t in demo_errors(demo)), (cli_message, demo_errors(demo))


def demo_errors(at) -> list[str]:
    return [str(e.value) for e in at.error]


def test_demo_upload_limit_is_visible(demo) -> None:
    upload(demo, "huge.jpg", b"\xff\xd8" + bytes(21 * 2**20))
    assert any("huge.jpg: 21.0 MB is over the 20 MB upload limit" in e for e in demo_errors(demo)), demo_errors(demo)


def test_demo_refuses_nan_outputs(monkeypatch: pytest.MonkeyPatch, env: Env, tmp_path: Path) -> None:
    from streamlit.testing.v1 import AppTest

    env.tmp.mkdir()
    monkeypatch.setenv("MELANOMA_CLASSIFIER", str(overflowing_classifier(env)))
    monkeypatch.setenv("MELANOMA_VAE", str(env.vae))
    monkeypatch.setenv("MELANOMA_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MELANOMA_SAMPLES", str(tmp_path / "samples"))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    shown = upload(at, "lesion.png", env.image().read_bytes())
    assert not [t for t in shown if t.startswith("Final decision:")]
    assert any("not a finite number" in e for e in demo_errors(at)), demo_errors(at)
