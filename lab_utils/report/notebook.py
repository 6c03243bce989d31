"""Small helpers that keep notebook cells to one-liners (the report floor).

:func:`setup` fixes seeds, threads and the figure style; :func:`md` displays
generated prose (a sentence stating a result is built from the computed
values, never typed in) and, with a key, records it for the write-up;
:func:`show_parameters` opens a rendered notebook with every effective
parameter and who set it; :func:`show_table` shows fractions as percentages and
other floats to four significant digits (the CSVs keep full precision).
"""

from __future__ import annotations

import json
import math
import os
import random
import re

import numpy as np
import pandas as pd
import torch

from lab_utils.core import files
from lab_utils.report import params


def setup(seed: int = 0, threads: int | None = None) -> None:
    """Seed every generator, fix the thread count and the figure style."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is None:
        threads = int(os.environ.get("LAB_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, threads))
    import matplotlib

    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "figure.figsize": (7.5, 4.2),
                                "svg.hashsalt": "lab4", "path.simplify": True})
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 30)
    pd.set_option("display.precision", 4)


def md(text: str, key: str | None = None):
    """Display generated markdown (call with an f-string of computed values).

    With a ``key`` the text is also recorded as a finding, so the lab
    write-up (:mod:`lab_utils.report.writeup`) quotes the very sentence the notebook
    showed instead of computing it a second time.
    """
    from IPython.display import Markdown, display

    display(Markdown(text))
    if key:
        record(key, text)


def findings_path(notebook: str | None = None):
    """``results/findings/<notebook>.json``; the report runner names the
    notebook through ``LAB_NOTEBOOK`` (and clears the file before each run)."""
    name = notebook or os.environ.get("LAB_NOTEBOOK", "interactive")
    return files.results_dir() / "findings" / f"{name}.json"


def record(key: str, value) -> None:
    """Record a finding (a sentence, a figure file name, a number) for the write-up."""
    path = findings_path()
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    files.write_json(path, data)


def show_figure(path):
    """Display a saved figure (so the notebook shows exactly the file in figs/)."""
    from IPython.display import Image, display

    display(Image(filename=str(path)))


# --------------------------------------------------------------------------- parameters
# The report runner names the parameter file and the keys it set for this notebook
# (papermill only injects the values), so the table can tell a value set by the file
# from a default, even one the file repeats.
PARAMS_FILE_ENV = "LAB_PARAMS_FILE"
PARAMS_KEYS_ENV = "LAB_PARAMS_KEYS"


def parameters_table(values: dict, notebook: str) -> pd.DataFrame:
    """One row per parameter the notebook declares: ``parameter``, ``value``,
    ``set by`` (the parameter file, the notebook default, or "changed here" for
    a value edited in the parameters cell), the notebook ``default`` where the
    value differs from it, and the ``help`` of the parameters cell.
    ``values``: what :func:`lab_utils.report.params.validate_notebook` returned."""
    declared = params.declared(notebook)
    defaults = params.defaults(declared)
    from_file = set(json.loads(os.environ.get(PARAMS_KEYS_ENV) or "[]"))
    file_name = os.environ.get(PARAMS_FILE_ENV) or "parameter file"
    rows = []
    for name, info in declared.items():
        value, default = values.get(name), defaults[name]
        if name in from_file:
            source = file_name
        elif value == default:
            source = "notebook default"
        else:
            source = "changed here"
        rows.append({"parameter": name, "value": _literal(value), "set by": source,
                     "default": "" if value == default else _literal(default), "help": info.get("help") or ""})
    return pd.DataFrame(rows)


def _literal(value) -> str:
    # As it would be written in the parameters cell; lists without numpy or quotes noise.
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def show_parameters(values: dict, notebook: str) -> None:
    """Display :func:`parameters_table` (the first table of a rendered notebook)."""
    from IPython.display import HTML, display

    table = parameters_table(values, notebook).to_html(index=False, escape=True, classes="lab-parameters",
                                                       justify="left")
    # Names, values and help are read left to right, unlike the numbers of a result table
    # (JupyterLab's and nbconvert's stylesheet right-align every cell of an output table).
    style = ("<style>table.lab-parameters th, table.lab-parameters td, .jp-RenderedHTMLCommon "
             "table.lab-parameters th, .jp-RenderedHTMLCommon table.lab-parameters td { text-align: left; }</style>")
    display(HTML(f"{style}<p><strong>Parameters of this run</strong></p>{table}"))


# --------------------------------------------------------------------------- tables
# Columns (and index levels) shown as percentages: every sparsity, accuracy, F1,
# fraction and word error rate, by name, plus those a cell names.
PERCENT_WORDS = {"sparsity", "accuracy", "agreement", "recall", "fraction", "frac", "f1", "wer", "share"}
NOT_MEASURED = "—"  # a missing value (NaN): none measured, or none reached
PERCENT_NAMES = {"requested", "actual", "actual_total", "neurons_removed", "captured"}


def is_percent(name, percent_of=()) -> bool:
    """Whether a column or index level ``name`` holds a fraction shown as a
    percentage: a name in ``percent_of`` or :data:`PERCENT_NAMES`, or one with a
    word of :data:`PERCENT_WORDS` ("requested_sparsity", "zero-shot accuracy (sst2)")."""
    if not isinstance(name, str):
        return False
    low = name.lower()
    return name in percent_of or low in PERCENT_NAMES or bool(PERCENT_WORDS & set(re.split(r"[^a-z0-9]+", low)))


def percent(x, digits: int = 1) -> str:
    """A fraction as a percentage with ``digits`` decimals, or more where fewer would
    round a value that is not 0 or 1 to 0% or 100% (a dense model's 0.03% zeros)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NOT_MEASURED
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return str(x)
    x = float(x)
    if x in (0.0, 1.0):
        return f"{x:.0%}"
    for d in range(digits, digits + 6):
        s = f"{x:.{d}%}"
        if float(s[:-1]) not in (0.0, 100.0):
            return s
    return s


def number(x) -> str:
    """A float to four significant digits, never in e-notation above one; numbers
    from ten thousand up with thousands separators; text as it is."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}" if abs(x) >= 1e4 else str(x)
    if isinstance(x, bool) or not isinstance(x, (float, np.floating)):
        return NOT_MEASURED if x is None else str(x)
    x = float(x)
    if math.isnan(x):
        return NOT_MEASURED
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}" if abs(x) >= 1e4 else str(int(x))
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def format_table(df: pd.DataFrame, percent_of=()) -> pd.DataFrame:
    """A copy of ``df`` as text, ready to display: the columns and index levels that
    :func:`is_percent` names (or listed in ``percent_of``) as percentages, other
    floats as :func:`number`. The data themselves are not changed."""
    out = df.copy()
    for col in out.columns:
        name = col[-1] if isinstance(col, tuple) else col
        top = col[0] if isinstance(col, tuple) else col
        as_pct = is_percent(name, percent_of) or is_percent(top, percent_of)
        out[col] = [percent(v) if as_pct else number(v) for v in out[col].tolist()]
    out.index = _format_index(out.index, percent_of)
    out.columns = _format_index(out.columns, percent_of)
    return out


def _format_index(index: pd.Index, percent_of) -> pd.Index:
    if isinstance(index, pd.MultiIndex):
        levels = [_format_level(index.get_level_values(i), percent_of) for i in range(index.nlevels)]
        return pd.MultiIndex.from_arrays(levels, names=index.names)
    return _format_level(index, percent_of)


def _format_level(level: pd.Index, percent_of) -> pd.Index:
    if level.dtype.kind != "f":
        return level
    fmt = percent if is_percent(level.name, percent_of) else number
    return pd.Index([fmt(v) for v in level], name=level.name)


def show_table(df: pd.DataFrame, percent_of=()) -> None:
    """Display ``df`` through :func:`format_table`."""
    from IPython.display import display

    display(format_table(df, percent_of))
