"""CI cannot pass by skipping: with MELANOMA_REQUIRE_ALL_TESTS=1 (set by .ci/run when the data and chromium are
there) a test that skips fails, through the hook in tests/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("require", "outcome"), [("0", "1 skipped"), ("1", "1 failed")])
def test_a_skip_fails_only_when_every_test_must_run(tmp_path: Path, require: str, outcome: str) -> None:
    test_file = tmp_path / "test_needs_chromium.py"
    test_file.write_text("import pytest\n\n\ndef test_browser():\n    pytest.skip('chromium not found')\n")
    env = {**os.environ, "MELANOMA_REQUIRE_ALL_TESTS": require, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           str(test_file)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in proc.stdout, proc.stdout
    assert ("skipped, but MELANOMA_REQUIRE_ALL_TESTS=1: chromium not found" in proc.stdout) == (require == "1")
