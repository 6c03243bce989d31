"""Tables, figures and generated prose of notebook 04, from the tables of
:mod:`lab_utils.experiments.benchmarks` and :mod:`lab_utils.experiments.throughput`
alone, so each sentence follows the numbers: if a method stops staying within
tolerance, the paragraph says so on the next run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lab_utils.core import files
from lab_utils.core.evaluation import zeroshot
from lab_utils.core.evaluation.protocols import EvalConfig
from lab_utils.experiments.benchmarks import DENSE, METRICS
from lab_utils.presentation import style
from lab_utils.presentation.text import human_bytes, pct

# The metric each benchmark is summarized by (the others stay in the table).
HEADLINE = ("perplexity", "zero-shot accuracy", "probe accuracy", "embedding fidelity", "WER",
            "denoising perplexity")
PERCENT_METRICS = ("zero-shot accuracy", "probe accuracy", "probe F1", "WER")


def metric_label(metric: str, task, protocol: str | None = None) -> str:
    """A metric as shown: with its task when it has one ("zero-shot accuracy (boolq)"),
    a decoder perplexity with its evaluation protocol ("perplexity (sweep)")."""
    if metric == "perplexity" and protocol:
        return f"perplexity ({protocol})"
    return f"{metric} ({task})" if isinstance(task, str) and task else metric


def _tasks(df: pd.DataFrame) -> pd.Series:
    """The task of every row ('' where it has none, or the table has no task column)."""
    return df["task"].fillna("") if "task" in df else pd.Series("", index=df.index)


def metric_labels(df: pd.DataFrame, protocol: str | None = None) -> pd.Series:
    """:func:`metric_label` of every row."""
    labels = [metric_label(m, t, protocol) for m, t in zip(df.metric, _tasks(df), strict=True)]
    return pd.Series(labels, index=df.index)


def fmt_value(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if metric in PERCENT_METRICS:
        return pct(value)
    if metric == "embedding fidelity":
        return f"{value:.3f}"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def within(df: pd.DataFrame) -> pd.Series:
    """True where a row stays within its metric's tolerance of dense (5%,
    perplexities 10%), in the metric's good direction or better."""
    tol = df.metric.map(lambda m: METRICS[m].tolerance)
    higher = df.metric.map(lambda m: METRICS[m].higher_is_better)
    rc = df.relative_change
    return np.where(higher, rc >= -tol, rc <= tol) & rc.notna()


def reach_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model, metric and method: the highest tested unstructured sparsity
    that stays within tolerance (0 when none does), and the lowest that does not."""
    t = df[(df.method != DENSE) & (df.pattern == "unstructured")].copy()
    t["ok"] = within(t)
    t["task"] = _tasks(t)
    rows = []
    for (model, metric, task, method), g in t.groupby(["model", "metric", "task", "method"], sort=False):
        ok = g[g.ok].requested_sparsity
        bad = g[~g.ok].requested_sparsity
        rows.append({"model": model, "label": g.label.iloc[0], "family": g.family.iloc[0],
                     "metric": metric, "task": task, "method": method,
                     "tolerance": METRICS[metric].tolerance,
                     "max_sparsity_within": float(ok.max()) if len(ok) else 0.0,
                     "first_sparsity_outside": float(bad.min()) if len(bad) else math.nan,
                     "tested": sorted(g.requested_sparsity.tolist())})
    return pd.DataFrame(rows)


def best_method(df: pd.DataFrame, model: str, metric: str, pattern: str, sparsity: float | None = None,
                task: str | None = None):
    """The row of the best method for a model and metric (and zero-shot task)
    at a pattern (and sparsity, for unstructured), or None when nothing was
    measured there."""
    t = df[(df.model == model) & (df.metric == metric) & (df.pattern == pattern) & (df.method != DENSE)]
    if task is not None and "task" in t:
        t = t[t.task.fillna("") == task]
    if sparsity is not None:
        t = t[np.isclose(t.requested_sparsity, sparsity)]
    t = t.dropna(subset=["value"])
    if t.empty:
        return None
    i = t.value.idxmax() if METRICS[metric].higher_is_better else t.value.idxmin()
    return t.loc[i]


def method_headline(df: pd.DataFrame) -> str | None:
    """Which method was best most often, over every model at 50% unstructured and at
    2:4 (each model judged on its first headline metric): the write-up's short answer."""
    wins = {}
    for model, g in df.groupby("model", sort=False):
        metric = next((m for m in HEADLINE if m in set(g.metric)), None)
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
            row = best_method(g, model, metric, pattern, sparsity) if metric else None
            if row is not None:
                wins[row.method] = wins.get(row.method, 0) + 1
    if not wins:
        return None
    order = sorted(wins, key=wins.get, reverse=True)
    others = ", ".join(f"{m} in {wins[m]}" for m in order[1:])
    return (f"{order[0]}: the best in {wins[order[0]]} of {sum(wins.values())} model and setting pairs "
            f"(50% unstructured, 2:4){', ' + others if others else ''}.")


