"""The ``finite`` command-line tool.

Each subcommand lives in its own module with ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; this module only wires
them into one ``argparse`` parser. argparse (standard library) keeps the tool
free of extra dependencies and lets ``finite doctor SCRIPT ARGS...`` pass
arbitrary arguments through to a user's script.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from finite._version import __version__
from finite.cli import audit_command, doctor_command, formats_command, lab_command

COMMANDS: tuple[ModuleType, ...] = (
    doctor_command,
    formats_command,
    audit_command,
    lab_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finite",
        description=(
            "Keep PyTorch training numerically healthy: prevent, detect and "
            "diagnose NaN/Inf, underflow, overflow and loss spikes."
        ),
    )
    parser.add_argument("--version", action="version", version=f"finite {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``finite`` command line with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except BrokenPipeError:
        # The reader went away (`finite formats --json | head`): not an error of ours.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
