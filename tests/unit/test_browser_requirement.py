"""In CI the console's browser tests fail, not skip, when headless Chromium is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), ("", "1 skipped")])
def test_browser_tests_without_chromium_fail_in_ci_and_skip_elsewhere(ci: str, outcome: str) -> None:
    env = {**os.environ, "CI": ci, "PATH": str(Path(sys.executable).parent)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/browser", "-k", "cross_site"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert outcome in run.stdout, run.stdout
    assert "chromium-driver" in run.stdout
    assert (run.returncode != 0) == (ci == "true")