def _change(row) -> str:
    rc = row.relative_change
    return "n/a" if rc is None or math.isnan(rc) else f"{100 * rc:+.1f}%"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _measured(g: pd.DataFrame) -> list[tuple[str, str]]:
    """(metric, task) of the headline metrics measured for one model, in HEADLINE order."""
    measured = dict.fromkeys(zip(g.metric, _tasks(g), strict=True))
    return [(m, t) for m in HEADLINE for m2, t in measured if m2 == m]


def family_paragraph(df: pd.DataFrame, family: str, protocol: str | None = None) -> str:
    """One sentence per model of ``family``, on its first headline metric: the best
    method at 50% unstructured and at 2:4, and how far each method goes within
    tolerance (the numbers, for every headline metric: :func:`summary_table`)."""
    t = df[df.family == family]
    if t.empty:
        return f"No {family} model was benchmarked."
    reach = reach_table(t)
    parts = []
    for model, g in t.groupby("model", sort=False):
        metric, task = _measured(g)[0]
        best = []
        for pattern, sp, name in (("unstructured", 0.5, "50% unstructured"), ("2:4", None, "2:4")):
            row = best_method(g, model, metric, pattern, sp, task)
            if row is not None:
                best.append(f"at {name}, {row.method}")
        r = reach[(reach.model == model) & (reach.metric == metric) & (reach.task == task)]
        bits = [f"{row.method} up to {row.max_sparsity_within:.0%}" if row.max_sparsity_within > 0
                else f"{row.method} at none of them" for _, row in r.iterrows()]
        text = f"**{g.label.iloc[0]}** ({metric_label(metric, task, protocol)}): best " + _join(best) if best else \
            f"**{g.label.iloc[0]}** ({metric_label(metric, task, protocol)})"
        if bits:
            text += f"; within {METRICS[metric].tolerance:.0%} of dense, {_join(bits)}"
        parts.append(text + ".")
    return " ".join(parts)


def summary_table(df: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """Per model and headline metric: the dense value, the tolerance, how far each
    method stays within it (tested unstructured sparsities), and the best method
    at 50% unstructured and at 2:4 with its value and change against dense."""
    reach = reach_table(df)
    rows = []
    for model, g in df.groupby("model", sort=False):
        for metric, task in _measured(g):
            at = (g.method == DENSE) & (g.metric == metric) & (_tasks(g) == task)
            dense = g[at].value.iloc[0]
            r = reach[(reach.model == model) & (reach.metric == metric) & (reach.task == task)]
            row = {"model": g.label.iloc[0], "metric": metric_label(metric, task, protocol),
                   "dense": fmt_value(metric, dense),
                   "within tolerance up to": ", ".join(
                       f"{x.method} {x.max_sparsity_within:.0%}" if x.max_sparsity_within > 0 else f"{x.method} none"
                       for _, x in r.iterrows()) + (f" (±{METRICS[metric].tolerance:.0%})" if len(r) else "")}
            for pattern, sp, name in (("unstructured", 0.5, "best at 50%"), ("2:4", None, "best at 2:4")):
                b = best_method(g, model, metric, pattern, sp, task)
                row[name] = "" if b is None else f"{b.method} ({fmt_value(metric, b.value)}, {_change(b)})"
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def metric_figure(df: pd.DataFrame, model: str, protocol: str | None = None):
    """Every metric of one model vs requested sparsity: a line per method
    (unstructured), N:M results as separate markers, dense as a dashed line.
    Returns the saved path (``figs/benchmarks_<label>.png``)."""
    import matplotlib.pyplot as plt

    g = df[df.model == model].assign(shown=lambda t: metric_labels(t, protocol))
    metrics = list(dict.fromkeys(g.shown))
    label = g.label.iloc[0]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    methods = [m for m in dict.fromkeys(g.method) if m != DENSE]
    for ax, shown in zip(axes[0], metrics, strict=True):
        t = g[g.shown == shown]
        metric = t.metric.iloc[0]
        dense = t[t.method == DENSE].value.iloc[0]
        ax.axhline(dense, color=style.method_color(DENSE), ls="--", lw=1,
                   label=f"dense ({fmt_value(metric, dense)})")
        for method in methods:
            u = t[(t.method == method) & (t.pattern == "unstructured")].sort_values("requested_sparsity")
            if len(u):
                xs = [0.0] + u.requested_sparsity.tolist()
                ys = [dense] + u.value.tolist()
                ax.plot(xs, ys, label=method, **style.line_style(method))
            for pat in sorted(p for p in t.pattern.unique() if p != "unstructured"):
                nm = t[(t.method == method) & (t.pattern == pat)]
                if len(nm):
                    ax.plot(nm.requested_sparsity, nm.value, markersize=8, zorder=3, label=f"{method} {pat}",
                            **{**style.line_style(method, pat), "ls": ""})
        if metric in ("perplexity", "denoising perplexity", "infill perplexity"):
            ax.set_yscale("log")
        ax.set(xlabel="requested sparsity", ylabel=metric, title=shown)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:.0%}"))
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{label}: benchmarks vs sparsity")
    fig.tight_layout()
    return files.save_figure(fig, f"benchmarks_{_slug(label)}.png")


