"""Human-readable quantities shared by tables, log lines and figure axes."""

from __future__ import annotations


def format_bytes(x: float | None, digits: int | None = 2) -> str:
    """Decimal units, e.g. 2.00 MB (digits=None: as short as exact, e.g. 2 MB for axis ticks);
    "–" for a missing value."""
    if x is None:
        return "–"
    spec = "g" if digits is None else f".{digits}f"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:{spec}} {unit}"
    return f"{x:.0f} B"
