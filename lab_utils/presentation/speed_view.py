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
    """Where CSR beats the dense matmul and what the whole forward gains, next to
    the multiply-add limit (the numbers: :func:`timing_conditions`, the crossover
    table and ``speed_forward.csv``)."""
    cross = crossover(layers)
    wins = cross.dropna(subset=["crossover_sparsity"])
    never = cross[cross.crossover_sparsity.isna()]["shape"].tolist()
    top = layers.sparsity.max()
    if len(wins):
        c = wins.crossover_sparsity
        text = [f"CSR beats the dense matmul for {len(wins)} of {len(cross)} layer shapes, from "
                + (f"{c.min():.0%}" if c.min() == c.max() else f"{c.min():.0%}–{c.max():.0%}")
                + " sparsity up" + (f" (never for {', '.join(never)} up to {top:.0%})" if never else "") + "."]
    else:
        text = [f"CSR never beats the dense matmul for any measured shape, up to {top:.0%} sparsity."]
    for r in (forward.itertuples() if forward is not None else ()):
        if getattr(r, "fell_back", False):
            how = f"its CSR plan ran at {r.checked_speedup:.2f}x dense in a first timing, so it falls back to dense"
        elif r.sparse_aware_is_dense:
            how = "no layer is worth converting"
        else:
            how = f"{r.csr_layers} of {r.layers} layers in CSR"
        text.append(f"The whole {r.label} forward at {r.sparsity:.0%} runs at {r.sparse_aware_speedup:.2f}x dense "
                    f"({how}), against a multiply-add limit of {r.flop_limit:.2f}x.")
    return " ".join(text)


def timing_conditions(layers: pd.DataFrame) -> str:
    """How the layer timings were taken (one line under the table)."""
    return (f"Dense and CSR timed in turns on {int(layers.tokens.iloc[0])} input rows, "
            f"{int(layers.threads.iloc[0])} threads, medians; load average {layers.load_avg.min():.1f} to "
            f"{layers.load_avg.max():.1f} on {os.cpu_count()} cores, so single ratios can be off by tens of percent.")
