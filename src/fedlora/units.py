"""Human-readable quantities shared by tables, log lines and figure axes."""

from __future__ import annotations


def format_bytes(x: float | None, digits: int = 2) -> str:
    """Decimal units, e.g. 2.00 MB; "–" for a missing value."""
    if x is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.{digits}f} {unit}"
    return f"{x:.0f} B"
