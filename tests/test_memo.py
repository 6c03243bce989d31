"""The step cache: lossless round trip, one computation per key, rebuilt when damaged."""

import math

import numpy as np
import pandas as pd
import pytest

from lab_utils.core import memo


def _table():
    return pd.DataFrame({"model": ["a", "b"], "n": np.array([1, 2], dtype="int64"),
                         "x": [0.1 + 0.2, math.nan], "ok": [True, False], "seconds": [1 / 3, 2 / 3]})


def test_round_trip_is_bit_exact_for_nested_results():
    value = ({"table": _table(), "ppl": 113.12233555444270, "inf": math.inf, "n": np.int64(3)},
             [1, "two", None], _table().x)
    back = memo.decode(memo.encode(value))
    pd.testing.assert_frame_equal(back[0]["table"], _table())
    assert back[0]["ppl"] == value[0]["ppl"] and back[0]["inf"] == math.inf and back[0]["n"] == 3
    assert back[1] == [1, "two", None]
    pd.testing.assert_series_equal(back[2], _table().x, check_names=False)
    assert isinstance(back, tuple)


def test_unsupported_values_fail_loudly():
    with pytest.raises(TypeError, match="cannot store"):
        memo.encode(object())
    with pytest.raises(TypeError, match="MultiIndex"):
        memo.encode(_table().set_index(["model", "n"]))


def test_computed_once_per_key_and_rebuilt_when_damaged(tmp_cache):
    calls = []

    def compute():
        calls.append(1)
        return _table()

    first = memo.cached("demo", {"sparsity": 0.5}, compute)
    second = memo.cached("demo", {"sparsity": 0.5}, compute)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, second)
    memo.cached("demo", {"sparsity": 0.7}, compute)
    assert len(calls) == 2
    # an edited entry fails its checksum: recomputed, never used
    path = memo.step_path("demo", {"sparsity": 0.5})
    path.write_text(path.read_text().replace("0.30000000000000004", "0.5"))
    again = memo.cached("demo", {"sparsity": 0.5}, compute)
    assert len(calls) == 3 and again.x.iloc[0] == 0.1 + 0.2


def test_timed_reports_the_time_of_the_computation_that_made_the_result(tmp_cache):
    out1, row1 = memo.timed("t", {}, lambda: sum(range(10_000)), "sum")
    out2, row2 = memo.timed("t", {}, lambda: 0, "sum")
    assert out1 == out2 == sum(range(10_000))
    assert row1 == row2 and row1["demo"] == "sum" and row1["wall_s"] >= 0


def test_code_version_follows_the_computing_code_only():
    names = {str(p.relative_to(memo.PACKAGE)) for p in memo.PACKAGE.rglob("*.py")}
    assert "writeup.py" in names and "sparsify.py" in names
    assert "writeup.py" in memo.PRESENTATION and "sparsify.py" not in memo.PRESENTATION
    assert len(memo.code_version()) == 16
