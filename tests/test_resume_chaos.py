"""The chaos script, shortened: SIGKILL the campaign driver a few times, resume, check everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/chaos_resume.py"


@pytest.mark.slow
def test_campaign_survives_sigkill_and_resumes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", "3", "--workdir", str(tmp_path), "--train-size", "26"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "result           OK" in result.stdout
