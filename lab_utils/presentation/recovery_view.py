"""The recovery table, figure and sentences of notebook 04, from the tables of
:mod:`lab_utils.experiments.recovery` alone: every number in a sentence is read
from a row, so a rerun with other settings says what that run found."""

from __future__ import annotations

import math

import pandas as pd

from lab_utils.core import files
from lab_utils.presentation import style
from lab_utils.presentation.benchmarks_view import PERCENT_METRICS, fmt_value, metric_label
from lab_utils.presentation.sweep_view import setting_name
from lab_utils.presentation.text import pct

LOG_SCALE = ("perplexity",)
LOSS_LINESTYLES = {"kd": "-", "next-token": "--", "lora": "-."}  # the setting keeps its method's colour
BARELY = 0.10  # a recovery that closes less than this of its gap "barely moved" the metric


def _gap(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else pct(x, 0)


def _setting(row) -> str:
    return setting_name(row.method, row.pattern, row.requested)


def display_table(table: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """One row per recovered setting as the notebook and the write-up show it: the
    benchmark (a perplexity with its protocol), dense / pruned / recovered, the share of
    the gap recovered (perplexity: of the log-perplexity gap), the sparsity before and
    after, what a plain LoRA merge would leave, and the cost. The column is called
    ``benchmark``, not ``metric``: the rows of one model hold different settings."""
    rows = []
    for r in table.itertuples():
        rows.append({"model": r.label, "setting": _setting(r), "loss": r.loss,
                     "benchmark": metric_label(r.metric, "", protocol),
                     "dense": fmt_value(r.metric, r.dense), "pruned": fmt_value(r.metric, r.pruned),
                     "recovered": fmt_value(r.metric, r.recovered), "gap recovered": _gap(r.gap_recovered),
                     "sparsity before": pct(r.sparsity_before), "sparsity after": pct(r.sparsity_after),
                     "plain LoRA merge": "" if pd.isna(r.plain_merge_sparsity) else pct(r.plain_merge_sparsity),
                     "steps": int(r.steps), "tokens": f"{int(r.tokens):,}", "seconds": f"{r.seconds:.0f}"})
    return pd.DataFrame(rows)


def figure(table: pd.DataFrame, history: pd.DataFrame, protocol: str | None = None):
    """One column per model: on top its metric against training steps (each recovery a
    line from the pruned value at step 0 to the recovered one; dense dashed, each pruned
    setting dotted), below the training loss of every step. Returns the saved path
    (``figs/recovery.png``)."""
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(table.label))
    fig, axes = plt.subplots(2, len(labels), figsize=(4.6 * len(labels), 6.4), squeeze=False)
    for col, label in enumerate(labels):
        t = table[table.label == label]
        top, bottom = axes[0][col], axes[1][col]
        metric = t.metric.iloc[0]
        top.axhline(t.dense.iloc[0], color=style.method_color("dense"), ls="--", lw=1,
                    label=f"dense ({fmt_value(metric, t.dense.iloc[0])})")
        for r in t.drop_duplicates(["method", "pattern", "requested"]).itertuples():
            top.axhline(r.pruned, color=style.method_color(r.method), ls=":", lw=1,
                        label=f"{_setting(r)} pruned ({fmt_value(metric, r.pruned)})")
        for r in t.itertuples():
            look = style.line_style(r.method, r.pattern)
            name = f"{_setting(r)} + {r.loss}"
            ls = LOSS_LINESTYLES.get(r.loss, ":")
            top.plot([0, r.steps], [r.pruned, r.recovered], **{**look, "ls": ls}, label=name)
            h = history[(history.label == label) & (history.setting.str.startswith(_setting(r)))
                        & (history.loss == r.loss)]
            bottom.plot(h.step, h.train_loss, color=look["color"], ls=ls, label=name)
        if metric in LOG_SCALE:
            top.set_yscale("log")
        if metric in PERCENT_METRICS:
            top.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:.0%}"))
        for ax in (top, bottom):
            ax.xaxis.get_major_locator().set_params(integer=True)
        top.set(title=label, xlabel="training steps", ylabel=metric_label(metric, "", protocol))
        bottom.set(xlabel="training step", ylabel="training loss")
        top.legend(fontsize=6, loc="best")
        bottom.legend(fontsize=6, loc="best")
    fig.suptitle("Recovery: the pruned model trained with its mask kept")
    fig.tight_layout()
    return files.save_figure(fig, "recovery.png")


