"""Results of a notebook step, computed once per key and reused afterwards.

Each expensive step (:func:`step`) stores its result (tables, numbers, strings,
nested in lists, tuples and dicts) as checksummed JSON under
``<cache>/steps/<step>-<key hash>.json``, so a rerun takes seconds and a killed
run resumes. The key includes a hash of the sources that compute results.
Floats keep ``repr`` precision and the first run returns the table as read
back, so the first and every later run see the same values bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from lab_utils.core import files
from lab_utils.core.measure import Stopwatch

PACKAGE = Path(__file__).resolve().parent.parent

# Only the floors that compute results are hashed: editing a figure, a
# generated sentence, the runner or the write-up (presentation/, report/) must
# not throw away hours of computed results.
COMPUTING = ("core", "engine", "experiments")


@functools.lru_cache(maxsize=4)
def code_version(package: Path = PACKAGE) -> str:
    """A hash of the sources under ``package`` that compute results."""
    paths = sorted(p for floor in COMPUTING for p in (package / floor).rglob("*.py"))
    parts = [(str(p.relative_to(package)), files.sha256_file(p)) for p in paths]
    return files.key_hash(parts)


def step_path(step: str, key: dict) -> Path:
    return files.cache_dir() / "steps" / f"{step}-{files.key_hash(step, key, code_version())}.json"


# --------------------------------------------------------------------------- encoding
def _plain(v):
    """A JSON-able Python value from a numpy/pandas scalar."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, float) and math.isnan(v):
        return {"__float__": "nan"}
    if isinstance(v, float) and math.isinf(v):
        return {"__float__": "inf" if v > 0 else "-inf"}
    return v


def encode(obj):
    """Nested tables and values -> JSON-able structure (lossless for floats)."""
    if isinstance(obj, pd.DataFrame):
        if isinstance(obj.columns, pd.MultiIndex) or isinstance(obj.index, pd.MultiIndex):
            raise TypeError("memo stores flat tables: reset_index() before returning a MultiIndex table")
        return {"__frame__": {
            "columns": [str(c) for c in obj.columns],
            "dtypes": [str(t) for t in obj.dtypes],
            "index": [encode(v) for v in obj.index], "index_name": obj.index.name,
            "data": [[encode(v) for v in row] for row in obj.itertuples(index=False, name=None)]}}
    if isinstance(obj, pd.Series):
        return {"__series__": encode(obj.to_frame(name=obj.name if obj.name is not None else 0))}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("memo stores dicts with string keys only")
        return {"__dict__": {k: encode(v) for k, v in obj.items()}}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [encode(v) for v in obj.tolist()]
    v = _plain(obj)
    if v is None or isinstance(v, (bool, int, float, str, dict)):
        return v
    raise TypeError(f"memo cannot store a {type(obj).__name__}; return tables, numbers or strings")


def decode(obj):
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(decode(v) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: decode(v) for k, v in obj["__dict__"].items()}
    if "__series__" in obj:
        frame = decode(obj["__series__"])
        return frame.iloc[:, 0]
    if "__frame__" in obj:
        f = obj["__frame__"]
        rows = [[decode(v) for v in row] for row in f["data"]]
        df = pd.DataFrame(rows, columns=f["columns"], index=[decode(v) for v in f["index"]])
        df.index.name = f["index_name"]
        if not len(df):
            df = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(f["columns"], f["dtypes"], strict=True)})
        for c, t in zip(f["columns"], f["dtypes"], strict=True):
            if str(df[c].dtype) != t:
                try:
                    df[c] = df[c].astype(t)
                except (TypeError, ValueError):
                    pass  # e.g. an int column holding a missing value stays float
        return df
    return obj


# --------------------------------------------------------------------------- the cache
def cached(step: str, key: dict, compute: Callable[[], object]):
    """``compute()``'s result for ``(step, key)``, from the cache when present.

    ``key`` holds every parameter the result depends on (model names,
    sparsities, sample counts, seeds ...), as plain values.
    """
    json.dumps(key)  # a key of plain values only: a repr (of a table, say) would be truncated
    path = step_path(step, key)
    hit = files.cached_json(path)
    if hit is not None:
        return decode(hit["result"])
    stored = {"step": step, "key": key, "result": encode(compute())}
    text = json.dumps(stored, sort_keys=True, default=str, allow_nan=False) + "\n"
    files.write_checked(path, text.encode())
    return decode(json.loads(text)["result"])


# --------------------------------------------------------------------------- the step decorator
def key_value(v):
    """An argument as a plain JSON value for a step key: a config object by its
    fields (so a new setting enters every key that takes the config), a tuple
    as a list, a path as text."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: key_value(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): key_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [key_value(x) for x in v]
    v = _plain(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def step(name: str, ignore: Iterable[str] = (), timed_as: str | None = None):
    """Cache a function's result under ``name``, keyed by its own arguments.

    The key is every argument after defaults are applied (config objects by
    their fields), less those in ``ignore`` (where the work runs, how it is
    shown: ``executor``, ``workers``). ``timed_as`` also stores the wall and
    CPU seconds of the computation as a row (``demo``, ``wall_s``, ``cpu_s``,
    ``threads``, ``load_average``, and when and where: ``measured``, ``host``)
    and returns ``(result, timing)``: a warm run shows the times of the run that
    produced its numbers. The undecorated
    function stays reachable as ``fn.compute``, and ``fn.key(*args, **kwargs)``
    gives the key.
    """
    ignore = frozenset(ignore)

    def decorate(fn):
        signature = inspect.signature(fn)
        unknown = ignore - set(signature.parameters)
        if unknown:
            raise TypeError(f"step {name!r}: ignore names no parameter of {fn.__name__}: {sorted(unknown)}")

        def key(*args, **kwargs) -> dict:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return {k: key_value(v) for k, v in bound.arguments.items() if k not in ignore}

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if timed_as is None:
                return cached(name, key(*args, **kwargs), lambda: fn(*args, **kwargs))

            def run():
                with Stopwatch() as sw:
                    result = fn(*args, **kwargs)
                return {"result": result, "timing": sw.row(timed_as)}

            out = cached(name, key(*args, **kwargs), run)
            return out["result"], out["timing"]

        wrapper.compute = fn
        wrapper.key = key
        return wrapper

    return decorate
