"""Run `finite doctor` as a user does (a real process) and read the history it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "doctor_scripts"


def doctor(tmp_path, *args, timeout=120):
    """``python -m finite doctor ARGS`` in ``tmp_path``, one intra-op thread."""
    return subprocess.run(
        [sys.executable, "-m", "finite", "doctor", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def history(path):
    """(step records, event records) of a ``history.jsonl`` file."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    steps = [line for line in lines if line["kind"] == "step"]
    events = [line for line in lines if line["kind"] == "event"]
    return steps, events
