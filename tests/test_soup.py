"""Model soup (classifiers/soup.py): the average is an element-wise mean, the greedy rule never leaves the soup
below its best ingredient on `val`, the written checkpoint loads strictly and holds the kept ingredients' mean, and
ingredients that cannot be averaged are refused by name."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from classifiers import soup
from classifiers.models import load_classifier
from classifiers.predict import single_view
from data.checkpoint import read_sidecar, save_checkpoint
from data.manifest import file_sha256
from data.runtime import UserError

CPU = torch.device("cpu")


def test_average_states_is_the_elementwise_mean_and_keeps_integer_counters_from_the_first():
    a = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}
    mean = soup.average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["bn.num_batches_tracked"].item() == 5 and mean["bn.num_batches_tracked"].dtype == torch.int64


@pytest.fixture
def ingredients(tiny_checkpoints, tiny_manifest, tmp_path):
    """Three checkpoints of one architecture trained on `tiny_manifest`: the tiny classifier and two copies with
    differently perturbed weights."""
    model, meta = load_classifier(tiny_checkpoints[0])
    meta = {**meta, "threshold_rule": "youden", "metrics": {"val": {"auc": 0.5}},
            "manifest_sha256": file_sha256(tiny_manifest), "train_args": {"manifest": str(tiny_manifest)}}
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters() if seed else ():
                p.add_(0.05 * torch.randn_like(p))
        paths.append(str(save_checkpoint(tmp_path / f"run{seed}" / "best", model,
                                         {k: v for k, v in meta.items() if k not in ("versions", "weights_sha256")})))
        (tmp_path / f"run{seed}" / "metrics.csv").write_text(f"epoch,train_loss,val_auc\n1,0.5,0.{seed}\n")
    return paths


@pytest.mark.real_data
def test_the_greedy_soup_is_never_below_its_best_ingredient_on_val_and_saves_the_mean(ingredients, tmp_path):
    meta = soup.main(["--checkpoints", *ingredients, "--out", str(tmp_path / "soup"), "--threads", "1"])
    rows = pd.read_csv(tmp_path / "soup" / "soup.csv")
    assert len(rows) == 3 and rows["kept"].iloc[0]
    assert meta["metrics"]["val"]["auc"] >= rows["ingredient_val_auc"].max() - 1e-9
    kept = [i["path"] for i in meta["soup"]["ingredients"]]
    assert len(kept) == rows["kept"].sum() and meta["soup"]["rule"] == "greedy on val"
    model, saved = load_classifier(tmp_path / "soup" / "best.safetensors")  # strict
    expected = soup.average_states([single_view(load_classifier(p)[0]).state_dict()
                                    for p in ingredients if any(p.endswith(k) for k in kept)])
    assert all(torch.allclose(v, expected[k]) for k, v in model.state_dict().items())
    assert saved["malignant_threshold"] == meta["malignant_threshold"] and read_sidecar(tmp_path / "soup" / "best")
    logs = pd.read_csv(tmp_path / "soup" / "metrics.csv")  # the kept runs' training logs, one `run` each
    assert sorted(logs["run"]) == sorted(kept) and len(logs) == len(kept)


@pytest.mark.real_data
def test_the_uniform_soup_averages_every_ingredient(ingredients, tmp_path):
    meta = soup.main(["--checkpoints", *ingredients, "--uniform", "--out", str(tmp_path / "u"), "--threads", "1"])
    model, _ = load_classifier(tmp_path / "u" / "best.safetensors")
    expected = soup.average_states([load_classifier(p)[0].state_dict() for p in ingredients])
    assert len(meta["soup"]["ingredients"]) == 3
    assert all(torch.allclose(v, expected[k]) for k, v in model.state_dict().items())


def test_ingredients_that_cannot_be_averaged_are_refused_by_field(ingredients, tmp_path):
    other = read_sidecar(ingredients[1])
    save_checkpoint(tmp_path / "other", load_classifier(ingredients[1])[0],
                    {**{k: v for k, v in other.items() if k != "weights_sha256"}, "input_size": 96})
    with pytest.raises(UserError, match="differ in 'input_size'"):
        soup.make_soup([ingredients[0], str(tmp_path / "other.safetensors")], CPU)
    with pytest.raises(SystemExit, match="at least two checkpoints"):
        soup.main(["--checkpoints", ingredients[0], "--out", str(tmp_path / "one")])
