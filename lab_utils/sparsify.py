"""Sparsity masks: small pure functions on one weight (out x in) and its statistics.

Nothing here touches a model: the driver that collects statistics and applies
masks block by block lives in ``lab_utils.prune``.
"""

from __future__ import annotations

import re

METHODS = ("random", "magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")  # methods that need calibration data
SCOPES = ("row", "layer", "global")
UNSTRUCTURED = "unstructured"


class SparsityError(ValueError):
    """Bad pruning input, reported in one line that names the fix."""


def check_sparsity_ratio(sparsity_ratio) -> float:
    """A sparsity ratio is the fraction of weights set to zero, in [0, 1)."""
    try:
        s = float(sparsity_ratio)
    except (TypeError, ValueError):
        raise SparsityError(f"sparsity {sparsity_ratio!r} is not a number; use a fraction in [0, 1), "
                            f"e.g. 0.5") from None
    if not 0.0 <= s < 1.0:
        raise SparsityError(f"sparsity {sparsity_ratio!r} is outside [0, 1): it is the fraction of "
                            f"weights set to zero, e.g. 0.5 for half")
    return s


def parse_pattern(pattern) -> tuple[int, int]:
    """``"unstructured"`` -> (0, 0); ``"2:4"`` -> (2, 4): N zeros in every M
    consecutive weights of a row (the pattern sparse tensor cores accelerate)."""
    if pattern in (None, "", UNSTRUCTURED):
        return 0, 0
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise SparsityError(f"pattern {pattern!r} is not 'unstructured' or 'N:M' (e.g. '2:4')")
    prune_n, prune_m = int(m.group(1)), int(m.group(2))
    if not 0 < prune_n < prune_m:
        raise SparsityError(f"pattern {pattern!r}: N:M needs 0 < N < M (N of every M weights are "
                            f"zeroed), e.g. '2:4' or '4:8'")
    return prune_n, prune_m


def pattern_name(prune_n: int, prune_m: int) -> str:
    return UNSTRUCTURED if prune_n == 0 else f"{prune_n}:{prune_m}"


def check_method(method: str) -> str:
    if method not in METHODS:
        raise SparsityError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise SparsityError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    return scope
