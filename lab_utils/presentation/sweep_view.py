"""Figures and generated sentences for the sparsity sweep."""

from __future__ import annotations

import math

import pandas as pd

from lab_utils.core import files
from lab_utils.core.models import DECODER_ONLY
from lab_utils.presentation import style


# --------------------------------------------------------------------------- figures
def _save(fig, name: str):
    return files.save_figure(fig, files.figs_dir() / name, close=False)


def plot_perplexity(df: pd.DataFrame, model_label: str):
    """Perplexity vs requested sparsity, one line per method (unstructured) and
    one marker per N:M pattern; the dense model as a dashed line.
    Written to ``figs/perplexity_vs_sparsity_<model>.png``."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    d = df[df.model == model_label]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    dense = d[d.method == "dense"].perplexity
    for method, g in sorted(d[d.method != "dense"].groupby("method"), key=lambda x: x[0]):
        u = g[g.pattern == "unstructured"].sort_values("requested")
        if len(u):
            ax.plot(u.requested, u.perplexity, label=method, **style.line_style(method))
        for pattern, p in sorted(g[g.pattern != "unstructured"].groupby("pattern"), key=lambda x: x[0]):
            ax.plot(p.requested, p.perplexity, markersize=8, zorder=3, label=f"{method} {pattern}",
                    **{**style.line_style(method, pattern), "ls": ""})
    if len(dense):
        ax.axhline(float(dense.iloc[0]), ls="--", color=style.method_color("dense"), lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("requested sparsity of the prunable layers")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{model_label}: perplexity vs sparsity")
    ax.legend(fontsize=8, ncol=2)
    path = _save(fig, f"perplexity_vs_sparsity_{model_label}.png")
    plt.close(fig)
    return path


def plot_owl_heatmap(layers: pd.DataFrame, model_label: str, method: str, sparsity: float):
    """Per-layer sparsity under OWL (component x block heatmap) above the
    per-block mean under both allocations. Written to
    ``figs/owl_layer_sparsity_<model>_<method>_<sparsity>.png``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    owl = layers[layers.allocation == "OWL"].copy()
    owl["where"] = owl.side.str[:3] + "." + owl.component
    grid = owl.pivot_table(index="where", columns="block", values="sparsity", aggfunc="mean")
    per_block = (layers.assign(w=layers.sparsity * layers.numel)
                 .groupby(["allocation", "side", "block"])[["w", "numel"]].sum())
    per_block = (per_block.w / per_block.numel).rename("sparsity").reset_index()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), height_ratios=[1, 1.6])
    for (alloc, side), g in sorted(per_block.groupby(["allocation", "side"]), key=lambda x: x[0]):
        look = style.line_style(f"{method} OWL" if alloc == "OWL" else method)
        if alloc != "OWL":  # uniform: the method's own look, hollow, so the OWL line stands out
            look.update(fillstyle="none", ls="--")
        top.plot(g.block, g.sparsity, markersize=4, label=f"{alloc} ({side})", **look)
    top.set_ylabel("block sparsity")
    top.set_title(f"{model_label}, {method} at {sparsity:.0%}: uniform vs OWL allocation")
    top.legend(fontsize=8)
    sns.heatmap(grid, ax=bottom, cmap="viridis", cbar_kws={"label": "layer sparsity (OWL)"})
    bottom.set_xlabel("block")
    bottom.set_ylabel("")
    path = _save(fig, f"owl_layer_sparsity_{model_label}_{method}_{round(sparsity * 100)}%.png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- prose
def conclusions(df: pd.DataFrame, owl_summary: pd.DataFrame | None = None) -> str:
    """A paragraph of conclusions, every number and every comparison word taken
    from the sweep table (and the OWL comparison)."""
    parts = []
    pruned = df[df.method != "dense"]
    unstructured = pruned[pruned.pattern == "unstructured"]
    if len(unstructured):
        worst = (unstructured.actual - unstructured.requested).abs().max()
        parts.append(f"Across {len(pruned)} pruned configurations the actual sparsity of the "
                     f"prunable layers was within {worst * 100:.2f} percentage points of the request "
                     f"(unstructured)")
    nm = pruned[pruned.pattern != "unstructured"]
    if len(nm):
        ok = int(nm.nm_ok.fillna(False).astype(bool).sum())
        parts[-1:] = [(parts[-1] + "; " if parts else "") +
                      f"{ok} of {len(nm)} N:M runs passed the pattern check"]
    if parts:
        parts[-1] += "."
    for model, d in df[df.family == DECODER_ONLY].groupby("model"):
        dense = d[d.method == "dense"].perplexity
        u = d[(d.method != "dense") & (d.pattern == "unstructured")]
        if not len(dense) or not len(u):
            continue
        dense = float(dense.iloc[0])
        s_top = u.requested.max()
        at = u[u.requested == s_top].sort_values("perplexity")
        best, worst = at.iloc[0], at.iloc[-1]
        sentence = (f"On {model} (dense perplexity {dense:.1f}), at {s_top:.0%} sparsity {best.method} "
                    f"kept the lowest perplexity ({best.perplexity:.1f}, {best.perplexity / dense:.1f}x "
                    f"dense)")
        if worst.method != best.method:
            sentence += (f" and {worst.method} the highest ({worst.perplexity:.1f}, "
                         f"{worst.perplexity / best.perplexity:.1f}x {best.method})")
        parts.append(sentence + ".")
        tol = u.assign(ok=u.perplexity <= 1.5 * dense).groupby("method")
        reach = {m: g[g.ok].requested.max() for m, g in tol}
        reach = {m: v for m, v in reach.items() if not math.isnan(v)}
        if reach:
            top = max(reach.values())
            leaders = sorted(m for m, v in reach.items() if v == top)
            parts.append(f"Staying within 1.5x of the dense perplexity, {' and '.join(leaders)} "
                         f"reached {top:.0%} sparsity"
                         + (f", while {', '.join(f'{m} {v:.0%}' for m, v in sorted(reach.items()) if v < top)}"
                            if any(v < top for v in reach.values()) else "") + ".")
    if len(pruned):
        secs = pruned.groupby("method").seconds.median().sort_values()
        threads = {m: sorted({int(t) for t in g if t == t and t > 0})
                   for m, g in pruned.groupby("method").threads} if "threads" in pruned else {}

        def on(m):  # the thread count, where the method's pruning ran on one
            t = threads.get(m, [])
            return f" on {t[0]} thread{'s' if t[0] > 1 else ''}" if len(t) == 1 else ""

        parts.append("Median pruning time per configuration: "
                     + ", ".join(f"{m} {s:.1f} s{on(m)}" for m, s in secs.items()) + ".")
    if owl_summary is not None and len(owl_summary) == 2 and owl_summary.perplexity.notna().all():
        uni = owl_summary.set_index("allocation").loc["uniform"]
        owl = owl_summary.set_index("allocation").loc["OWL"]
        verb = "lowered" if owl.perplexity < uni.perplexity else "raised"
        parts.append(f"OWL's non-uniform allocation ({owl.method}, {owl.requested:.0%} on average, "
                     f"actual {owl.actual:.1%}) {verb} the perplexity of {owl.model} from "
                     f"{uni.perplexity:.1f} to {owl.perplexity:.1f}.")
    return " ".join(parts)
