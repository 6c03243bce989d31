"""Figures, tables and generated sentences for the CPU speed experiments."""

from __future__ import annotations

import math
import os

import pandas as pd

from lab_utils.experiments.speed import crossover

REGIMES = ("prefill", "decode")


def _regimes(layers: pd.DataFrame) -> list[str]:
    """The regimes a layer table holds, prefill first (a table without the column is prefill)."""
    if "regime" not in layers:
        return ["prefill"]
    return [r for r in REGIMES if r in set(layers.regime)]


def _of(layers: pd.DataFrame, regime: str) -> pd.DataFrame:
    return layers[layers.regime == regime] if "regime" in layers else layers


def speedup_figure(speed: pd.DataFrame, title: str = "CSR over dense, per layer shape"):
    """Speed-up (dense time / CSR time) vs sparsity, one line per shape, one panel per
    regime on a shared axis (prefill: a prompt's many tokens; decode: one token)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    regimes = _regimes(speed)
    fig, axes = plt.subplots(1, len(regimes), sharey=True, squeeze=False, figsize=(5 * len(regimes), 4))
    lo, hi = min(speed.speedup.min(), 1.0), max(speed.speedup.max(), 1.0)
    ticks = [t for t in (0.1, 0.2, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 8, 16) if lo / 1.3 <= t <= hi * 1.3]
    for ax, regime in zip(axes[0], regimes, strict=True):
        t_regime = _of(speed, regime)
        for shape, t in t_regime.groupby("shape", sort=False):
            t = t.sort_values("sparsity")
            ax.plot(t.sparsity, t.speedup, marker="o", label=shape)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        tokens = int(t_regime.tokens.iloc[0])
        ax.set(xlabel="sparsity", yscale="log", title=f"{regime}: {tokens} token{'s' * (tokens > 1)} per call")
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    axes[0][0].set_ylabel("speed-up of CSR over dense (log scale)")
    axes[0][-1].legend(title="out x in", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def regimes_table(layers: pd.DataFrame) -> pd.DataFrame:
    """One row per layer shape: its crossover sparsity in each regime, then the CSR speed-ups
    measured in each (``decode@0.7``: one token at 70% sparsity)."""
    cross = crossover(layers)
    if "regime" not in cross:
        cross = cross.assign(regime="prefill")
    out = cross.pivot_table(index="shape", columns="regime", values="crossover_sparsity", sort=False, dropna=False)
    out = out[[r for r in REGIMES if r in out]].add_prefix("crossover_")
    for regime in _regimes(layers):
        sp = _of(layers, regime).pivot_table(index="shape", columns="sparsity", values="speedup", sort=False)
        out = out.join(sp.rename(columns=lambda s, r=regime: f"{r}@{s:g}"))
    return out.reset_index()


def _crossover_clause(layers: pd.DataFrame, regime: str) -> str:
    """'CSR beats the dense matmul for 3 of 4 layer shapes from 84–88% sparsity up (never for 576x576 up to
    95%)', from the regime's rows."""
    cross = crossover(_of(layers, regime).drop(columns="regime", errors="ignore"))
    wins = cross.dropna(subset=["crossover_sparsity"])
    never = cross[cross.crossover_sparsity.isna()]["shape"].tolist()
    top = layers.sparsity.max()
    if not len(wins):
        return f"CSR never beats the dense matmul for any measured shape, up to {top:.0%} sparsity"
    c = wins.crossover_sparsity
    return (f"CSR beats the dense matmul for {len(wins)} of {len(cross)} layer shapes from "
            + (f"{c.min():.0%}" if c.min() == c.max() else f"{c.min():.0%}–{c.max():.0%}")
            + " sparsity up" + (f" (never for {', '.join(never)} up to {top:.0%})" if never else ""))


def _plan(r) -> str:
    if getattr(r, "fell_back", False):
        return f"its CSR plan ran at {r.checked_speedup:.2f}x dense in a first timing, so it falls back to dense"
    if r.csr_layers == 0:
        return "no layer is worth converting"
    return f"{r.csr_layers} of {r.layers} layers in CSR"


def speed_conclusions(layers: pd.DataFrame, forward: pd.DataFrame | None = None,
                      generation: pd.DataFrame | None = None) -> str:
    """What sparsity buys in each regime, one sentence each: on a prompt, where CSR beats the
    dense matmul and what the whole forward gains against the multiply-add limit; generating,
    where CSR wins at one token and what greedy generation gains against the byte limits, and
    how close dense generation comes to the streaming rate measured in the same run."""
    text = []
    if "prefill" in _regimes(layers):
        tokens = int(_of(layers, "prefill").tokens.iloc[0])
        runs = [f"the whole {r.label} forward at {r.sparsity:.0%} runs at {r.sparse_aware_speedup:.2f}x dense "
                f"({_plan(r)}) against a multiply-add limit of {r.flop_limit:.2f}x"
                for r in (forward.itertuples() if forward is not None else ())]
        text.append(f"**Prefill** ({tokens}-token inputs, compute-bound): {_crossover_clause(layers, 'prefill')}"
                    + (f"; {'; '.join(runs)}." if runs else "."))
    if "decode" in _regimes(layers):
        gen = generation[generation.format == "csr"] if generation is not None and len(generation) else None
        sentence = (f"**Generation** (one token per call, weights streamed from memory): "
                    f"{_crossover_clause(layers, 'decode')}")
        if gen is not None:
            limits = generation.pivot_table(index="sparsity", columns="format", values="byte_limit")
            runs = [f"{r.speedup:.2f}x at {r.sparsity:.0%} ({_plan(r)}; byte limit {r.byte_limit:.2f}x in CSR, "
                    f"{limits.loc[r.sparsity].get('bitmask', math.nan):.2f}x as a bitmask, "
                    f"{r.run_byte_limit:.2f}x for the model as run)" for r in gen.itertuples()]
            r0 = gen.iloc[0]
            sentence += (f"; greedy generation of {r0.label} runs at {', '.join(runs)} dense tokens/s, dense "
                         f"generation reading its weights at {r0.dense_of_stream:.0%} of the {r0.stream_gb_s:.1f} "
                         f"GB/s this machine streams")
        text.append(sentence + ".")
    return " ".join(text)


def _from(layers: pd.DataFrame, regime: str) -> str:
    c = crossover(_of(layers, regime).drop(columns="regime", errors="ignore")).crossover_sparsity.dropna()
    return f"from {c.min():.0%} sparsity" if len(c) else f"at no sparsity up to {layers.sparsity.max():.0%}"


def speed_headline(layers: pd.DataFrame, generation: pd.DataFrame | None = None) -> str | None:
    """The write-up's short answer on speed: from which sparsity CSR beats the dense matmul for
    some layer in each regime, and greedy generation's tokens/s ratios beside their byte limits."""
    regimes = _regimes(layers)
    if not len(layers):
        return None
    where = " and ".join(f"{_from(layers, r)} {'on a prompt' if r == 'prefill' else 'generating one token at a time'}"
                         for r in regimes)
    text = f"Per layer, CSR beats the dense matmul {where}"
    gen = generation[generation.format == "csr"] if generation is not None and len(generation) else None
    if gen is not None and len(gen):
        text += (f"; greedy generation runs at {', '.join(f'{r.speedup:.2f}x' for r in gen.itertuples())} dense "
                 f"tokens/s at {', '.join(f'{r.sparsity:.0%}' for r in gen.itertuples())} (byte limits in CSR "
                 f"{', '.join(f'{r.byte_limit:.2f}x' for r in gen.itertuples())})")
    return text + "."


def _span(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def timing_conditions(layers: pd.DataFrame) -> str:
    """How the layer timings were taken (one line under the table)."""
    how = []
    for regime in _regimes(layers):
        t = _of(layers, regime)
        if regime == "decode" and "dense_copies" in t:
            how.append(f"on one input row cycling through {_span(t.dense_copies)} dense and {_span(t.csr_copies)} "
                       f"CSR copies of each weight (decode)")
        else:
            how.append(f"on {int(t.tokens.iloc[0])} input rows ({regime})")
    return (f"Dense and CSR timed in turns {' and '.join(how)}, {int(layers.threads.iloc[0])} threads, medians; "
            f"load average {layers.load_avg.min():.1f} to {layers.load_avg.max():.1f} on {os.cpu_count()} cores, "
            f"so single ratios can be off by tens of percent.")
