"""Printing helpers for the CLI: rich tables for people, JSON for machines."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

from rich.console import Console


def console() -> Console:
    """A console on standard output (plain text when it is not a terminal)."""
    return Console(soft_wrap=False)


def jsonable(value: Any) -> Any:
    """Convert ``value`` to plain JSON types.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"``
    so that the output is strict JSON (readable by ``jq``) and loses nothing.
    Dataclasses become dicts; torch dtypes become their names.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value).removeprefix("torch.")


def print_json(value: Any) -> None:
    """Write ``value`` to standard output as strict JSON."""
    json.dump(jsonable(value), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
