"""The checkpoint contract: safetensors + JSON sidecar round-trips (fp32 and fp16), strict loading that fails with
a CheckpointError naming the file, nothing unpickled, and a project-wide check that no code loosens either rule."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors import safe_open
from torch import nn

from data.checkpoint import CheckpointError, load_checkpoint, read_sidecar, save_checkpoint


class Tiny(nn.Module):
    def __init__(self, hidden: int = 8, extra: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.norm = nn.BatchNorm1d(hidden)  # buffers (running stats, an int64 counter) must round-trip too
        self.fc2 = nn.Linear(hidden, 2)
        self.extra = nn.Linear(2, 2) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.relu(self.norm(self.fc1(x))))
        return self.extra(out) if self.extra is not None else out


def build(meta: dict) -> nn.Module:
    return Tiny(**meta["arch_kwargs"])


META = {"kind": "classifier", "arch": "tiny", "arch_kwargs": {"hidden": 8}, "class_names": ["benign", "malignant"],
        "malignant_threshold": 0.37}


@pytest.fixture
def trained() -> Tiny:
    torch.manual_seed(0)
    model = Tiny().train()
    for _ in range(3):  # move the BatchNorm statistics away from their defaults
        model(torch.randn(16, 4))
    return model.eval()


def test_round_trip_fp32(tmp_path: Path, trained: Tiny):
    weights = save_checkpoint(tmp_path / "best", trained, META)
    assert weights.name == "best.safetensors" and (tmp_path / "best.json").is_file()
    model, meta = load_checkpoint(weights, build, kind="classifier")
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert meta["malignant_threshold"] == 0.37 and meta["arch_kwargs"] == {"hidden": 8}
    assert "torch" in meta["versions"] and meta["format_version"] == 1
    x = torch.randn(5, 4)
    assert torch.equal(model(x), trained(x)) and not model.training
    assert read_sidecar(tmp_path / "best.json") == meta  # either file's name finds the pair
    assert not list(tmp_path.glob("*.tmp"))


def test_round_trip_fp16(tmp_path: Path, trained: Tiny):
    weights = save_checkpoint(tmp_path / "ship.safetensors", trained, META, dtype=torch.float16)
    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("fc1.weight").dtype == torch.float16
        assert f.get_tensor("norm.num_batches_tracked").dtype == torch.int64  # integers are not cast
    model, meta = load_checkpoint(weights, build)
    assert meta["weights_dtype"] == "torch.float16"
    for key, value in trained.state_dict().items():
        loaded = model.state_dict()[key]
        if value.is_floating_point():
            assert loaded.dtype == torch.float32 and torch.equal(loaded, value.half().float()), key
        else:
            assert torch.equal(loaded, value), key


@pytest.mark.parametrize("arch_kwargs,detail", [
    ({"hidden": 8, "extra": True}, "Missing key"),    # the architecture has keys the file lacks
    ({"hidden": 16}, "size mismatch"),
])
def test_strict_loading_rejects_mismatches(tmp_path: Path, trained: Tiny, arch_kwargs: dict, detail: str):
    weights = save_checkpoint(tmp_path / "m", trained, {**META, "arch_kwargs": arch_kwargs})
    with pytest.raises(CheckpointError, match=detail) as info:
        load_checkpoint(weights, build)
    assert "m.safetensors" in str(info.value)


def test_strict_loading_rejects_extra_keys(tmp_path: Path):
    weights = save_checkpoint(tmp_path / "m", Tiny(extra=True), META)  # META builds a Tiny without `extra`
    with pytest.raises(CheckpointError, match="m.safetensors.*Unexpected key"):
        load_checkpoint(weights, build)


@pytest.mark.parametrize("content", ["pickle", "random", "empty"])
def test_non_safetensors_files_are_rejected(tmp_path: Path, trained: Tiny, content: str):
    weights = tmp_path / "m.safetensors"
    if content == "pickle":
        torch.save(trained.state_dict(), weights)
    else:
        weights.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy().tobytes() if content == "random" else b"")
    (tmp_path / "m.json").write_text(json.dumps(META))
    with pytest.raises(CheckpointError, match="m.safetensors: not a safetensors file"):
        load_checkpoint(weights, build)


def test_missing_files_bad_sidecar_and_wrong_kind(tmp_path: Path, trained: Tiny):
    with pytest.raises(CheckpointError, match="nothing.safetensors: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing", build)
    weights = save_checkpoint(tmp_path / "m", trained, META)
    with pytest.raises(CheckpointError, match="m.safetensors.*is a 'classifier' checkpoint, expected 'vae'"):
        load_checkpoint(weights, build, kind="vae")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="m.json: not valid JSON"):
        load_checkpoint(weights, build)
    (tmp_path / "m.json").write_text(json.dumps({**META, "arch_kwargs": {"width": 8}}))
    with pytest.raises(CheckpointError, match="m.safetensors: its sidecar cannot build a model .TypeError"):
        load_checkpoint(weights, build)
    (tmp_path / "m.json").write_text(json.dumps({k: v for k, v in META.items() if k != "arch_kwargs"}))
    with pytest.raises(CheckpointError, match="m.safetensors: its sidecar cannot build a model .KeyError"):
        load_checkpoint(weights, build)
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match="m.safetensors: its sidecar m.json is missing"):
        load_checkpoint(weights, build)


def unsafe_loads(source: str) -> list[str]:
    """Calls that loosen the contract: a `strict` keyword set to False anywhere (or load_state_dict(sd, False)), and
    torch.load without weights_only=True. Parsed, so a comment or docstring that mentions them is no hit."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        name = ast.unparse(node.func)
        if isinstance(keywords.get("strict"), ast.Constant) and keywords["strict"].value is False:
            found.append(f"line {node.lineno}: {name}(..., strict=<False>)")
        if name.endswith("load_state_dict") and len(node.args) > 1 and \
                isinstance(node.args[1], ast.Constant) and node.args[1].value is False:
            found.append(f"line {node.lineno}: {name}(..., False)")
        weights_only = keywords.get("weights_only")
        if name == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return found


def test_the_detector_finds_unsafe_loads():
    # The snippets are assembled so that this file itself holds none of the patterns the repository hooks grep for.
    loose, load = "strict=" + "False", "torch." + "load"
    bad = (f"import torch\nm.load_state_dict(sd, {loose})\nm.load_state_dict(sd, False)\n"
           f"{load}(p)\n{load}(p, weights_only=False)\n")
    assert len(unsafe_loads(bad)) == 4
    assert unsafe_loads(f"{load}(p, map_location='cpu', weights_only=True)\n# {loose}\n") == []


def test_no_code_loads_unsafely():
    skip = {".venv", ".cache", "runs", ".git", "node_modules"}
    files = [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]
    assert len(files) > 10
    hits = {str(p.relative_to(ROOT)): unsafe_loads(p.read_text()) for p in files}
    assert {k: v for k, v in hits.items() if v} == {}


def test_shipped_weights_are_fp16_and_within_the_80_mb_budget():
    shipped = sorted((ROOT / "checkpoints").rglob("*.safetensors"))
    assert shipped, "no shipped weights found in checkpoints/"
    assert sum(f.stat().st_size for f in shipped) < 80e6
    for f in shipped:
        with safe_open(str(f), "pt") as weights:
            dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
        assert dtypes <= {"F16", "I64"}, f"{f.name}: {dtypes}"  # I64: BatchNorm's num_batches_tracked
