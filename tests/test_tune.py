"""studies/tune.py on a small real subset: the study is stored in SQLite and a second call continues it (the
finished trials are kept, not re-run); the best trial by val AUC is the one evaluated on test."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from studies import tune

pytestmark = pytest.mark.real_data


def test_study_resumes_and_reports_the_best_val_trial(original, tmp_path: Path):
    quick = ["--arch", "medvit", "--img-size", "32", "--limit", "48", "--max-epochs", "1", "--threads", "1",
             "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    tune.main([*quick, "--trials", "2"])
    first = pd.read_csv(tmp_path / "out" / "trials.csv")
    tune.main([*quick, "--trials", "3"])
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert (tmp_path / "runs" / "study.db").is_file()
    assert list(trials["state"]) == ["COMPLETE"] * 3
    kept = ["number", "value", "params_lr", "duration"]  # a re-run trial repeats its seeded value, not its duration
    pd.testing.assert_frame_equal(trials.iloc[:2][kept], first[kept])
    best = pd.read_csv(tmp_path / "out" / "best_trial_test.csv")
    assert best["trial"].iloc[0] == trials.loc[trials["value"].idxmax(), "number"]
    assert {"test", "external-val"} <= set(best["split"]) and best["auc"].between(0, 1).all()
