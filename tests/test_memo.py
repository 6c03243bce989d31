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
    calls = []

    @memo.step("t", timed_as="sum")
    def total(n: int):
        calls.append(n)
        return sum(range(n))

    out1, row1 = total(10_000)
    out2, row2 = total(10_000)  # read back: the timing of the first run
    assert out1 == out2 == sum(range(10_000)) and calls == [10_000]
    assert row1 == row2 and row1["demo"] == "sum" and row1["wall_s"] >= 0
    # when and where, so that a rerun showing the row can say it is not its own
    import datetime as dt
    import platform

    assert row1["host"] == platform.node() and dt.datetime.fromisoformat(row1["measured"]).tzinfo is not None


def test_code_version_hashes_the_computing_floors_only():
    floors = {p.relative_to(memo.PACKAGE).parts[0] for p in memo.PACKAGE.rglob("*.py")}
    assert set(memo.COMPUTING) < floors and {"presentation", "report"} <= floors - set(memo.COMPUTING)
    assert len(memo.code_version()) == 16


def _edited_copy(tmp_path, rel: str, old: str, new: str):
    import shutil

    copy = tmp_path / "lab_utils"
    shutil.copytree(memo.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / rel
    text = path.read_text()
    assert old in text, f"{rel} no longer contains {old!r}: pick another line to edit"
    path.write_text(text.replace(old, new, 1))
    return copy


def test_rewording_a_generated_sentence_keeps_every_cached_step(tmp_path):
    # Prose lives on the presentation floor, outside the code version: a
    # reworded sentence must not throw away computed results.
    original = memo.code_version(memo.PACKAGE)
    copy = _edited_copy(tmp_path, "presentation/sweep_view.py", "def conclusions(",
                        "def conclusions_reworded(")
    assert memo.code_version(copy) == original
    copy2 = _edited_copy(tmp_path / "b", "report/writeup.py", "def ", "def _renamed_")
    assert memo.code_version(copy2) == original


def test_changing_a_computing_function_invalidates_cached_steps(tmp_path):
    original = memo.code_version(memo.PACKAGE)
    for i, rel in enumerate(("experiments/sweep.py", "engine/prune.py", "core/sparsify.py")):
        copy = _edited_copy(tmp_path / str(i), rel, "def ", "def _changed_")
        assert memo.code_version(copy) != original, rel


def test_a_step_key_follows_the_code_version(tmp_cache, monkeypatch):
    calls = []
    key = {"a": 1}
    memo.cached("s", key, lambda: calls.append(1) or 1)
    memo.cached("s", key, lambda: calls.append(1) or 1)
    assert calls == [1]
    monkeypatch.setattr(memo, "code_version", lambda package=memo.PACKAGE: "another version")
    memo.cached("s", key, lambda: calls.append(1) or 1)
    assert calls == [1, 1]


def test_step_keys_come_from_the_arguments(tmp_cache):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        sparsity: float
        nsamples: int = 8

    calls = []

    @memo.step("demo-step", ignore=("workers",))
    def run(cfg: Cfg, models=("a",), workers: int = 2):
        calls.append(cfg)
        return {"s": cfg.sparsity, "models": list(models)}

    assert run(Cfg(0.5)) == {"s": 0.5, "models": ["a"]}
    assert run(Cfg(0.5), workers=7) == {"s": 0.5, "models": ["a"]}  # where it runs: same key
    assert len(calls) == 1
    run(Cfg(0.5, nsamples=16))  # a config field is part of the key
    run(Cfg(0.5), models=("a", "b"))
    assert len(calls) == 3
    assert run.key(Cfg(0.5)) == {"cfg": {"sparsity": 0.5, "nsamples": 8}, "models": ["a"]}
    assert run.compute(Cfg(0.1)) == {"s": 0.1, "models": ["a"]} and len(calls) == 4
    with pytest.raises(TypeError, match="ignore names no parameter"):
        memo.step("bad", ignore=("nope",))(lambda x: x)


def test_timed_step_returns_the_first_runs_timing(tmp_cache):
    @memo.step("demo-timed", timed_as="sum")
    def total(n: int):
        return sum(range(n))

    (a, row_a), (b, row_b) = total(1000), total(1000)
    assert a == b == sum(range(1000)) and row_a == row_b and row_a["demo"] == "sum"