def _did(gap: float, gap_of: str) -> str:
    return f"widened the {gap_of} by {_gap(-gap)}" if gap < 0 else f"closed {_gap(gap)} of the {gap_of}"


def _row_phrase(r, gap_of: str) -> str:
    # a negative share means training moved the model further from dense: say so, not "closed -8%"
    return f"{_did(r.gap_recovered, gap_of)} at {_setting(r)} ({fmt_value(r.metric, r.pruned)} → {fmt_value(r.metric, r.recovered)})"


def finding(table: pd.DataFrame, protocol: str | None = None) -> str:
    """A sentence per model: the share of the gap each recovery closed, at what cost,
    whether the sparsity stayed, and where a family barely moved in this budget."""
    if table.empty:
        return "No model was recovered in this run."
    parts = []
    for label, t in table.groupby("label", sort=False):
        metric = t.metric.iloc[0]
        gap_of = "log-perplexity gap" if metric in LOG_SCALE else "gap"
        first = t[t.loss == t.loss.iloc[0]]
        text = (f"**{label}** ({metric_label(metric, '', protocol)}, dense {fmt_value(metric, t.dense.iloc[0])}): "
                f"{first.loss.iloc[0]} recovery " + ", ".join(_row_phrase(r, gap_of) for r in first.itertuples())
                + f" in {int(first.steps.iloc[0])} steps each ({int(first.tokens.sum()):,} tokens, "
                f"{first.seconds.sum():.0f} s)")
        others = t[t.loss != t.loss.iloc[0]]
        if len(others):
            text += "; at " + _setting(others.iloc[0]) + ", " + ", ".join(
                f"{r.loss} {_did(r.gap_recovered, gap_of)}" for r in others.itertuples())
        kept = (t.sparsity_before - t.sparsity_after).abs().max() == 0
        text += (". The sparsity stayed exactly as pruned" if kept else
                 ". The sparsity changed (the mask was not kept)")
        lora = t[t.plain_merge_sparsity.notna()]
        if len(lora):
            r = lora.iloc[0]
            text += (f"; LoRA's adapters merged the plain way would have left {pct(r.plain_merge_sparsity)} of the "
                     f"weights zero instead of {pct(r.sparsity_after)}")
        worse = first[first.gap_recovered < 0]
        barely = first[(first.gap_recovered >= 0) & (first.gap_recovered < BARELY)]
        if len(worse):
            text += (f". Within this budget recovery made {label} worse at "
                     + ", ".join(_setting(r) for r in worse.itertuples()))
        if len(barely):
            text += (f". Within this budget recovery barely moved {label} (under {BARELY:.0%} of the gap at "
                     + ", ".join(_setting(r) for r in barely.itertuples()) + ")")
        parts.append(text + ".")
    return " ".join(parts)


def headline(table: pd.DataFrame, protocol: str | None = None) -> str | None:
    """The write-up's short answer: how much of the decoder's gap the default loss won back
    (the first model with a perplexity, else the first model)."""
    if table.empty:
        return None
    ppl = table[table.metric == "perplexity"]
    t = ppl if len(ppl) else table
    t = t[(t.label == t.label.iloc[0]) & (t.loss == t.loss.iloc[0])]
    r0 = t.iloc[0]
    gap_of = "log-perplexity gap" if r0.metric in LOG_SCALE else "gap"
    kept = (t.sparsity_before - t.sparsity_after).abs().max() == 0
    return (f"{r0.loss} with the mask kept closed {r0.label}'s {gap_of} ({metric_label(r0.metric, '', protocol)}) by "
            + ", ".join(f"{_gap(r.gap_recovered)} at {_setting(r)}" for r in t.itertuples())
            + f" in {int(r0.steps)} steps ({t.seconds.sum():.0f} s of training), the sparsity "
            f"{'unchanged' if kept else 'CHANGED'}.")
