"""studies/weak_decisions.py on real images with small untrained checkpoints: the band table is consistent
with the per-case file, a band covering everything reproduces the overall error rate, and the figures are written."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from studies import weak_decisions

pytestmark = pytest.mark.real_data


def run(tiny_checkpoints, tmp_path: Path, *extra: str) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    classifier, vae = tiny_checkpoints
    written = weak_decisions.main(["--classifier", str(classifier), "--vae", str(vae), "--limit", "24",
                                   "--gallery", "2", "--device", "cpu", "--out", str(tmp_path), *extra])
    return pd.read_csv(tmp_path / "weak_decisions.csv"), pd.read_csv(tmp_path / "weak_cases.csv"), written


def test_band_table_matches_the_cases(original, tiny_checkpoints, tmp_path):
    table, cases, written = run(tiny_checkpoints, tmp_path, "--band", "0.3", "0.7")
    assert len(table) == 4 and set(table["set"]) == {"ham10000_test", "isic2017_val"}
    counted = cases.groupby(["set", "band"]).size()
    for r in table.itertuples():
        assert r.n == 24 and r.n_in_band == counted.get((r.set, r.band), 0)
        assert r.rescued_and_malignant <= r.rescued_by_vae <= r.n_in_band
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)


def test_a_band_covering_everything_gives_the_overall_error_rate(original, tiny_checkpoints, tmp_path):
    table, cases, _ = run(tiny_checkpoints, tmp_path, "--band", "-0.01", "1.01", "--gallery", "0")
    fixed = table[table["band"] == "-0.01-1.01"]
    assert len(fixed) == table["set"].nunique() > 0 and (fixed["n_in_band"] == fixed["n"]).all()
    for r in fixed.itertuples():
        part = cases[(cases["set"] == r.set) & (cases["band"] == r.band)]
        wrong = part["pred"] != (part["label"] == "malignant")
        assert r.error_rate_in_band == pytest.approx(wrong.mean())
