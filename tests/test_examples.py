"""The examples in examples/ run as a user runs them, and say what the README quotes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_in_your_code_trains_skips_only_the_overflowing_start_and_finds_nothing():
    out = run_example("in_your_code.py")
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert losses[-1] < 0.75 * losses[0], out
    assert re.search(r"optimizer steps 19, skipped 1\b", out), out
    assert "skipped: nonfinite" in out  # the 2**16 start overflows float16 once
    assert "No numerical problems found." in out