def size_figure(df: pd.DataFrame, sizes: pd.DataFrame, model: str, protocol: str | None = None):
    """Headline quality vs the checkpoint's file size (the smallest lossless
    format measured on disk), a marker per setting, dense highlighted."""
    import matplotlib.pyplot as plt

    metric = next(m for m in HEADLINE if m in set(df[df.model == model].metric))
    t = df[(df.model == model) & (df.metric == metric)].merge(
        sizes[sizes.model == model][["method", "pattern", "requested_sparsity", "format", "file_bytes",
                                     "dense_file_bytes"]],
        on=["method", "pattern", "requested_sparsity"])
    label = t.label.iloc[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    methods = [m for m in dict.fromkeys(t.method) if m != DENSE]
    for method in methods:
        u = t[t.method == method]
        for pat, v in u.groupby("pattern", sort=True):
            ax.scatter(v.file_bytes / 2**20, v.value, label=method if pat == "unstructured" else f"{method} {pat}",
                       **style.scatter_style(method, pat))
    d = t[t.method == DENSE]
    ax.scatter(d.file_bytes / 2**20, d.value, s=150, label="dense", zorder=3, **style.scatter_style(DENSE))
    plain = d.dense_file_bytes.dropna()
    if len(plain):
        ax.axvline(plain.iloc[0] / 2**20, color="k", ls=":", lw=1, label="plain dense safetensors")
    ax.set(xlabel="file size (MiB, smallest lossless format)", ylabel=metric_label(metric, "", protocol),
           title=f"{label}: {metric} vs file size")
    if "perplexity" in metric:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return files.save_figure(fig, f"benchmarks_size_{_slug(label)}.png")


def wide_table(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """One model's results as a setting x metric table (for display)."""
    g = df[df.model == model].assign(metric=lambda t: metric_labels(t))
    return g.pivot_table(index=["method", "pattern", "requested_sparsity", "actual_sparsity"],
                         columns="metric", values="value", sort=False)


def size_sentence(sizes: pd.DataFrame) -> str:
    """Per model: the dense fp32 file, and the smallest file at the highest
    tested sparsity (its format and share of the dense file)."""
    if sizes is None or sizes.empty:
        return "No file size was measured (size_formats is empty)."
    parts = []
    for _model, g in sizes.groupby("model", sort=False):
        dense = g[g.method == DENSE].iloc[0]
        top = g[g.requested_sparsity == g.requested_sparsity.max()]
        best = top.loc[top.file_bytes.idxmin()]
        parts.append(f"{g.label.iloc[0]}: the dense checkpoint is {human_bytes(dense.dense_file_bytes)} as plain "
                     f"safetensors ({human_bytes(dense.file_bytes)} in its smallest lossless format, {dense.format}); "
                     f"at {best.requested_sparsity:.0%} ({best.method}, {best.pattern}) the smallest is "
                     f"{best.format} at {human_bytes(best.file_bytes)}, "
                     f"{best.file_bytes / dense.dense_file_bytes:.0%} of the dense file")
    return "; ".join(parts) + "."


def speed_sentence(speed: pd.DataFrame) -> str:
    """Per model and sparsity: tokens/s dense vs sparse-aware, and how many
    layers the sparse-aware model runs as CSR."""
    if speed is None or speed.empty:
        return "No speed was measured."
    parts = []
    for _model, g in speed.groupby("model", sort=False):
        bits = []
        for _, r in g.sort_values("sparsity").iterrows():
            if r.get("fell_back", False):
                bits.append(f"at {r.sparsity:.0%} the CSR plan ran at {r.checked_speedup:.2f}x dense end to end "
                            f"in a first timing, so the sparse-aware model falls back to the dense one "
                            f"({r.dense_tokens_per_s:,.0f} tokens/s)")
            elif r.csr_layers == 0:
                bits.append(f"at {r.sparsity:.0%} no layer's CSR form beats its dense matmul, so the sparse-aware "
                            f"model is the dense one ({r.dense_tokens_per_s:,.0f} tokens/s)")
            else:
                bits.append(f"at {r.sparsity:.0%}, {r.sparse_aware_tokens_per_s:,.0f} vs {r.dense_tokens_per_s:,.0f} "
                            f"tokens/s ({r.sparse_aware_speedup:.2f}x, {r.csr_layers} of {r.layers} layers in CSR; "
                            f"counting multiply-adds allows {r.flop_limit:.2f}x)")
        parts.append(f"**{g.label.iloc[0]}**: " + "; ".join(bits) + ".")
    threads = int(speed.threads.iloc[0])
    load = speed.load_avg.mean()
    return " ".join(parts) + (f" (Timed with {threads} threads, medians of {int(speed.repeats.iloc[0])} "
                              f"repetitions after a warm-up; mean load average {load:.1f} while timing.)")


def data_sentence(nyt: pd.DataFrame, reviews) -> str:
    """The size of the benchmark data: NYT articles and words, review splits."""
    test = reviews["test"]
    return (f"The NYT text has **{len(nyt)}** articles and **{sum(len(t.split()) for t in nyt['text']):,}** words; "
            f"the movie reviews split into **{len(reviews['train'])}** training and **{len(test)}** test "
            f"sentences, {pct(sum(test['label']) / len(test))} of the test sentences positive.")


def protocol_sentence(bench: EvalConfig) -> str:
    """The zero-shot tasks (the lab's prompt and answers), the harness, and the
    number of examples of every benchmark."""
    own = [t for t in bench.zeroshot_tasks if t in zeroshot.OFFLINE_TASKS]
    prompts = "; ".join(f"`{t}`: prompt `{p!r}`, answers {' vs '.join(repr(a) for a in answers)}"
                        for t in own for p, answers in [zeroshot.task_prompt(t)])
    others = [t for t in bench.zeroshot_tasks if t not in zeroshot.OFFLINE_TASKS]
    return (f"Zero-shot tasks through lm-evaluation-harness {zeroshot.harness_version()}, the likelier answer "
            f"by log-likelihood ({prompts}" + ("; " if own and others else "")
            + (f"{', '.join(f'`{t}`' for t in others)} as lm-eval defines them" if others else "")
            + f"), {bench.sentiment_examples} documents per task; {bench.probe_train_examples} training and "
            f"{bench.probe_test_examples} test sentences for the probe, {bench.wer_utterances} utterances for "
            f"Whisper ({bench.wer_per_window} per 30 s clip), {bench.eval_windows} windows of {bench.eval_seqlen} "
            f"tokens for perplexity.")


def table_sentence(results: pd.DataFrame, csv_name: str) -> str:
    """How many rows the benchmark table has, where it is written, and the
    evaluations' total time when they were first run."""
    n_settings = len(results[["method", "pattern", "requested_sparsity"]].drop_duplicates())
    return (f"{len(results)} rows ({results.model.nunique()} models x {n_settings} settings x their metrics) "
            f"are written to `results/{csv_name}`; the evaluations took "
            f"{results.drop_duplicates(['key', 'benchmark']).seconds.sum():.0f} s in all when they were first run "
            f"(each one's own wall time: after each model's dense baseline, the settings are evaluated two at a "
            f"time in worker processes on one thread each).")


def display_table(results: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """The tidy table as a notebook shows it: each value (and its dense value and
    standard error) formatted for its own metric, a perplexity labelled with its
    protocol; the CSV keeps the raw numbers."""
    t = results.drop(columns=["key", "label"], errors="ignore").copy()
    for col in ("value", "dense_value", "stderr"):
        if col in t:
            t[col] = ["" if pd.isna(v) else fmt_value(m, v) for m, v in zip(results.metric, t[col], strict=True)]
    t["metric"] = [metric_label(m, "", protocol) for m in results.metric]
    return t
