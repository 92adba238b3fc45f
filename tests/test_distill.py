"""Knowledge distillation: the soft loss against a hand computation on a tiny batch, and a distilled training run
that records its teacher; a teacher with another colour constancy is a clear error; the distillation study's two arms
differ only in the teacher and take its colour constancy."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import load_script
from test_arms import tiny_configurations
from test_training import train

from classifiers.distill import Teacher, soft_distillation_loss
from classifiers.models import create_model
from data.checkpoint import save_checkpoint
from data.manifest import LABELS
from data.paths import MANIFESTS
from data.runtime import UserError
from data.transforms import preprocess_meta
from studies import distillation


def test_soft_distillation_loss_matches_hand_computation():
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    t = 2.0

    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p, q = softmax(t_row), softmax(s_row)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * t**2
    assert soft_distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert soft_distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_distillation_gradient_pulls_the_student_to_the_teacher():
    student = torch.zeros(1, 2, requires_grad=True)
    soft_distillation_loss(student, torch.tensor([[0.0, 4.0]]), 1.0).backward()
    assert student.grad[0, 1] < 0 < student.grad[0, 0]  # gradient descent raises the teacher's favourite class


def teacher_checkpoint(path: Path, color_constancy: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model("medvit", img_size=48)
    meta = {"kind": "classifier", "arch": "medvit", "arch_kwargs": {}, "class_names": list(LABELS),
            "malignant_threshold": 0.5, **preprocess_meta(48, "squash", "imagenet", color_constancy)}
    return save_checkpoint(path, model, meta)


def test_distilled_run_records_its_teacher(original, tmp_path):
    teacher = teacher_checkpoint(tmp_path / "teacher", "none")
    result = train(tmp_path / "run", MANIFESTS / "original.csv", "--epochs", "1",
                   "--teacher", str(teacher), "--distill-alpha", "0.7")
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    assert meta["distilled_from"]["alpha"] == 0.7 and len(meta["distilled_from"]["teachers"][0]["sha256"]) == 64
    assert meta["input_size"] == 32  # the student keeps its own size; the teacher saw 48 px


def test_ensemble_teacher_returns_the_mean_of_its_members_logits(tmp_path):
    paths = [str(teacher_checkpoint(tmp_path / f"t{seed}", "none", seed)) for seed in (0, 1)]
    batch = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    autocast = dict(device_type="cpu", enabled=False)
    members = [Teacher([p], torch.device("cpu"), None).logits(batch, autocast) for p in paths]
    ensemble = Teacher(paths, torch.device("cpu"), None)
    assert ensemble.size == 48 and not torch.allclose(members[0], members[1])
    assert torch.allclose(ensemble.logits(batch, autocast), (members[0] + members[1]) / 2, atol=1e-6)


def test_teacher_with_other_colour_constancy_is_refused(original, tmp_path):
    teacher = teacher_checkpoint(tmp_path / "teacher", "shades_of_gray")
    result = train(tmp_path / "run", MANIFESTS / "original.csv", "--teacher", str(teacher))
    assert result.returncode == 1 and "train the student with the teacher's setting" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, says", [(["--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1]"),
                                        (["--label-smoothing", "0.7"], "--label-smoothing must be in [0, 0.5)"),
                                        (["--backbone-lr-scale", "0"], "--backbone-lr-scale must be in (0, 1]")])
def test_bad_training_flags_are_usage_errors(capsys, args, says):
    from classifiers.train import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(args)
    assert info.value.code == 2 and says in capsys.readouterr().err


def test_native_size_is_the_default_input_size():
    from classifiers.train import parse_args

    assert parse_args(["--arch", "efficientnet_lite1"])[0].img_size == 240
    assert parse_args(["--arch", "densenet121"])[0].img_size == 128


def test_distillation_study_uses_the_shipped_densenet_recipe():
    step9 = load_script("09_generalisation")
    assert distillation.STUDY.recipe == {**step9.RECIPE, **step9.RUNS["long/light"], "config": "mixed"}


def test_distillation_arms_take_the_teachers_colour_constancy(tmp_path):
    for setting in ("none", "shades_of_gray"):
        teacher = teacher_checkpoint(tmp_path / setting, setting)
        a = argparse.Namespace(manifest="m.csv", teacher=str(teacher))
        arms = distillation.distillation_arms(a)
        assert arms["scratch"] == {"manifest": "m.csv", "color_constancy": setting}
        assert arms["distilled"] == {**arms["scratch"], "teacher": [str(teacher)]}
    with pytest.raises(UserError, match="--teacher: .*not found"):
        distillation.distillation_arms(argparse.Namespace(manifest="m.csv", teacher=str(tmp_path / "gone.json")))


@pytest.mark.real_data
def test_distillation_study_differs_only_in_the_teacher(original, tmp_path):
    tiny_configurations(original, tmp_path / "manifests")
    teacher = teacher_checkpoint(tmp_path / "teacher", "shades_of_gray")
    distillation.main(["--manifest", str(tmp_path / "manifests" / "original.csv"), "--teacher", str(teacher),
                       "--seeds", "0", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "report"),
                       "--n-boot", "50", "--set", "arch=medvit", "img_size=32", "epochs=1", "epoch_size=8",
                       "batch_size=4", "--threads", "1", "--no-progress"])
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert list(runs["arm"]) == ["scratch", "distilled", "all_malignant_baseline"]
    scratch, distilled = (json.loads((tmp_path / "runs" / f"{arm}_s0" / "config.json").read_text())
                          for arm in ("scratch", "distilled"))
    assert scratch["teacher"] is None and distilled["teacher"] == [str(teacher)]
    assert {k: v for k, v in scratch.items() if k not in ("teacher", "out")} == \
        {k: v for k, v in distilled.items() if k not in ("teacher", "out")}
    assert "distilled_from" in json.loads((tmp_path / "runs" / "distilled_s0" / "best.json").read_text())
