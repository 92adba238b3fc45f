"""The checkpoint contract: safetensors + JSON sidecar round-trips (fp32 and fp16), strict loading that fails with
a CheckpointError naming the file, nothing unpickled, and a project-wide check that no code loosens either rule."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, project_sources
from safetensors import safe_open
from torch import nn

from data.checkpoint import CheckpointError, load_checkpoint, read_sidecar, save_checkpoint, verify_checkpoint
from data.manifest import file_sha256
from data.paths import CHECKPOINTS


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
        "malignant_threshold": 0.37, "input_size": 8, "resize": "squash", "normalization": "unit"}


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


def flip_bytes(path: Path, offset: int = -64) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_integrity_rule_sidecar_hash_then_sha256sums(tmp_path: Path, trained: Tiny):
    """save_checkpoint records weights_sha256; a folder's SHA256SUMS is checked for the files it lists; a
    checkpoint with neither loads, reported as unverified."""
    weights = save_checkpoint(tmp_path / "m", trained, META)
    assert read_sidecar(weights)["weights_sha256"] == file_sha256(weights)
    assert verify_checkpoint(weights) == "sidecar weights_sha256"
    (tmp_path / "SHA256SUMS").write_text(f"{file_sha256(weights)}  m.safetensors\n"
                                         f"{file_sha256(tmp_path / 'm.json')}  m.json\n")
    assert verify_checkpoint(weights) == "SHA256SUMS and sidecar weights_sha256"
    (tmp_path / "m.json").write_text((tmp_path / "m.json").read_text() + " ")  # same JSON, other bytes
    with pytest.raises(CheckpointError, match="m.json: its sha256 does not match .*SHA256SUMS"):
        load_checkpoint(weights, build)
    (tmp_path / "SHA256SUMS").write_text("not a sums line\n")
    with pytest.raises(CheckpointError, match="SHA256SUMS: line 1 is not"):
        load_checkpoint(weights, build)
    (tmp_path / "SHA256SUMS").unlink()
    flip_bytes(weights)  # a damaged float: still finite, only the hash can tell
    with pytest.raises(CheckpointError, match="m.safetensors: its sha256 does not match the weights_sha256"):
        load_checkpoint(weights, build)
    meta = read_sidecar(weights)
    del meta["weights_sha256"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    assert verify_checkpoint(weights) == "unverified"
    load_checkpoint(weights, build)


def test_the_projects_writers_keep_sha256sums_true(tmp_path: Path, trained: Tiny):
    """A re-ship or a recalibration through save_checkpoint / write_sidecar updates the listing, other lines kept."""
    from data.checkpoint import read_sums, write_sidecar

    weights = save_checkpoint(tmp_path / "m", trained, META)
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  m.safetensors\n{'1' * 64}  other.safetensors\n")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(weights, build)
    save_checkpoint(tmp_path / "m", trained, {**META, "epoch": 2})
    assert read_sums(tmp_path / "SHA256SUMS") == {"m.safetensors": file_sha256(weights), "other.safetensors": "1" * 64}
    (tmp_path / "SHA256SUMS").write_text(f"{file_sha256(weights)}  m.safetensors\n{'2' * 64}  m.json\n")
    write_sidecar(weights, {**read_sidecar(weights), "malignant_threshold": 0.5})
    assert load_checkpoint(weights, build)[1]["malignant_threshold"] == 0.5
    assert read_sums(tmp_path / "SHA256SUMS")["m.json"] == file_sha256(tmp_path / "m.json")


def test_non_finite_weights_are_refused(tmp_path: Path, trained: Tiny):
    with torch.no_grad():
        trained.fc2.weight[0, 0] = float("nan")
    weights = save_checkpoint(tmp_path / "m", trained, META, dtype=torch.float16)
    with pytest.raises(CheckpointError, match="m.safetensors: 1 tensor.s. hold NaN or infinite values .fc2.weight"):
        load_checkpoint(weights, build)


@pytest.mark.parametrize("change,message", [
    ({"input_size": 0}, "'input_size' must be an integer from 8"),
    ({"resize": "stretch"}, "'resize' must be one of"),
    ({"normalization": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}, "'normalization' must be"),
    ({"normalization": {"mean": [0.5] * 3, "std": [0, 1, 1]}}, "'normalization' must be"),
    ({"malignant_threshold": "high"}, "'malignant_threshold' must be null or a number from 0 to 1"),
    ({"malignant_threshold": float("nan")}, "'malignant_threshold' must be"),
    ({"class_names": ["benign"]}, "'class_names' must be"),
    ({"color_constancy": {"method": "retinex", "p": 6}}, "'color_constancy' must be"),
    ({"normalization": None}, "a classifier sidecar needs 'normalization'"),  # None: the field is absent
], ids=["size0", "resize", "mean2", "std0", "threshold_text", "threshold_nan", "one_class", "cc", "no_norm"])
def test_sidecar_schema(tmp_path: Path, trained: Tiny, change: dict, message: str):
    weights = save_checkpoint(tmp_path / "m", trained, META)
    meta = {k: v for k, v in {**read_sidecar(weights), **change}.items() if v is not None}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"m.json: {message}"):
        read_sidecar(weights)
    (tmp_path / "m.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="m.json: must be a JSON object, not a list"):
        load_checkpoint(weights, build)


def test_schema_accepts_every_registered_architecture_and_both_normalizations():
    from classifiers.models import list_models
    from data.checkpoint import validate_sidecar

    for arch in list_models():
        for norm in ("unit", {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}):
            validate_sidecar({**META, "arch": arch, "normalization": norm,
                              "color_constancy": {"method": "shades_of_gray", "p": 6}}, "x.json")


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
    files = project_sources()
    assert len(files) > 10
    hits = {str(p.relative_to(ROOT)): unsafe_loads(p.read_text()) for p in files}
    assert {k: v for k, v in hits.items() if v} == {}


def test_shipped_weights_are_fp16_and_within_the_80_mb_budget():
    shipped = sorted((CHECKPOINTS).rglob("*.safetensors"))
    assert shipped, "no shipped weights found in checkpoints/"
    assert sum(f.stat().st_size for f in shipped) < 80e6
    for f in shipped:
        with safe_open(str(f), "pt") as weights:
            dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
        kind = json.loads(f.with_suffix(".json").read_text()).get("kind")
        # Network weights ship in fp16. The gate and the feature detector hold Gaussian statistics (means, precision
        # matrices), not weights: their Mahalanobis distances are calibrated in fp32 and stay fp32.
        allowed = {"F32"} if kind in ("gate", "feature_detector") else {"F16", "I64"}  # I64: num_batches_tracked
        assert dtypes <= allowed, f"{f.name}: {dtypes}"
