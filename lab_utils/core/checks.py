"""The one check of a whole-number setting (a count, a length, a seed)."""

from __future__ import annotations

import numbers


def whole_number(name: str, value, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """``value`` as an int when it is a whole number >= ``minimum``, else one
    ``error`` naming ``name``. A bool is refused (``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name} must be {what}, got {value!r}")
    return int(value)
