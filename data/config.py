"""Typed run configurations: one dataclass per trainer is the single definition of its options.

A field declared with `option(default, "help", ...)` is at once a typed attribute (what `train(cfg)` reads and what
studies build directly), a CLI flag (`add_options` derives `--name-with-dashes`, its type, default and help), and a
JSON field (`to_json`, written beside every run's outputs as config.json, and compared by studies.grid to decide
whether a finished run is still up to date). Runtime choices that do not change what is trained (device, threads,
progress bars, resuming) live apart in `Runtime`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from data.atomic import atomic_write_text
from data.runtime import add_runtime_options

C = TypeVar("C")


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A config field with its CLI help (and any argparse extras such as choices or metavar)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; `list[str] | None` -> list[str]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _allows_none(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def check_types(cfg: Any) -> None:
    """TypeError for a field whose value does not have its declared type (e.g. a string where a list is due): a
    config built in code, unlike one parsed from flags, is otherwise not checked."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if value is None:
            continue
        base = _base_type(hint)
        expected = typing.get_origin(base) or base
        if expected is float:
            expected = (int, float)
        wrong_type = isinstance(expected, type | tuple) and not isinstance(value, expected)
        if wrong_type or (expected is int and isinstance(value, bool)):
            raise TypeError(f"{type(cfg).__name__}.{f.name} = {value!r}: expected {hint}")


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One argparse option per field of the dataclass `cls` (bool fields become --flag / --no-flag)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        kwargs = dict(f.metadata)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        base = _base_type(hints[f.name])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs |= {"nargs": "+", "type": typing.get_args(base)[0]}
        else:
            kwargs["type"] = base
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=default, **kwargs)


def from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """The dataclass `cls` from parsed arguments (fields missing from `args` keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(values | overrides))


def parse_config(cls: type[C], argv: list[str] | None, description: str | None,
                 kill_after_steps: bool = False) -> tuple[C, Runtime]:
    """A trainer's CLI: the config's flags, the shared runtime options, --resume (and, for the classifier trainer,
    the --kill-after-steps testing aid); a config the dataclass refuses is a usage error (exit 2)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, cls, skip=("seed",))
    add_runtime_options(p, seed=next(f.default for f in dataclasses.fields(cls) if f.name == "seed"), progress=True)
    p.add_argument("--resume", action="store_true", help="continue from <out>/state.pt if it exists")
    if kill_after_steps:
        p.add_argument("--kill-after-steps", type=int, default=None,
                       help="testing aid: exit abruptly after this many optimizer steps, as a killed run would")
    args = p.parse_args(argv)
    try:
        return from_args(cls, args), Runtime.from_args(args)
    except ValueError as exc:
        p.error(str(exc))


def config_changes(cls: type, items: list[str]) -> dict[str, Any]:
    """`["img_size=32", "epochs=1"]` -> {"img_size": 32, "epochs": 1}: quick-check overrides (a study's --set),
    each value parsed with its field's type ("none" is None where the field allows None, commas for lists)."""
    hints, changes = typing.get_type_hints(cls), {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {sorted(hints)}")
        base = _base_type(hints[key])
        if value.lower() == "none" and _allows_none(hints[key]):
            changes[key] = None
        elif base is bool:
            changes[key] = value.lower() in ("1", "true", "yes")
        elif typing.get_origin(base) is list:
            changes[key] = value.split(",")
        else:
            changes[key] = base(value)
    return changes


def to_json(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def write_config(out: Path, cfg: Any) -> Path:
    """config.json beside a run's outputs: what made them."""
    path = Path(out) / "config.json"
    atomic_write_text(path, json.dumps(to_json(cfg), indent=2) + "\n")
    return path


@dataclasses.dataclass
class Runtime:
    """How a run executes, not what it computes: never part of a run's identity."""

    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    resume: bool = False
    kill_after_steps: int | None = None  # testing aid: exit abruptly after this many optimizer steps

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Runtime:
        return cls(device=args.device, threads=args.threads, progress=not getattr(args, "no_progress", False),
                   resume=getattr(args, "resume", False), kill_after_steps=getattr(args, "kill_after_steps", None))
