"""Byte sizes as people write them in policy files: ``"256 MiB"``, ``"1.5GB"``, ``"80%"``.

Units (case-insensitive, optional space between number and unit):

==========================  ===============
``B`` or no unit            1
``K``, ``KiB``              1024
``M``, ``MiB``              1024 ** 2
``G``, ``GiB``              1024 ** 3
``T``, ``TiB``              1024 ** 4
``P``, ``PiB``              1024 ** 5
``KB``                      1000
``MB``                      1000 ** 2
``GB``                      1000 ** 3
``TB``                      1000 ** 4
``PB``                      1000 ** 5
==========================  ===============

A bare letter is binary, like ``ulimit``, ``docker --memory`` and ``free -h`` use it;
only the explicit ``KB``/``MB``/``GB`` spellings are decimal, as on disk labels.
"""

from __future__ import annotations

__all__ = ["Percent", "parse_size", "format_size", "MAX_SIZE", "KiB", "MiB", "GiB", "TiB"]

import math
import re
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PiB = 1 << 50

#: Largest size accepted. The native table stores sizes as int64 and the C
#: parser refuses numbers close to INT64_MAX; nothing real comes near 4 EiB.
MAX_SIZE = 1 << 62

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "m": MiB,
    "mib": MiB,
    "g": GiB,
    "gib": GiB,
    "t": TiB,
    "tib": TiB,
    "p": PiB,
    "pib": PiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
}

_SIZE_RE = re.compile(r"^\s*(?P<number>[0-9][0-9_]*(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%\s*$")

_EXAMPLES = "512, '100 B', '512 KiB', '256 MiB' or '1.5 GB'"
_UNIT_LIST = "B, K/KiB, M/MiB, G/GiB, T/TiB, P/PiB (powers of 1024) or KB, MB, GB, TB, PB (powers of 1000)"


@dataclass(frozen=True)
class Percent:
    """A share of the memory available to the process (cgroup limit or physical memory)."""

    value: float

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TypeError(f"Percent value must be a number, got {type(self.value).__name__}")
        # 0% would compile to 0, which the runtime reads as "no limit".
        if not (math.isfinite(self.value) and 0 < self.value <= 100):
            raise ValueError(f"percentage must be greater than 0 and at most 100, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))

    def of(self, total: int) -> int:
        """This share of ``total`` bytes, rounded down, but at least one byte."""
        return max(1, int(Decimal(total) * Decimal(repr(self.value)) / 100))

    def __str__(self) -> str:
        return f"{self.value:g}%"


def parse_size(text: object, *, allow_percent: bool = False) -> int | Percent:
    """Parse a byte size: an ``int`` of bytes, or a string such as ``"256 MiB"``.

    See the module docstring for the units. Fractions are allowed with a unit
    (``"1.5 GiB"``) and rounded down to whole bytes. With ``allow_percent``,
    ``"80%"`` gives ``Percent(80.0)``.

    Raises:
        ValueError: for anything else (negative, empty, NaN, a float, a bool,
            an unknown unit, a size above :data:`MAX_SIZE`); the message says
            what was expected.
    """
    expected = f"a size such as {_EXAMPLES}"
    if allow_percent:
        expected += ", or a percentage such as '80%'"
    if isinstance(text, bool):
        raise ValueError(f"expected {expected}, got a boolean ({str(text).lower()})")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"sizes cannot be negative, got {text}")
        return _bounded(text, str(text))
    if isinstance(text, float):
        if math.isfinite(text) and text < 0:
            raise ValueError(f"sizes cannot be negative, got {text!r}")
        # Floats silently lose bytes past 2**53 and admit NaN; ask for a string.
        raise ValueError(f"expected {expected}, got the float {text!r} (write it as a string with a unit)")
    if not isinstance(text, str):
        raise ValueError(f"expected {expected}, got {type(text).__name__} {text!r:.40}")

    stripped = text.strip()
    if not stripped:
        raise ValueError(f"expected {expected}, got an empty string")
    if stripped.startswith("-"):
        raise ValueError(f"sizes cannot be negative, got {text!r}")
    if stripped.endswith("%"):
        if not allow_percent:
            raise ValueError(f"a percentage is not allowed here; expected a size such as {_EXAMPLES}")
        match = _PERCENT_RE.match(text)
        if not match:
            raise ValueError(f"invalid percentage {text!r}: expected a number followed by '%', such as '80%'")
        try:
            return Percent(float(match["number"]))
        except ValueError as exc:
            raise ValueError(f"invalid percentage {text!r}: {exc}") from None

    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: expected {expected}")
    unit = match["unit"].lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {match['unit']!r} in size {text!r}: expected one of {_UNIT_LIST}")
    number = Decimal(match["number"].replace("_", ""))
    value = int((number * _UNITS[unit]).to_integral_value(rounding=ROUND_FLOOR))
    return _bounded(value, text)


def _bounded(value: int, text: str) -> int:
    if value > MAX_SIZE:
        raise ValueError(f"size {text!r} is too large: at most {MAX_SIZE} bytes (4096 PiB)")
    return value


_FORMAT_UNITS = (("KiB", KiB), ("MiB", MiB), ("GiB", GiB), ("TiB", TiB), ("PiB", PiB))


def format_size(n: int) -> str:
    """Human form of ``n`` bytes in binary units, at most two decimals.

    ``format_size(64 * MiB) == "64 MiB"``, ``format_size(3 * GiB // 2) == "1.5 GiB"``,
    ``format_size(512) == "512 B"``. Sizes that are not a whole number of
    hundredths of a unit are rounded, so show the exact byte count next to it
    where it matters.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_size() expects an int of bytes, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"format_size() expects a size >= 0, got {n}")
    if n < KiB:
        return f"{n} B"
    for index, (name, factor) in enumerate(_FORMAT_UNITS):
        value = (Decimal(n) / factor).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
        # Rounding can reach 1024 of a unit (1048575 B); say "1 MiB" then.
        if value >= 1024 and index + 1 < len(_FORMAT_UNITS):
            continue
        if value >= 1:
            return f"{format(value.normalize(), 'f')} {name}"
    raise AssertionError("unreachable")  # pragma: no cover
