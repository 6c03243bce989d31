"""Figures and generated sentences for the CPU speed experiments."""

from __future__ import annotations

import os

import pandas as pd

from lab_utils.experiments.speed import crossover


def speedup_figure(speed: pd.DataFrame, title: str = "CSR over dense, per layer shape"):
    """Speed-up (dense time / CSR time) vs sparsity, one line per shape."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots()
    for shape, t in speed.groupby("shape", sort=False):
        t = t.sort_values("sparsity")
        ax.plot(t.sparsity, t.speedup, marker="o", label=shape)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set(xlabel="sparsity", ylabel="speed-up of CSR over dense (log scale)", yscale="log", title=title)
    lo, hi = min(speed.speedup.min(), 1.0), max(speed.speedup.max(), 1.0)
    ticks = [t for t in (0.1, 0.2, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 8, 16) if lo / 1.3 <= t <= hi * 1.3]
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.legend(title="out x in", fontsize=8)
    fig.tight_layout()
    return fig


def speed_conclusions(layers: pd.DataFrame, forward: pd.DataFrame | None = None) -> str:
    """Generated prose: the crossover per shape, the speed-ups at 90% and 95%
    (where measured), and the whole-forward ratios next to the FLOP limit."""
    cross = crossover(layers)
    text = []
    wins = cross.dropna(subset=["crossover_sparsity"])
    never = cross[cross.crossover_sparsity.isna()]["shape"].tolist()
    top = layers.sparsity.max()
    if len(wins):
        text.append("CSR beats the dense matmul above " + ", ".join(
            f"{c:.0%} sparsity for {sh}" for sh, c in zip(wins["shape"], wins.crossover_sparsity, strict=True))
            + (f"; it never does for {', '.join(never)} up to {top:.0%}" if never else "") + ".")
    else:
        text.append(f"CSR never beats the dense matmul for any measured shape, up to {top:.0%} sparsity.")
    for sp in (0.9, 0.95):
        col = f"speedup@{sp:g}"
        if col in cross:
            text.append(f"At {sp:.0%} the CSR speed-up is " + ", ".join(
                f"{v:.2f}x for {sh}" for sh, v in zip(cross["shape"], cross[col], strict=True)) + ".")
    text.append(f"(Dense and CSR are timed in turns on {int(layers.tokens.iloc[0])} input rows with "
                f"{int(layers.threads.iloc[0])} threads, medians; the load average was "
                f"{layers.load_avg.min():.1f} to {layers.load_avg.max():.1f} on {os.cpu_count()} cores, so "
                "single ratios can be off by tens of percent.)")
    if forward is not None and len(forward):
        for r in forward.itertuples():
            if getattr(r, "fell_back", False):
                how = (f"its CSR plan ran at {r.checked_speedup:.2f}x dense in a first timing, so it falls back "
                       "to the dense model")
            elif r.sparse_aware_is_dense:
                how = "no layer is worth converting, so it is the dense model"
            else:
                how = f"{r.csr_layers} of {r.layers} layers in CSR"
            line = (f"Whole {r.label} forward on {r.tokens} tokens at {r.sparsity:.0%}: the sparse-aware model "
                    f"runs at {r.sparse_aware_speedup:.2f}x dense ({how})")
            if hasattr(r, "all_csr_speedup") and not pd.isna(r.all_csr_speedup):
                line += f", every layer in CSR at {r.all_csr_speedup:.2f}x"
            line += (f"; counting multiply-adds allows {r.flop_limit:.2f}x at most, since the layers "
                     f"left dense (the output head above all) are {r.unprunable_share:.0%} of the dense work.")
            text.append(line)
    return " ".join(text)
