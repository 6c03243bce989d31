"""Figures and generated sentences for the sparse file sizes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lab_utils.core import files
from lab_utils.core.formats import parse_format
from lab_utils.experiments.file_sizes import best_formats


# --------------------------------------------------------------------------- figures
def save_figure(fig, name: str) -> Path:
    """Save under figs/ atomically, with no timestamp: same data, same bytes."""
    return files.save_figure(fig, files.figs_dir() / name)


def size_figure(sizes: pd.DataFrame, label: str, method: str):
    """Two panels for one model and method: file size vs sparsity per format
    (the floor drawn for the whole file: floor of the prunable weights plus
    the rest as stored), and bits per prunable weight vs sparsity."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    t = sizes[(sizes.label == label) & (sizes.method == method)].sort_values("sparsity")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for fmt, g in t.groupby("format", sort=False):
        style = "--" if "zstd" in fmt else "-"
        ax1.plot(g.sparsity, g.file_bytes / 2**20, style, marker=".", label=fmt)
        ax2.plot(g.sparsity, g.bits_per_weight, style, marker=".", label=fmt)
    native = t[t.format == "dense"]
    floor_file = native.floor_bytes + native.other_bytes + native.header_bytes
    ax1.plot(native.sparsity, floor_file / 2**20, "k:", lw=2.5, label="floor (fp32 values)")
    ax2.plot(native.sparsity, 8 * native.floor_bytes / native.prunable_numel, "k:", lw=2.5,
             label="floor (fp32 values)")
    int8 = t[t.precision == "int8"]
    int8 = int8[int8.format == int8.format.iloc[0]] if len(int8) else int8
    if len(int8):
        ax2.plot(int8.sparsity, 8 * int8.floor_bytes / int8.prunable_numel, color="grey", ls=":", lw=2,
                 label="floor (int8 values)")
    ax1.set(xlabel="sparsity", ylabel="file size (MiB)", title=f"{label}: file size on disk ({method})")
    ax2.set(xlabel="sparsity", ylabel="bits per prunable weight", yscale="log",
            title="bits per prunable weight")
    ax2.legend(fontsize=7, ncol=2, loc="lower left")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- conclusions
def _ranges(points: list[tuple[float, str]]) -> list[tuple[str, float, float]]:
    """Consecutive runs of the same label: [(label, first x, last x)]."""
    runs: list[list] = []
    for x, label in points:
        if runs and runs[-1][0] == label:
            runs[-1][2] = x
        else:
            runs.append([label, x, x])
    return [tuple(r) for r in runs]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def size_conclusions(sizes: pd.DataFrame, low: float = 0.5, high: float = 0.95,
                     target: float = 1.05) -> str:
    """Generated prose for the size table: which lossless format wins where,
    how much smaller than dense it is at the highest sparsities, and how close
    the best one comes to the floor between ``low`` and ``high`` sparsity."""
    out = []
    best = best_formats(sizes)
    plain = best_formats(sizes[~sizes.zstd]) if (~sizes.zstd).any() else None
    for (label, method), b in best.groupby(["label", "method"], sort=False):
        b = b.sort_values("sparsity")
        runs = ", ".join(f"**{f}** from {_pct(a)} to {_pct(z)}" if a != z else f"**{f}** at {_pct(a)}"
                         for f, a, z in _ranges(list(zip(b.sparsity, b.format, strict=True))))
        text = [f"**{label}** ({method}): the smallest lossless file is {runs}."]
        t = sizes[(sizes.label == label) & (sizes.method == method)]
        top = b.sparsity.max()
        at = t[t.sparsity == top].set_index("format")
        if "dense" in at.index:
            winner = b[b.sparsity == top].format.item()
            smallest = at.file_bytes.idxmin()
            text.append(f"At {_pct(top)} sparsity the dense fp32 file still takes "
                        f"{at.loc['dense', 'file_bytes'] / 2**20:.1f} MiB (every zero is stored); "
                        f"{winner} takes {at.loc[winner, 'file_bytes'] / 2**20:.1f} MiB "
                        f"({at.loc['dense', 'file_bytes'] / at.loc[winner, 'file_bytes']:.1f}x smaller)"
                        + (f", and {smallest}, composing sparsity with int8, "
                           f"{at.loc[smallest, 'file_bytes'] / 2**20:.1f} MiB "
                           f"({at.loc['dense', 'file_bytes'] / at.loc[smallest, 'file_bytes']:.1f}x)"
                           if smallest != winner else "") + ".")
        mid = b[(b.sparsity >= low) & (b.sparsity <= high)]
        if len(mid):
            lo, hi = mid.floor_ratio.min(), mid.floor_ratio.max()
            verdict = (f"at most {target:.2f}x the floor at every one of them" if hi <= target
                       else f"above {target:.2f}x the floor at "
                            + ", ".join(_pct(s) for s in mid[mid.floor_ratio > target].sparsity))
            text.append(f"Between {_pct(low)} and {_pct(high)} sparsity its prunable weights take "
                        f"{lo:.2f}x to {hi:.2f}x the floor of (1-s)*32 + H(s) bits per weight: {verdict}.")
            if lo < 1:
                ve = mid.value_entropy_floor_ratio
                text.append("Going below that floor is no paradox: it counts 32 bits per kept value, "
                            "while trained weights use few distinct exponents. Against a floor that "
                            "uses the measured entropy of the sign and exponent bits (mantissas counted "
                            f"as incompressible) the best format is at {ve.min():.2f}x to {ve.max():.2f}x"
                            + ("; below even that, so the mantissa bits are not random either (weights "
                               "that came from a lower precision, such as fp16 or 4-bit blocks, keep some "
                               "of them constant)." if ve.min() < 1 else "."))
        if plain is not None:
            p = plain[(plain.label == label) & (plain.method == method)]
            p = p[(p.sparsity >= low) & (p.sparsity <= high)]
            if len(p):
                text.append(f"Without entropy coding the best is "
                            f"{' / '.join(dict.fromkeys(p.format))}, at {p.floor_ratio.min():.2f}x to "
                            f"{p.floor_ratio.max():.2f}x the floor: a fixed bit per weight of mask costs "
                            f"more than H(s) once s moves away from 50%.")
        out.append(" ".join(text))
    return "\n\n".join(out)


def round_trip_conclusion(rt: pd.DataFrame, label: str, sparsity: float) -> str:
    """One generated sentence on a :func:`round_trip` table."""
    lossless = rt[rt.format.map(lambda f: parse_format(f).lossless)]
    lossy = rt[~rt.index.isin(lossless.index)]
    ok = lossless[lossless.weights_as_expected & lossless.outputs_identical]
    text = (f"Round trip ({label}, {sparsity:.0%} sparsity): {len(ok)} of {len(lossless)} lossless formats "
            f"({', '.join(lossless.format)}) gave back bit-identical weights and identical outputs")
    bad = lossless[~lossless.index.isin(ok.index)]
    if len(bad):
        text += f"; {', '.join(bad.format)} did not (largest output difference {bad.max_abs_output_diff.max():.3g})"
    if len(lossy):
        text += (f". The lossy ones ({', '.join(lossy.format)}) gave back exactly the rounded weights "
                 if lossy.weights_as_expected.all() else
                 f". The lossy ones ({', '.join(lossy.format)}) did not all give back the rounded weights ")
        text += f"and outputs within {lossy.max_abs_output_diff.max():.3g} of the original"
    return text + "."
