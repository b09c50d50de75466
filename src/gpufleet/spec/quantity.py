"""Kubernetes-style quantities ("16Gi", "512Mi", "2G") as plain byte counts, and durations
("90s", "10m", "1h", or plain seconds) as seconds."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes", "parse_duration"]

_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|M|G|T)?\s*$")


def parse_bytes(value: str | int) -> int:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _QUANTITY.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a quantity; write e.g. '512Mi', '16Gi' or '2G'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def format_bytes(n: int) -> str:
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: str | float) -> float:
    """Seconds from ``30``, ``"30s"``, ``"500ms"``, ``"10m"`` or ``"1h"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration; write e.g. '30s', '10m' or '1h'")
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration; write e.g. '30s', '10m' or '1h'")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]
