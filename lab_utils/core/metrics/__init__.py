"""Metric modules in the ``evaluate`` format, shipped with the lab.

``evaluate.load("accuracy")`` and every other hub metric fail offline (their
scripts live on the hub), so the lab carries its own, loaded by path: each
``<name>/<name>.py`` holds one ``evaluate.Metric`` wrapping scikit-learn
(accuracy, f1) or jiwer (wer), or computing exp(mean loss) (perplexity).

    >>> from lab_utils.core.metrics import load_metric
    >>> load_metric("f1").compute(predictions=[1, 0], references=[1, 1])["f1"]
    0.6666666666666666
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRICS = ("accuracy", "f1", "wer", "perplexity")


def metric_path(name: str) -> Path:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; the lab ships {', '.join(METRICS)} "
                         f"(hub metrics do not load offline)")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs):
    """The ``evaluate`` module of a shipped metric, loaded by path; by default its
    inputs stay in memory instead of an Arrow file under ``~/.cache/huggingface``."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)
