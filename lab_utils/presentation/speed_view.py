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


def _pct_span(values: pd.Series) -> str:
    lo, hi = values.min(), values.max()
    return f"{lo:.0%}" if f"{lo:.0%}" == f"{hi:.0%}" else f"{lo:.0%}–{hi:.0%}"


def _crossovers(layers: pd.DataFrame, regime: str) -> tuple[pd.DataFrame, pd.Series]:
    """The regime's crossover per shape and, per shape, whether CSR already wins at the lowest
    sparsity timed: there the crossover is only known to lie at or below that sparsity."""
    t = _of(layers, regime).drop(columns="regime", errors="ignore")
    cross = crossover(t)
    lowest = t.groupby("shape").sparsity.min()
    already = cross.crossover_sparsity.le(cross["shape"].map(lowest))  # False where it never wins
    return cross, already


def _crossover_clause(layers: pd.DataFrame, regime: str) -> str:
    """'CSR beats the dense matmul for 3 of 4 layer shapes from 84–88% sparsity up (never for 576x576 up to
    95%)', or '... for 7 of 7 layer shapes: 5 already at 50%, the lowest sparsity timed, 2 from 54–65% up',
    from the regime's rows."""
    cross, already = _crossovers(layers, regime)
    wins = cross.dropna(subset=["crossover_sparsity"])
    never = cross[cross.crossover_sparsity.isna()]["shape"].tolist()
    top, low = _of(layers, regime).sparsity.max(), _of(layers, regime).sparsity.min()
    if not len(wins):
        return f"CSR never beats the dense matmul for any measured shape, up to {top:.0%} sparsity"
    later = cross[~already].crossover_sparsity.dropna()
    if not already.any():
        where = f" from {_pct_span(later)} sparsity up"
    elif not len(later):
        where = f" at every sparsity timed, from {low:.0%}"
    else:
        where = (f": {int(already.sum())} already at {low:.0%}, the lowest sparsity timed, "
                 f"{len(later)} from {_pct_span(later)} up")
    return (f"CSR beats the dense matmul for {len(wins)} of {len(cross)} layer shapes{where}"
            + (f" (never for {', '.join(never)} up to {top:.0%})" if never else ""))


def _plan(r) -> str:
    if getattr(r, "fell_back", False):
        return f"its CSR plan ran at {r.checked_speedup:.2f}x dense in a first timing, so it falls back to dense"
    if r.csr_layers == 0:
        return "no layer is worth converting"
    return f"{r.csr_layers} of {r.layers} layers in CSR"


def _generation_run(r, bitmask_limit: float) -> str:
    """'1.33x at 70% (210 of 210 layers in CSR; 91% of the 1.46x byte limit of the model as run,
    1.76x in CSR with the smallest indices, 2.12x as a bitmask)'. The model as run holds torch's
    int32 indices and only the layers its plan converts: its limit is the one the kernel could
    reach, the others what a format alone allows."""
    limits = f"{r.byte_limit:.2f}x in CSR with the smallest indices, {bitmask_limit:.2f}x as a bitmask"
    if r.csr_layers == 0:
        return f"{r.speedup:.2f}x at {r.sparsity:.0%} ({_plan(r)}; byte limit {limits})"
    return (f"{r.speedup:.2f}x at {r.sparsity:.0%} ({_plan(r)}; {r.speedup / r.run_byte_limit:.0%} of the "
            f"{r.run_byte_limit:.2f}x byte limit of the model as run, {limits})")


