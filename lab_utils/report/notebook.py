"""Small helpers that keep notebook cells to one-liners (the report floor).

* :func:`setup` fixes seeds and threads, styles the figures and silences
  progress bars when the report runner executes the notebook.
* :func:`md` displays generated prose: a sentence that states a result is
  built from the computed values, never typed in; with a key it is also
  recorded (:func:`record`) for the write-up.
* :func:`show_figure` displays a figure file that a presentation module saved.

Parameters are checked by :func:`lab_utils.report.params.validate_notebook`.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from lab_utils.core import files


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
    import pandas as pd

    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 30)
    pd.set_option("display.precision", 4)


def in_report() -> bool:
    """True when the report runner executes this notebook (progress bars off)."""
    return os.environ.get("LAB_REPORT") == "1"


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
