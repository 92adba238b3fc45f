"""Error analysis by patient attributes (counts, rates and exact CIs per group, on a small hand-made table) and the
permutation importance of the metadata-fusion inputs (on synthetic data where one input carries the label)."""
from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest

patient_errors = importlib.import_module("studies.patient_errors")


def test_age_bands():
    assert [patient_errors.age_band(a) for a in (0, 29, 30, 59.5, 75, 85, np.nan)] == [
        "0-29", "0-29", "30-44", "45-59", "75+", "75+", "unknown"]


def test_group_counts_rates_and_cis():
    df = pd.DataFrame({
        "label": ["malignant"] * 4 + ["benign"] * 6,
        "pred": [1, 1, 1, 0] + [0, 0, 0, 0, 1, 1],
        "prob_malignant": [0.9, 0.8, 0.7, 0.2, 0.1, 0.2, 0.3, 0.1, 0.6, 0.7],
        "age": [35, 35, 70, 70, 35, 35, 70, 70, 70, np.nan],
        "sex": ["male", "female"] * 5,
        "site": ["back"] * 10,
    })
    table = patient_errors.error_table(df).set_index(["attribute", "group"])
    overall = table.loc[("all", "all")]
    assert (overall["TP"], overall["FN"], overall["TN"], overall["FP"]) == (3, 1, 4, 2)
    assert overall["sensitivity"] == pytest.approx(0.75) and overall["specificity"] == pytest.approx(4 / 6)
    assert overall["sensitivity_ci_low"] < 0.75 < overall["sensitivity_ci_high"]
    assert np.isnan(overall["auc"])  # fewer than 5 malignant: no AUC claimed
    assert table.loc[("age", "30-44"), "n"] == 4 and table.loc[("age", "unknown"), "n"] == 1
    assert table.loc[("age", "60-74"), "sensitivity"] == pytest.approx(0.5)
    assert table.loc[("sex", "male"), "n"] + table.loc[("sex", "female"), "n"] == 10
    assert table.loc[("site", "back"), "prevalence"] == pytest.approx(0.4)


def test_permutation_importance_finds_the_informative_input():
    from sklearn.linear_model import LogisticRegression

    importance = importlib.import_module("studies.metadata_importance")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = np.column_stack([y + rng.normal(0, 0.7, 400), rng.normal(size=400), rng.normal(size=400)])
    model = LogisticRegression().fit(x, y)
    table = importance.permutation_importance(model, x, y, {"signal": [0], "noise": [1, 2]}, 100, 0).set_index("input")
    assert table.loc["signal", "ci_low"] > 0.2
    assert abs(table.loc["noise", "auc_drop"]) < 0.02 and table.loc["noise", "ci_low"] < 0.01
    assert table.loc["signal", "n_boot"] == 100
