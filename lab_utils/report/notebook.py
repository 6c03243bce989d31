"""Small helpers that keep notebook cells to one-liners (the report floor).

:func:`start` opens a run (its clock, the lab's errors in one line, the
parameter file of ``make lab PARAMS=...``); :func:`setup` fixes seeds,
threads and the figure style; :func:`md` displays
generated prose (a sentence stating a result is built from the computed
values, never typed in) and, with a key, records it for the write-up;
:func:`show_parameters` opens a rendered notebook with every effective
parameter and who set it; :func:`show_table` shows fractions as percentages and
other floats to four significant digits (the CSVs keep full precision).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lab_utils.core import files
from lab_utils.core.data import DataError
from lab_utils.core.device import DeviceError
from lab_utils.core.formats import StorageError
from lab_utils.core.measure import process_usage
from lab_utils.core.models import ModelError
from lab_utils.core.sparsify import SparsityError
from lab_utils.core.speech import SpeechError
from lab_utils.experiments.executor import ExecutorError
from lab_utils.report import params

# --------------------------------------------------------------------------- a run
# The lab's own errors: something the user set or lacks (a parameter, the hub, a model
# folder, the device, a scheduler), said by the message; in a live kernel a traceback
# through the checks would push that line below the first screen.
LAB_ERRORS = (params.ParamError, ModelError, DataError, DeviceError, SparsityError, StorageError,
              SpeechError, ExecutorError)
# make lab PARAMS=FILE names the file to every kernel it starts (the report runner does not:
# papermill injects its values).
LIVE_PARAMS_ENV = "LAB_LIVE_PARAMS"
_run: dict = {}  # when this run started: "at" (epoch seconds) and process_usage() then


def start(namespace: dict, notebook: str) -> None:
    """Open a run of ``notebook``, first thing after its parameters cell: the run's
    clock starts (:func:`run_usage`), the lab's errors show as one line in a live
    kernel (``%tb`` shows the traceback), and under ``make lab PARAMS=FILE`` the
    file's values go over the defaults in ``namespace`` (:func:`apply_params_file`)."""
    _run.update(at=time.time(), usage=process_usage())
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc(LAB_ERRORS, _one_line)
    if os.environ.get(LIVE_PARAMS_ENV):
        apply_params_file(namespace, notebook, os.environ[LIVE_PARAMS_ENV])


def _one_line(shell, etype, value, tb, tb_offset=None):
    """IPython's handler of :data:`LAB_ERRORS`: the error's own line; the
    traceback stays where ``%tb`` and ``%debug`` find it."""
    sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
    sys.last_exc = value
    hint = "" if os.environ.get("LAB_NOTEBOOK") else "   \x1b[2m(%tb shows the traceback)\x1b[0m"
    shell._showtraceback(etype, value, [f"\x1b[1;31m{etype.__name__}\x1b[0m: {value}{hint}"])


def apply_params_file(namespace: dict, notebook: str, path: str | Path) -> list[str]:
    """Set the values that the parameter file ``path`` gives ``notebook`` in its
    kernel's ``namespace``, over each default the parameters cell still holds (a
    value edited in the cell wins), and name the file and those keys to
    :func:`parameters_table`. The file is checked first, as the runner checks it."""
    _, per_notebook = params.check_file(path)
    given = per_notebook[notebook]
    defaults = params.defaults(params.declared(notebook))
    applied = sorted(k for k, v in given.items() if namespace.get(k) in (defaults[k], v))
    namespace.update({k: given[k] for k in applied})
    os.environ[PARAMS_FILE_ENV] = shown_path(path)
    os.environ[PARAMS_KEYS_ENV] = json.dumps(applied)
    return applied


def shown_path(path: str | Path) -> str:
    """A path as a reader finds it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(files.REPO_ROOT)) if p.is_relative_to(files.REPO_ROOT) else str(path)


def run_usage() -> dict:
    """:func:`~lab_utils.core.measure.process_usage` counted from :func:`start`:
    this run's seconds, not the kernel's (idle time before a Run All included)."""
    now, then = process_usage(), _run.get("usage", {})
    return {**now, "elapsed_s": now["elapsed_s"] - then.get("elapsed_s", 0.0),
            "cpu_s": now["cpu_s"] - then.get("cpu_s", 0.0)}


def measured_note(timings: pd.DataFrame) -> str:
    """When and where the timings of cached steps (``measured``, ``host``: a
    :class:`~lab_utils.core.measure.Stopwatch` row each, column ``demo``) were
    taken: a rerun reads them back, and must not pass them off as its own."""
    if "measured" not in timings or timings.measured.isna().any():  # rows from before the field
        return ""
    when = [dt.datetime.fromisoformat(m) for m in timings.measured]
    earlier = [w.timestamp() < int(_run.get("at", 0.0)) for w in when]  # "measured" has whole seconds
    if not any(earlier):
        return f"Measured in this run, on `{', '.join(dict.fromkeys(timings.host))}`."
    groups: dict = {}
    for demo, host, w, old in zip(timings.demo, timings.host, when, earlier, strict=True):
        if old:
            groups.setdefault((host, w.strftime("%Y-%m-%d %H:%M %Z")), []).append(str(demo))
    where = "; ".join(f"{', '.join(d)} on `{h}` at {t}" for (h, t), d in groups.items())
    fresh = [str(d) for d, old in zip(timings.demo, earlier, strict=True) if not old]
    return (f"Read back from the cache, as measured by the run that first computed them: {where}. "
            + (f"Measured in this run: {', '.join(fresh)}. " if fresh else "")
            + f"This run took {run_usage()['elapsed_s']:.0f} s up to here.")


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
    # Third-party bars would stay behind in a live kernel, under every model load and dataset
    # map; the lab's own bars (core.progress) are the ones that say how far a step is.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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
