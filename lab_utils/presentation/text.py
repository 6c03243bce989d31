"""Formatting numbers for generated prose."""

from __future__ import annotations


def pct(x: float, digits: int = 1) -> str:
    """0.934 -> '93.4%'."""
    return f"{100 * x:.{digits}f}%"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
