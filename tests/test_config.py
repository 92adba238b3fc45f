"""Typed run configurations: one dataclass is the flags, the object the trainers take, and the run's config.json."""
from __future__ import annotations

import argparse
import ast
import json
from dataclasses import asdict, dataclass

import pytest
from conftest import ROOT, project_sources

from anomaly_detection.train_vae import VAEConfig
from classifiers.train import TrainConfig
from classifiers.train import parse_args as classifier_args
from data.config import Runtime, add_options, check_types, config_changes, from_args, option, write_config
from generators.train import GeneratorConfig
from generators.train import parse_args as generator_args


@dataclass
class Example:
    size: int = option(32, "input size")
    rate: float = option(0.1, "a rate")
    names: list[str] | None = option(None, "some names")
    fast: bool = option(False, "go fast")
    label: str = option("a", "a label", choices=("a", "b"))

    def __post_init__(self) -> None:
        check_types(self)


def parse(argv: list[str]) -> Example:
    p = argparse.ArgumentParser()
    add_options(p, Example)
    return from_args(Example, p.parse_args(argv))


def test_flags_come_from_the_fields_with_their_types_defaults_and_help():
    assert parse([]) == Example()
    assert parse(["--size", "64", "--rate", "0.5", "--names", "x", "y", "--fast", "--label", "b"]) == \
        Example(64, 0.5, ["x", "y"], True, "b")
    assert parse(["--no-fast"]).fast is False
    with pytest.raises(SystemExit):
        parse(["--label", "c"])  # choices come along
    p = argparse.ArgumentParser()
    add_options(p, Example)
    assert "input size" in p.format_help() and "--names NAMES [NAMES ...]" in p.format_help()


def test_types_are_checked_when_a_config_is_built_in_code():
    Example(size=3, rate=1)  # an int is a valid float
    for bad in ({"names": "x"}, {"size": 2.5}, {"size": True}, {"rate": "0.1"}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            Example(**bad)


def test_config_changes_parse_each_value_with_its_field_type():
    assert config_changes(Example, ["size=8", "rate=0.2", "names=a,b", "fast=true", "label=b"]) == \
        {"size": 8, "rate": 0.2, "names": ["a", "b"], "fast": True, "label": "b"}
    # "none" is None only where the field allows None (color_constancy=none is the string "none")
    assert config_changes(Example, ["names=none", "label=none"]) == {"names": None, "label": "none"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        config_changes(Example, ["sizes=8"])


def test_every_trainer_cli_builds_its_config_and_the_runtime_apart(tmp_path):
    cfg, rt = classifier_args(["--arch", "efficientnet_lite0", "--epochs", "3", "--threads", "1", "--resume",
                               "--no-progress"])
    assert cfg == TrainConfig(arch="efficientnet_lite0", epochs=3) and cfg.img_size == 224  # the native size
    assert rt == Runtime(threads=1, progress=False, resume=True)
    gen, _ = generator_args(["--model", "ddpm", "--preset", "smoke"])
    assert gen.epochs == 1 and gen.arch["channels"] == [8, 16]  # the preset fills what was not given
    with pytest.raises(SystemExit):
        generator_args(["--model", "ldm"])  # needs --autoencoder
    with pytest.raises(ValueError, match="--fold needs --folds"):
        TrainConfig(fold=1)
    path = write_config(tmp_path, VAEConfig(img_size=64))
    assert json.loads(path.read_text()) == json.loads(json.dumps(asdict(VAEConfig(img_size=64))))
    assert GeneratorConfig(model="dcgan", out=str(tmp_path)).run_dir == tmp_path


def test_help_texts_keep_the_line_breaks_of_their_commands():
    """A module docstring is each script's --help; a backslash at a line end there (a shell continuation in an
    example command) joins the lines unless the docstring is raw."""
    joined = []
    for path in project_sources():
        source = path.read_text()
        body = ast.parse(source).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            text = ast.get_source_segment(source, body[0].value) or ""
            if "\\\n" in text and not text.startswith(("r", "R")):
                joined.append(str(path.relative_to(ROOT)))
    assert joined == []