def speed_conclusions(layers: pd.DataFrame, forward: pd.DataFrame | None = None,
                      generation: pd.DataFrame | None = None) -> str:
    """What sparsity buys in each regime, one sentence each: on a prompt, where CSR beats the
    dense matmul and what the whole forward gains against the multiply-add limit; generating,
    where CSR wins at one token, how fast the dense kernel reads its weights there, and what
    greedy generation gains against the byte limits (the distance as a ratio), and how close
    dense generation comes to the streaming rate measured in the same run."""
    text = []
    if "prefill" in _regimes(layers):
        tokens = int(_of(layers, "prefill").tokens.iloc[0])
        runs = [f"the whole {r.label} forward at {r.sparsity:.0%} runs at {r.sparse_aware_speedup:.2f}x dense "
                f"({_plan(r)}) against a multiply-add limit of {r.flop_limit:.2f}x"
                for r in (forward.itertuples() if forward is not None else ())]
        text.append(f"**Prefill** ({tokens}-token inputs, compute-bound): {_crossover_clause(layers, 'prefill')}"
                    + (f"; {'; '.join(runs)}." if runs else "."))
    if "decode" in _regimes(layers):
        decode = _of(layers, "decode")
        gen = generation[generation.format == "csr"] if generation is not None and len(generation) else None
        sentence = (f"**Generation** (one token per call, weights streamed from memory): "
                    f"{_crossover_clause(layers, 'decode')}")
        rate = ""
        if "dense_gb_s" in decode:
            per_shape = decode.groupby("shape").dense_gb_s.median()
            lo, hi = round(per_shape.min()), round(per_shape.max())
            rate = f"{lo} GB/s" if lo == hi else f"{lo}–{hi} GB/s"
        if gen is not None:
            limits = generation.pivot_table(index="sparsity", columns="format", values="byte_limit")
            runs = [_generation_run(r, limits.loc[r.sparsity].get("bitmask", math.nan)) for r in gen.itertuples()]
            r0 = gen.iloc[0]
            sentence += (f"; greedy generation of {r0.label}, in tokens/s over dense, runs at {' and '.join(runs)}; "
                         + (f"dense one-token products read their weights at {rate} and " if rate else "")
                         + f"dense generation at {r0.dense_of_stream:.0%} of the {r0.stream_gb_s:.1f} GB/s this "
                           f"machine streams")
        elif rate:
            sentence += f", dense one-token products reading their weights at {rate}"
        text.append(sentence + ".")
    return " ".join(text)


def _from(layers: pd.DataFrame, regime: str) -> str:
    """'from 77–84% sparsity', 'from 50% or below (5 of 7 shapes) to 65%', 'at every sparsity timed, from 50%'."""
    cross, already = _crossovers(layers, regime)
    c, low = cross.crossover_sparsity, _of(layers, regime).sparsity.min()
    if not c.notna().any():
        return f"at no sparsity up to {layers.sparsity.max():.0%}"
    later = c[~already].dropna()
    if not already.any():
        return f"from {_pct_span(later)} sparsity"
    if not len(later):
        return f"at every sparsity timed, from {low:.0%}"
    return f"from {low:.0%} or below ({int(already.sum())} of {len(cross)} shapes) to {later.max():.0%}"


def speed_headline(layers: pd.DataFrame, generation: pd.DataFrame | None = None) -> str | None:
    """The write-up's short answer on speed: from which sparsity CSR beats the dense matmul for
    the layer shapes in each regime, and greedy generation's tokens/s ratios beside the byte
    limits of the models as run."""
    regimes = _regimes(layers)
    if not len(layers):
        return None
    where = " and ".join(f"{_from(layers, r)} {'on a prompt' if r == 'prefill' else 'generating one token at a time'}"
                         for r in regimes)
    text = f"Per layer, CSR beats the dense matmul {where}"
    gen = generation[generation.format == "csr"] if generation is not None and len(generation) else None
    if gen is not None and len(gen):
        text += (f"; greedy generation runs at {', '.join(f'{r.speedup:.2f}x' for r in gen.itertuples())} dense "
                 f"tokens/s at {', '.join(f'{r.sparsity:.0%}' for r in gen.itertuples())} (byte limits as run "
                 f"{', '.join(f'{r.run_byte_limit:.2f}x' for r in gen.itertuples())})")
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
    censored = [r for r in _regimes(layers) if _crossovers(layers, r)[1].any()]
    low = layers.sparsity.min()
    return (f"Dense and CSR timed in turns {' and '.join(how)}, {int(layers.threads.iloc[0])} threads, medians; "
            f"load average {layers.load_avg.min():.1f} to {layers.load_avg.max():.1f} on {os.cpu_count()} cores, "
            f"so single ratios can be off by tens of percent."
            + (f" A crossover of {low:.0%}, the lowest sparsity timed, means CSR already wins there: the "
               f"crossover is at or below it." if censored else ""))
