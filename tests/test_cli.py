import os
import subprocess
import sys

import pytest

import finite
from finite.cli import COMMANDS, main


def test_version_flag_prints_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert finite.__version__ in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", [c.NAME for c in COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_finite_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "finite", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "usage: finite" in result.stdout


def test_a_closed_output_pipe_is_not_reported_as_an_error():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "finite", "formats", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in completed.stderr
    assert completed.returncode == 0
