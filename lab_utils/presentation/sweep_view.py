"""Figures and generated sentences for the sparsity sweep."""

from __future__ import annotations

import math

import pandas as pd

from lab_utils.core import files
from lab_utils.core.models import DECODER_ONLY
from lab_utils.presentation import style


# --------------------------------------------------------------------------- figures
def plot_perplexity(df: pd.DataFrame, model_label: str, protocol: str = "sweep"):
    """Perplexity (under ``protocol``, its label) vs requested sparsity, one line
    per method (unstructured) and one marker per N:M pattern; the dense model as
    a dashed line. Written to ``figs/perplexity_vs_sparsity_<model>.png``."""
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
    ax.set_ylabel(f"perplexity, {protocol} (log scale)")
    ax.set_title(f"{model_label}: perplexity vs sparsity")
    ax.legend(fontsize=8, ncol=2)
    return files.save_figure(fig, f"perplexity_vs_sparsity_{model_label}.png")


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
    return files.save_figure(fig, f"owl_layer_sparsity_{model_label}_{method}_{round(sparsity * 100)}%.png")


# --------------------------------------------------------------------------- prose
def setting_name(method: str, pattern: str, requested: float) -> str:
    """'dense', 'wanda 50%' or 'sparsegpt 2:4': one name per setting in every table."""
    if method == "dense":
        return "dense"
    return f"{method} {pattern}" if pattern not in ("unstructured", "-") else f"{method} {requested:.0%}"


def conclusions(df: pd.DataFrame, owl_summary: pd.DataFrame | None = None, protocol: str = "sweep") -> str:
    """One or two sentences per decoder, every comparison word from the sweep
    table (and the OWL comparison); the numbers are in :func:`perplexity_table`
    and :func:`method_table`."""
    parts = []
    pruned = df[df.method != "dense"]
    unstructured = pruned[pruned.pattern == "unstructured"]
    if len(unstructured):
        worst = (unstructured.actual - unstructured.requested).abs().max()
        nm = pruned[pruned.pattern != "unstructured"]
        ok = int(nm.nm_ok.fillna(False).astype(bool).sum())
        parts.append(f"Every configuration reached its requested sparsity (within {worst * 100:.2f} points)"
                     + (f" and {ok} of {len(nm)} N:M runs passed the pattern check." if len(nm) else "."))
    for model, d in df[df.family == DECODER_ONLY].groupby("model"):
        dense = d[d.method == "dense"].perplexity
        u = d[(d.method != "dense") & (d.pattern == "unstructured")]
        if not len(dense) or not len(u):
            continue
        dense = float(dense.iloc[0])
        s_top = u.requested.max()
        best = u[u.requested == s_top].sort_values("perplexity").iloc[0]
        sentence = (f"On {model}, {best.method} kept the lowest perplexity ({protocol}) at {s_top:.0%} "
                    f"sparsity ({best.perplexity / dense:.1f}x dense)")
        reach = {m: g[g.perplexity <= 1.5 * dense].requested.max() for m, g in u.groupby("method")}
        reach = {m: v for m, v in reach.items() if not math.isnan(v)}
        if reach:
            top = max(reach.values())
            sentence += (f"; within 1.5x of the dense perplexity, {' and '.join(sorted(m for m, v in reach.items() if v == top))} "
                         f"reached {top:.0%}")
        parts.append(sentence + ".")
    if owl_summary is not None and len(owl_summary) == 2 and owl_summary.perplexity.notna().all():
        uni = owl_summary.set_index("allocation").loc["uniform"]
        owl = owl_summary.set_index("allocation").loc["OWL"]
        verb = "lowered" if owl.perplexity < uni.perplexity else "raised"
        parts.append(f"OWL's non-uniform allocation {verb} the perplexity ({protocol}) of {owl.model} at "
                     f"{owl.requested:.0%} ({owl.method}).")
    return " ".join(parts)


def perplexity_table(df: pd.DataFrame, protocol: str = "sweep") -> pd.DataFrame:
    """The decoders' rows: model, setting, perplexity under ``protocol`` (named in
    the column) and the ratio to dense."""
    d = df[df.family == DECODER_ONLY]
    col = f"perplexity ({protocol})"
    return pd.DataFrame({"model": d.model, "setting": [setting_name(m, p, r) for m, p, r in
                                                       zip(d.method, d.pattern, d.requested, strict=True)],
                         col: d.perplexity, "x dense": d.ppl_vs_dense if "ppl_vs_dense" in d else math.nan,
                         "actual sparsity": d.actual}).reset_index(drop=True)


def method_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: configurations, the largest gap between requested and actual
    sparsity (unstructured), N:M checks passed, median pruning seconds and threads."""
    pruned = df[df.method != "dense"]
    rows = []
    for method, g in pruned.groupby("method", sort=False):
        u, nm = g[g.pattern == "unstructured"], g[g.pattern != "unstructured"]
        threads = sorted({int(t) for t in g.threads if t == t and t > 0}) if "threads" in g else []
        rows.append({"method": method, "configurations": len(g),
                     "largest |actual - requested|": (u.actual - u.requested).abs().max() if len(u) else math.nan,
                     "N:M checks passed": f"{int(nm.nm_ok.fillna(False).astype(bool).sum())} of {len(nm)}"
                     if len(nm) else "",
                     "median seconds": g.seconds.median(), "threads": "/".join(map(str, threads))})
    return pd.DataFrame(rows)


def save_tables(df: pd.DataFrame, owl_summary: pd.DataFrame | None = None, protocol: str = "sweep") -> list:
    """Write the sweep (``results/sweep.csv``) and the OWL comparison
    (``results/owl.csv``) for the write-up, each row with its perplexity's
    protocol label."""
    paths = [files.write_csv(df.assign(protocol=protocol), "sweep.csv")]
    if owl_summary is not None:
        paths.append(files.write_csv(owl_summary.assign(protocol=protocol), "owl.csv"))
    return paths
