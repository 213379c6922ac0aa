"""Human units in specs: sizes ("32GiB", "512MiB") and durations ("90s", "10m").

Sizes are held as whole bytes, durations as float seconds, so comparisons are
exact and independent of how the user spelled them. Bare numbers are refused
for sizes: "memory: 32" could mean MiB (Proxmox) or bytes (Docker).

Both are bounded here, once, so no backend meets a value it cannot hold: a size
is at most `MAX_SIZE` (1 PiB), a duration at most `MAX_DURATION` (a year), and
a `Timeout` is above zero and at most a day (an HTTP client given `1e20` or `0`
seconds fails inside urllib3 with an exception nobody catches).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "MAX_DURATION",
    "MAX_SIZE",
    "MAX_TIMEOUT",
    "Duration",
    "Size",
    "Timeout",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
    "parse_timeout",
]

MAX_SIZE = 1024**5  # 1 PiB: larger than any disk, RAM or VRAM a lab has
MAX_DURATION = 366 * 86400.0
MAX_TIMEOUT = 86400.0
MIN_TIMEOUT = 0.001  # Docker refuses health check intervals and timeouts under 1ms

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]([iI]?[bB])?|[bB])\s*$"
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"


def parse_size(value: object) -> int:
    """Parse "32GiB" into bytes. "G" alone is binary (as Proxmox reads it), "GB" decimal."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"a size needs a unit, such as '32GiB' or '512MiB' (got {value!r})")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (write it like '32GiB' or '512MiB')")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, TiB)")
    if len(number) > 24:
        raise ValueError(f"{value!r} is too large to be a size")
    result = Fraction(number) * factor  # exact: "1.5GiB" is a whole number of bytes, "0.1B" is not
    if result.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    if result > MAX_SIZE:
        raise ValueError(f"{value!r} is too large (the limit is {format_size(MAX_SIZE)})")
    return int(result)


def format_size(size: int) -> str:
    """The shortest exact binary spelling: 34359738368 -> "32GiB"."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_duration(value: object) -> float:
    """Parse "1h30m", "90s" or "500ms" into seconds; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"not a duration: {value!r}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        if value > MAX_DURATION:
            raise ValueError(f"{_shown(value)} is too long to be a duration (the limit is a year)")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r} (write it like '90s' or '10m')")
    text = value.strip()
    if len(text) > 64:
        raise ValueError(f"{value[:64]!r}... is too long to be a duration")
    parts = _DURATION_PART_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r} (write it like '90s', '10m' or '1h30m')")
    seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is too long to be a duration (the limit is a year)")
    return seconds


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def parse_timeout(value: object) -> float:
    """A duration a client waits for: above zero (0 means "never wait" to some clients, an error to others)
    and at most a day."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"a timeout must be longer than zero (got {_shown(value)})")
    if seconds < MIN_TIMEOUT:
        raise ValueError(f"{_shown(value)} is too short for a timeout (the least is 1ms)")
    if seconds > MAX_TIMEOUT:
        raise ValueError(f"{value!r} is too long for a timeout (the limit is a day)")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds == int(seconds):
        whole = int(seconds)
        for unit, factor in (("h", 3600), ("m", 60)):
            if whole % factor == 0:
                return f"{whole // factor}{unit}"
        return f"{whole}s"
    return f"{round(seconds * 1000)}ms"


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": SIZE_PATTERN, "examples": ["32GiB", "512MiB"]}),
]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "pattern": DURATION_PATTERN}, {"type": "number", "minimum": 0}],
            "examples": ["90s", "10m"],
        }
    ),
]
Timeout = Annotated[
    float,
    BeforeValidator(parse_timeout),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": MIN_TIMEOUT, "maximum": MAX_TIMEOUT},
            ],
            "examples": ["30s", "5m"],
        }
    ),
]
