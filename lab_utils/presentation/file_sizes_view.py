"""Figures and generated sentences for the sparse file sizes."""

from __future__ import annotations

import pandas as pd

from lab_utils.core.formats import parse_format
from lab_utils.experiments.file_sizes import best_formats
from lab_utils.presentation.text import pct


# --------------------------------------------------------------------------- figures
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


def size_conclusions(sizes: pd.DataFrame, low: float = 0.5, high: float = 0.95,
                     target: float = 1.05) -> str:
    """One sentence per model for the size table: which lossless format wins
    where, how much smaller than dense at the highest sparsity, and whether the
    best stays within ``target`` x the floor between ``low`` and ``high``
    sparsity (the numbers: :func:`size_summary`)."""
    out = []
    for r in size_summary(sizes, low, high).itertuples(index=False):
        text = f"**{r.model}** ({r.method}): the smallest lossless file is {r.smallest}"
        if r.x_smaller == r.x_smaller:
            text += f", {r.x_smaller:.1f}x smaller than the dense fp32 file at {r.top:.0%}"
        if r.floor_hi == r.floor_hi:
            text += (f", and within {target:.2f}x of the floor from {low:.0%} to {high:.0%}" if r.floor_hi <= target
                     else f", above {target:.2f}x the floor somewhere from {low:.0%} to {high:.0%}")
        out.append(text + ".")
    return " ".join(out)


def size_summary(sizes: pd.DataFrame, low: float = 0.5, high: float = 0.95) -> pd.DataFrame:
    """One row per (model, method): the smallest lossless format by sparsity range,
    at the highest sparsity the dense, best and smallest (lossy included) files in
    MiB and how many times smaller they are, and between ``low`` and ``high`` the
    best format's range of ratios to the floor, to the value-entropy floor, and the
    best uncompressed format's."""
    rows = []
    best = best_formats(sizes)
    plain = best_formats(sizes[~sizes.zstd]) if (~sizes.zstd).any() else None
    nan = float("nan")
    for (label, method), b in best.groupby(["label", "method"], sort=False):
        b = b.sort_values("sparsity")
        runs = ", ".join(f"**{f}** from {pct(a, 0)} to {pct(z, 0)}" if a != z else f"**{f}** at {pct(a, 0)}"
                         for f, a, z in _ranges(list(zip(b.sparsity, b.format, strict=True))))
        t = sizes[(sizes.label == label) & (sizes.method == method)]
        top = b.sparsity.max()
        at = t[t.sparsity == top].set_index("format")
        winner = b[b.sparsity == top].format.item()
        row = {"model": label, "method": method, "smallest": runs, "top": top, "dense MiB": nan, "best MiB": nan,
               "x_smaller": nan, "smallest lossy": "", "lossy MiB": nan, "lossy x smaller": nan,
               "floor_lo": nan, "floor_hi": nan, "entropy floor lo": nan, "entropy floor hi": nan,
               "best uncompressed": "", "uncompressed floor lo": nan, "uncompressed floor hi": nan}
        if "dense" in at.index:
            dense = at.loc["dense", "file_bytes"]
            row.update({"dense MiB": dense / 2**20, "best MiB": at.loc[winner, "file_bytes"] / 2**20,
                        "x_smaller": dense / at.loc[winner, "file_bytes"]})
            smallest = at.file_bytes.idxmin()
            if smallest != winner:
                row.update({"smallest lossy": smallest, "lossy MiB": at.loc[smallest, "file_bytes"] / 2**20,
                            "lossy x smaller": dense / at.loc[smallest, "file_bytes"]})
        mid = b[(b.sparsity >= low) & (b.sparsity <= high)]
        if len(mid):
            row.update({"floor_lo": mid.floor_ratio.min(), "floor_hi": mid.floor_ratio.max(),
                        "entropy floor lo": mid.value_entropy_floor_ratio.min(),
                        "entropy floor hi": mid.value_entropy_floor_ratio.max()})
        if plain is not None:
            p = plain[(plain.label == label) & (plain.method == method)]
            p = p[(p.sparsity >= low) & (p.sparsity <= high)]
            if len(p):
                row.update({"best uncompressed": " / ".join(dict.fromkeys(p.format)),
                            "uncompressed floor lo": p.floor_ratio.min(), "uncompressed floor hi": p.floor_ratio.max()})
        rows.append(row)
    return pd.DataFrame(rows)


def size_headline(sizes: pd.DataFrame) -> str | None:
    """The write-up's short answer on file sizes: the range, over models, of how many
    times smaller the smallest lossless file is than the dense one at the top sparsity."""
    x = size_summary(sizes).x_smaller.dropna()
    if not len(x):
        return None
    span = f"{x.min():.1f}x" + (f" to {x.max():.1f}x" if len(x) > 1 else "")
    return (f"Only in a sparse format: at the highest sparsity the smallest lossless file is {span} smaller "
            "than the dense one, which keeps every zero.")


def size_summary_table(sizes: pd.DataFrame, low: float = 0.5, high: float = 0.95) -> pd.DataFrame:
    """:func:`size_summary` as the write-up shows it: ranges as 'a–b', MiB to one decimal."""
    t = size_summary(sizes, low, high)

    def rng(a, b):
        return "" if a != a else (f"{a:.2f}x" if f"{a:.2f}" == f"{b:.2f}" else f"{a:.2f}x–{b:.2f}x")

    def mib(v, x):
        return "" if v != v else f"{v:.1f} ({x:.1f}x)"

    return pd.DataFrame({
        "model": t.model, "method": t.method,
        "at": [f"{v:.0%}" for v in t.top],
        "dense MiB": [f"{v:.1f}" if v == v else "" for v in t["dense MiB"]],
        "best lossless MiB (x smaller)": [mib(v, x) for v, x in zip(t["best MiB"], t.x_smaller, strict=True)],
        "smallest lossy MiB (x)": [f"{n}: {mib(v, x)}" if n else "" for n, v, x in
                                   zip(t["smallest lossy"], t["lossy MiB"], t["lossy x smaller"], strict=True)],
        f"x floor, {low:.0%}–{high:.0%}": [rng(a, b) for a, b in zip(t.floor_lo, t.floor_hi, strict=True)],
        "x value-entropy floor": [rng(a, b) for a, b in zip(t["entropy floor lo"], t["entropy floor hi"], strict=True)],
        "best uncompressed (x floor)": [f"{n} ({rng(a, b)})" if n else "" for n, a, b in
                                        zip(t["best uncompressed"], t["uncompressed floor lo"],
                                            t["uncompressed floor hi"], strict=True)]})


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
