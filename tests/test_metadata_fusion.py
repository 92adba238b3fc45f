"""Metadata fusion experiment: missing and unseen metadata are encoded without dropping rows, the fusion model
uses the metadata (its output changes with it), and the CLI writes both arms and the paired difference."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from studies import metadata_fusion
from studies.metadata_fusion import MetadataFusion, encode_metadata, metadata_vocabulary


def test_missing_and_unseen_metadata_have_their_own_columns():
    fit = pd.DataFrame({"age": [40, 60], "sex": ["male", "female"], "site": ["back", "face"]})
    other = pd.DataFrame({"age": [np.nan, 30], "sex": [pd.NA, "male"], "site": ["acral", pd.NA]})
    vocabulary = metadata_vocabulary(fit)
    x = encode_metadata(other, vocabulary)
    assert x.shape == (2, 2 + 3 + 3) and torch.isfinite(x).all()
    assert x[0, :2].tolist() == [0.0, 1.0] and x[1, :2].tolist() == pytest.approx([0.3, 0.0])  # age/100, missing
    sex, site = x[:, 2:5], x[:, 5:8]
    assert sex.sum(1).tolist() == [1.0, 1.0] and sex[0, 2] == 1 and sex[1, 1] == 1  # unknown; male
    assert site[0, 2] == 1 and site[1, 2] == 1  # unseen `acral` and missing both go to unknown


def test_fusion_output_depends_on_metadata_and_image_only_does_not():
    torch.manual_seed(0)
    x, a, b = torch.rand(2, 3, 32, 32), torch.zeros(2, 6), torch.ones(2, 6)
    fusion, image = MetadataFusion("medvit", 6, 32).eval(), MetadataFusion("medvit", 0, 32).eval()
    assert not torch.allclose(fusion(x, a), fusion(x, b))
    assert torch.equal(image(x, a), image(x, b))


@pytest.mark.real_data
def test_cli_reports_both_arms_and_the_paired_difference(original, tmp_path):
    table = metadata_fusion.main(["--arch", "medvit", "--img-size", "32", "--epochs", "1", "--limit", "64",
                                  "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert list(table["arm"]) == ["image", "fusion", "fusion - image (paired)", "all-malignant baseline"]
    aucs = table.set_index("arm")["auc"]
    assert aucs["fusion - image (paired)"] == pytest.approx(aucs["fusion"] - aucs["image"])
    assert (tmp_path / "metadata_fusion.csv").is_file()
