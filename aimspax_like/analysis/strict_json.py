"""Strict JSON for every machine-readable file the analysis writes.

Python's ``json.dumps`` writes an infinite float as ``Infinity`` and NaN as ``NaN``: JavaScript,
``jq`` and most other parsers reject both. The AL threshold is infinite during its warm-up, so
a summary written mid-warm-up would be unreadable to them.

The convention is the event log's (``aimspax_like.events``): +inf and -inf become the strings
``"inf"`` and ``"-inf"`` (the value stays recognisable and ``float("inf")`` reads it back), NaN
becomes ``null`` (there is no value to keep). ``dumps_strict`` then serialises with
``allow_nan=False``, so a non-finite number that slipped through raises instead of being written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict(value: Any) -> Any:
    """A copy of ``value`` with non-finite floats replaced, numpy values made plain, paths as text."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [strict(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return strict(value.tolist())
    if hasattr(value, "__float__"):
        return strict(float(value))
    return str(value)


def dumps_strict(value: Any, indent: int | None = 2) -> str:
    """``json.dumps`` of ``strict(value)``; never writes ``Infinity`` or ``NaN``."""
    return json.dumps(strict(value), indent=indent, allow_nan=False)


def as_float(value: Any) -> float | None:
    """Read back a number written by ``strict`` or by the event log: ``"inf"`` -> inf, null -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def revive(value: Any) -> Any:
    """The inverse of ``strict`` for reading: the strings ``"inf"``/``"-inf"`` become floats again."""
    if isinstance(value, str) and value in ("inf", "-inf", "Infinity", "-Infinity"):
        return float(value.replace("inity", ""))
    if isinstance(value, dict):
        return {k: revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [revive(v) for v in value]
    return value
