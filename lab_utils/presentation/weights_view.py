"""Figures and sentences of weight distributions, drawn from the streamed
histograms of :class:`lab_utils.experiments.WeightStats` and the tables of
:mod:`lab_utils.experiments.weights`: nothing here touches a model, so drawing
GPT-2 medium costs what drawing MiniLM costs."""

from __future__ import annotations

import math
import re

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import seaborn as sns

from lab_utils.experiments import weights as st
from lab_utils.experiments.weight_stats import WeightStats
from lab_utils.experiments.weights import ALPHA, EXACT_N, FOUR_BIT_LEVELS, NEAR
from lab_utils.presentation import style
from lab_utils.presentation.text import human_bytes, pct

matplotlib.use("Agg")  # files, not windows; the notebook shows the saved file

DISPLAY_BINS = 241  # bars across the zoomed window (odd: zero is the centre of a bar)
SPIKE_RATIO = 5.0  # the zero bar is a spike when it is this many times its neighbours


# --------------------------------------------------------------------------- names and files
def sparsity_percent(sparsity: float) -> str:
    """0.5 -> '50', 0 -> '0', 0.625 -> '62.5' (an integer when whole)."""
    p = round(100 * float(sparsity), 6)
    return str(int(p)) if p == int(p) else f"{p:g}"


def figure_name(label: str, sparsity: float = 0.0, method: str | None = None,
                kind: str = "all_params") -> str:
    """``vis_{kind}_{Label}_sparsity_{S}%[_{method}].png``, as the original lab's
    ``vis_all_params_GPT2-medium_sparsity_0%.png``. Only a sparsified figure
    carries its method: methods reaching the same sparsity leave different
    weights, while every one starts from the same dense model."""
    if not re.fullmatch(r"[a-z_]+", kind):
        raise ValueError(f"figure kind {kind!r}: use lowercase letters and underscores, e.g. 'all_params'")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", str(label)).strip("-") or "model"
    s = sparsity_percent(sparsity)
    suffix = f"_{method}" if method and float(sparsity) > 0 else ""
    return f"vis_{kind}_{safe}_sparsity_{s}%{suffix}.png"


# --------------------------------------------------------------------------- binning helpers
def display_window(ws: WeightStats, quantile: float = 0.999) -> float:
    """Half-width of the zoomed window: the ``quantile`` of |w| over the
    prunable weight matrices (all parameters if there are none). Not over all
    parameters: Whisper's sinusoidal position table (1.5% of its parameters,
    values in [-1, 1]) would otherwise squeeze every weight matrix into a few bars."""
    s = np.abs(st.sample_of(ws, ws.mask(prunable=True)))
    if not len(s):
        s = np.abs(ws.sample)
    w = float(np.quantile(s, quantile)) if len(s) else ws.bins.core
    return min(max(w, 4 * ws.bins.core_width), ws.bins.core)


def rebin(ws: WeightStats, counts: np.ndarray, window: float,
          bars: int = DISPLAY_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Merge core bins into about ``bars`` bars covering [-window, window];
    zero stays the centre of the middle bar. Returns (edges, counts)."""
    nb = ws.bins.core_bins
    centre = nb // 2
    width = ws.bins.core_width
    half = min(centre, int(math.ceil(window / width)))  # core bins each side of the centre bin
    f = max(1, int(round((2 * half + 1) / bars)))
    f += (f + 1) % 2  # odd, so the middle bar is centred on zero
    m = max(1, min(int(math.ceil((half - (f - 1) // 2) / f)), (centre - (f - 1) // 2) // f))
    lo = centre - (f - 1) // 2 - m * f
    hi = centre + (f - 1) // 2 + m * f + 1
    merged = counts[lo:hi].reshape(-1, f).sum(axis=1)
    edges = ws.bins.core_edges[lo:hi + 1:f]
    return edges, merged


def zero_spike(counts: np.ndarray) -> bool:
    """True when the middle bar towers over its neighbours (exact zeros after
    pruning, or a quantizer's zero level): a linear axis would hide the rest."""
    c = len(counts) // 2
    near = np.concatenate([counts[max(0, c - 2):c], counts[c + 1:c + 3]])
    return bool(counts[c] > SPIKE_RATIO * max(1.0, float(near.mean()) if len(near) else 0.0))


def _stored_note(ws: WeightStats) -> str | None:
    levels = ws.info.get("levels_per_block")
    if levels is not None and levels <= FOUR_BIT_LEVELS:
        return (f"weights were stored 4-bit (at most {levels} distinct values in any group of "
                f"32): the histogram is spiky at fine bins")
    return None


# --------------------------------------------------------------------------- the original lab's figure
def all_params_figure(ws: WeightStats, *, dense: WeightStats | None = None,
                      method: str | None = None):
    """Histogram of every parameter: zoomed window (left) and full range on a
    log-count axis (right). ``dense``: overlay the unpruned model's histogram
    and, for a sparsified model, mark the magnitude cut at its sparsity
    (recorded in ``ws.info``, as is the method unless ``method`` is given)."""
    sparsity = float(ws.info.get("sparsity") or 0.0)
    method = method or ws.info.get("method")
    sparsified = bool(method and sparsity)
    cut = st.magnitude_cut(dense, sparsity) if dense is not None and sparsity > 0 else None
    window = display_window(dense or ws)
    edges, counts = rebin(ws, st.core_histogram(ws)[0], window)
    log = zero_spike(counts)
    summ = st.summarize(ws)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [2.2, 1]})
    # a sparsified model in its method's colour, as in every other figure of the lab
    color = style.method_color(method) if sparsified else sns.color_palette()[0]
    ax.stairs(counts, edges, fill=True, color=color, alpha=0.75,
              label=f"{ws.label}" + (f" after {method}" if sparsified else ""))
    if dense is not None:
        d_edges, d_counts = rebin(dense, st.core_histogram(dense)[0], window)
        ax.stairs(d_counts, d_edges, color="0.25", lw=1.0, label="dense (before pruning)")
    if cut is not None:
        for sgn in (-1, 1):
            ax.axvline(sgn * cut, color="crimson", ls="--", lw=1.1,
                       label=f"magnitude cut for {sparsity_percent(sparsity)}%: |w| = {cut:.3g}"
                       if sgn > 0 else None)
    if log:
        ax.set_yscale("log")
    bar = edges[1] - edges[0]
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("weight value")
    ax.set_ylabel(f"parameters per bar (bar width {bar:.2g})" + (", log scale" if log else ""))
    inside = counts.sum() / ws.n
    shown = f"{100 * inside:.2f}% of parameters inside ±{window:.3g}"
    ax.set_title(f"{ws.label}: all {ws.n / 1e6:.1f}M parameters, sparsity "
                 f"{sparsity_percent(sparsity)}%" + (f" ({method})" if sparsified else ""),
                 fontsize=11)
    text = (f"|w| < 0.05: {100 * summ['frac_abs_lt_0.05']:.1f}%\n"
            f"|w| < 0.01: {100 * summ['frac_abs_lt_0.01']:.1f}%\n"
            f"exactly 0: {100 * summ['exact_zero_frac']:.2f}%\n"
            f"std {summ['std']:.3g}, excess kurtosis {summ['excess_kurtosis']:.3g}\n{shown}")
    ax.text(0.01, 0.98, text, transform=ax.transAxes, va="top", ha="left", fontsize=8.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.8", "alpha": 0.9})
    note = _stored_note(dense or ws)
    if note:
        ax.text(0.5, -0.2, "Note: " + note, transform=ax.transAxes, ha="center", va="top",
                fontsize=8.5, color="darkred")
    ax.legend(loc="upper right", fontsize=8)
    # full range, log counts: the tails the window cuts off
    o = st.outer_histogram(ws)
    ax2.stairs(np.where(o > 0, o, np.nan), ws.bins.outer_edges, color=color, lw=1.0)
    ax2.axvspan(-window, window, color="0.85", zorder=0, label=f"window ±{window:.3g}")
    ax2.set_yscale("log")
    ax2.set_xlabel("weight value (full range)")
    ax2.set_ylabel(f"parameters per bar (width {2 * ws.bins.outer / ws.bins.outer_bins:.2g}), log")
    ax2.set_title("full range, log count", fontsize=10)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- ridgelines
def _density(edges: np.ndarray, counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total else counts.astype(float)


def _ridge(ax, rows: list[tuple[str, np.ndarray, np.ndarray]], reference=None, right_labels=None,
           color=None, overlap: float = 1.6):
    """One filled density per row, first row on top, each scaled to its own
    peak; ``reference`` (edges, density) drawn on every row with that row's
    scale, so a row narrower than the reference towers over it."""
    if not rows:
        ax.set_axis_off()
        return
    palette = sns.color_palette("viridis", len(rows)) if color is None else [color] * len(rows)
    n = len(rows)
    top = n - 1 + overlap
    for i, (_name, edges, dens) in enumerate(rows):
        base = n - 1 - i
        scale = overlap / (float(np.nanmax(dens)) or 1.0)  # each row to its own peak: shapes compare
        x = np.repeat(edges, 2)[1:-1]
        y = base + np.repeat(dens, 2) * scale
        ax.fill_between(x, base, y, color=palette[i], alpha=0.8, lw=0, zorder=2 * i)
        ax.plot(x, y, color="white", lw=0.6, zorder=2 * i + 1)
        if reference is not None:
            r_edges, r_dens = reference
            r_y = base + np.repeat(r_dens, 2) * scale
            top = max(top, float(np.nanmax(r_y)))
            ax.plot(np.repeat(r_edges, 2)[1:-1], r_y, color="0.15", lw=0.7, ls=":", zorder=2 * i + 1)
        if right_labels:
            ax.text(1.01, base + 0.15, right_labels[i], transform=ax.get_yaxis_transform(),
                    fontsize=7.5, va="bottom")
    ax.set_yticks([n - 1 - i for i in range(n)])
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_ylim(-0.2, top + 0.05 * overlap)
    ax.grid(axis="y", visible=False)


def layers_figure(ws: WeightStats, distances=None):
    """Per-block distributions, one row per block (encoder and decoder in
    separate panels), with the whole model's distribution dotted on every row
    and each block's KS distance to it on the right."""
    distances = st.depth_distances(ws) if distances is None else distances
    window = display_window(ws)
    edges, overall = rebin(ws, st.core_histogram(ws)[0], window)
    ref = (edges, _density(edges, overall))
    sides = [s for s in ("encoder", "decoder") if s in set(distances["side"])]
    nmax = max(int((distances["side"] == s).sum()) for s in sides)
    fig, axes = plt.subplots(1, len(sides), figsize=(6.2 * len(sides), 1.1 + 0.32 * nmax + 1.2),
                             squeeze=False)
    for ax, side in zip(axes[0], sides, strict=True):
        part = distances[distances["side"] == side]
        rows, labels = [], []
        for r in part.itertuples():
            mask = ws.mask(side=side) & (ws.tensors["block"] == r.block).fillna(False).to_numpy(bool)
            e, c = rebin(ws, st.core_histogram(ws, mask)[0], window)
            rows.append((f"block {r.block}", e, _density(e, c)))
            labels.append(f"KS {r.ks:.3f}")
        _ridge(ax, rows, reference=ref, right_labels=labels)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("weight value")
        ax.set_title(f"{ws.label} {side}: one row per block (top = first)\n"
                     f"dotted: whole model; right: KS distance to it", fontsize=10)
    note = _stored_note(ws)
    if note:
        fig.text(0.5, -0.01, "Note: " + note, ha="center", va="top", fontsize=8.5, color="darkred")
    fig.tight_layout()
    return fig


def components_figure(ws: WeightStats):
    """Per-component distributions: weight matrices by role (attention q/k/v/o,
    cross-attention, MLP, embeddings, conv, head) in the main window; norms and
    biases, whose values sit elsewhere, on their own axis."""
    table = st.group_table(ws, "group").set_index("group", drop=False)
    window = display_window(ws)
    main = [g for g in table["group"] if g not in ("norm", "bias")]
    side = [g for g in table["group"] if g in ("norm", "bias")]
    fig, axes = plt.subplots(1, 2 if side else 1, figsize=(12.5 if side else 7.5,
                             1.2 + 0.42 * max(len(main), 2) + 1.0),
                             gridspec_kw={"width_ratios": [2, 1]} if side else None, squeeze=False)
    rows, labels = [], []
    edges, overall = rebin(ws, st.core_histogram(ws)[0], window)
    for g in main:
        e, c = rebin(ws, st.core_histogram(ws, ws.mask(group=g))[0], window)
        rows.append((g, e, _density(e, c)))
        share, std = table.loc[g, "share"], table.loc[g, "std"]
        labels.append(f"{100 * share:.1f}% of params, std {std:.3g}")
    _ridge(axes[0][0], rows, reference=(edges, _density(edges, overall)), right_labels=labels)
    axes[0][0].set_xlim(edges[0], edges[-1])
    axes[0][0].set_xlabel("weight value")
    axes[0][0].set_title(f"{ws.label}: weights by component (dotted: whole model)", fontsize=10)
    if side:
        ax = axes[0][1]
        vals = st.sample_of(ws, ws.mask(group=side))
        lo, hi = (np.quantile(vals, [0.005, 0.995]) if len(vals) else (-1.0, 1.0))
        pad = 0.05 * max(hi - lo, 1e-3)
        lo, hi = lo - pad, hi + pad
        oe = ws.bins.outer_edges
        keep = (oe[1:] > lo) & (oe[:-1] < hi)
        rows, labels = [], []
        for g in side:
            c = st.outer_histogram(ws, ws.mask(group=g))[keep]
            e = oe[np.concatenate([keep, [False]]) | np.concatenate([[False], keep])]
            rows.append((g, e, _density(e, c)))
            labels.append(f"{100 * table.loc[g, 'share']:.2f}%")
        _ridge(ax, rows, right_labels=labels, color=sns.color_palette()[1])
        ax.set_xlim(lo, hi)
        ax.set_xlabel("parameter value")
        ax.set_title("norm weights/biases and linear biases", fontsize=10)
    note = _stored_note(ws)
    if note:
        fig.text(0.5, -0.01, "Note: " + note, ha="center", va="top", fontsize=8.5, color="darkred")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- depth
def depth_figure(per_model: dict, tensor_level: dict | None = None):
    """KS distance of each block to its model's whole distribution against the
    block index, one panel per model, one line per stack (encoder/decoder).
    ``per_model``: label -> :func:`lab_utils.experiments.weights.depth_distances` table;
    ``tensor_level``: label -> the tensor-level table (drawn as faint dots)."""
    n = len(per_model)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
    colors = {"encoder": sns.color_palette()[0], "decoder": sns.color_palette()[3]}
    for ax, (label, dist) in zip(axes[0], per_model.items(), strict=True):
        corr = st.depth_correlation(dist).set_index("side")
        if tensor_level and label in tensor_level:
            t = tensor_level[label]
            t = t[~t["component"].isin(["norm"]) & ~t["name"].str.endswith(".bias")]
            for side, part in t.groupby("side", sort=False):
                ax.scatter(part["block"], part["ks"], s=9, alpha=0.3, color=colors.get(side, "0.5"),
                           lw=0)
        for side, part in dist.groupby("side", sort=False):
            r = corr.loc[side]
            sig = "" if r["significant"] else ", n.s."
            lab = (f"{side} blocks: ρ = {r['rho']:+.2f}, p = {r['p']:.2g}{sig}"
                   if not math.isnan(r["rho"]) else f"{side} blocks (n = {int(r['n'])})")
            sns.lineplot(x=part["block"].to_numpy(), y=part["ks"].to_numpy(), marker="o", ax=ax,
                         color=colors.get(side, "0.3"), label=lab)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("block index (0 = nearest the input)")
        ax.set_ylabel("KS distance to the whole model (log)")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7.5, loc="upper left")
    fig.suptitle("Distance of each block's parameter distribution to the whole model's "
                 "(Kolmogorov-Smirnov on shared bins; faint dots: the block's weight matrices)",
                 fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- captions
def _tails(kurtosis: float) -> str:
    if math.isnan(kurtosis):
        return "undefined"
    if kurtosis > 0.5:
        return "heavier-tailed and more peaked than a normal distribution"
    if kurtosis < -0.5:
        return "lighter-tailed than a normal distribution"
    return "close to a normal distribution's"


def caption_all_params(ws: WeightStats) -> str:
    """The sentence under a model's all-parameters figure, from its numbers."""
    s = st.summarize(ws)
    text = (f"{pct(s['frac_abs_lt_0.05'])} of {ws.label}'s {_count(ws.n)} parameters lie within "
            f"±0.05 ({pct(s['frac_abs_lt_0.01'])} within ±0.01, {pct(s['frac_abs_lt_0.001'])} "
            f"within ±0.001); the median |w| is {s['abs_median']:.3g} and the standard deviation "
            f"{s['std']:.3g}. Excess kurtosis {s['excess_kurtosis']:.3g}: "
            f"{_tails(s['excess_kurtosis'])}. {s['exact_zeros']:,} parameters "
            f"({pct(s['exact_zero_frac'], 4)}) are exactly zero.")
    note = _stored_note(ws)
    if note:
        text += f" Note: {ws.label}'s {note}."
    return text


def caption_layers(ws: WeightStats, distances) -> str:
    parts = []
    for _, r in st.depth_table({ws.label: distances}).iterrows():
        parts.append(f"{ws.label}'s {r['blocks']} {r['stack']} blocks are within KS "
                     f"{r['KS min']:.3f}–{r['KS max']:.3f} of the whole model "
                     f"(farthest: block {r['farthest block']}); "
                     f"{describe_correlation(r['ρ'], r['p'], r['blocks'])}")
    return ". ".join(parts) + "."


def caption_depth(per_model: dict) -> str:
    """One sentence per stack under the depth figure."""
    parts = []
    for label, dist in per_model.items():
        for r in st.depth_correlation(dist).itertuples():
            parts.append(f"{label} {r.side}: {describe_correlation(r.rho, r.p, r.n)}")
    return "; ".join(parts) + "."


def caption_components(ws: WeightStats) -> str:
    t = st.group_table(ws, "group")
    w = t[~t["group"].isin(["norm", "bias"])]
    wide, narrow = w.loc[w["std"].idxmax()], w.loc[w["std"].idxmin()]
    big = w.loc[w["params"].idxmax()]
    heavy = w.loc[w["excess_kurtosis"].idxmax()]
    return (f"In {ws.label}, {big.group} holds the most parameters ({pct(big.share)}). The widest "
            f"weight component is {wide.group} (std {wide['std']:.3g}), the narrowest "
            f"{narrow.group} (std {narrow['std']:.3g}); the heaviest tails are in {heavy.group} "
            f"(excess kurtosis {heavy.excess_kurtosis:.3g}).")


def caption_pruned(ws: WeightStats, dense: WeightStats) -> str:
    """What pruning did to the distribution: zeros, and whether survivors moved."""
    info = ws.info
    method, s = info.get("method"), info.get("sparsity", 0.0)
    moved = st.survivors_moved(ws, dense)
    after, before = st.summarize(ws), st.summarize(dense)
    mp = ws.mask(prunable=True)
    survivors = ws.tensors.loc[mp, "numel"].sum() - ws.tensors.loc[mp, "zeros"].sum()
    prunable_zero = 1 - survivors / ws.tensors.loc[mp, "numel"].sum()
    text = (f"After {method} pruning of {ws.label} to {sparsity_percent(s)}%, "
            f"{pct(prunable_zero)} of the prunable weights and {pct(after['exact_zero_frac'])} of "
            f"all parameters are exactly zero (before: {pct(before['exact_zero_frac'], 4)}). ")
    if moved > 0.001:
        text += (f"At least {pct(moved)} of the surviving prunable weights changed value (they "
                 f"moved to another bin of width {ws.bins.core_width:.1e}): the method updates the "
                 f"weights it keeps.")
    else:
        text += (f"No surviving weight changed value ({pct(moved, 2)} of the survivors left their "
                 f"bin): the method only removes weights, and the histogram outside the zero bar "
                 f"is the dense one minus what was removed.")
    return text


def describe_correlation(rho: float, p: float, n: int, alpha: float = ALPHA) -> str:
    """Words for a depth correlation, chosen by the numbers: a trend only when
    significant; a strong rank correlation on too few blocks says so."""
    if math.isnan(rho) or math.isnan(p):
        return f"there are too few blocks ({n}) to correlate distance with depth"
    exact = "exact " if n <= EXACT_N else ""
    num = f"Spearman ρ = {rho:+.2f}, {exact}p = {p:.2g}, n = {n} blocks"
    trend = "rises" if rho > 0 else "falls"
    if p < alpha:
        return f"distance to the overall distribution {trend} with depth ({num})"
    if abs(rho) >= 0.8:
        return (f"distance to the overall distribution {trend} with depth in rank order, but with "
                f"only {n} blocks this is not significant (Spearman ρ = {rho:+.2f}, {exact}p = "
                f"{p:.2g} ≥ α = {alpha:g})")
    return (f"distance to the overall distribution shows no significant trend with depth "
            f"({num}; not significant at α = {alpha:g})")


# --------------------------------------------------------------------------- the original lab's claims
SIMILAR_KS = 0.1  # a block "looks like" the whole model when its KS distance is below this


def _verdict(yes: list[str], no: list[str]) -> str:
    if not no:
        return "holds for every model measured"
    if not yes:
        return "holds for no model measured"
    return f"holds for {', '.join(yes)}, not for {', '.join(no)}"


def claim_near_zero(all_stats) -> str:
    """The original lab's "most parameters are close to 0", measured per model
    (the numbers: :func:`~lab_utils.experiments.weights.claims_table`)."""
    fracs = {ws.label: st.summarize(ws)[f"frac_abs_lt_{NEAR:g}"] for ws in all_stats}
    yes = [m for m, f in fracs.items() if f > 0.5]
    return (f"**Claim 1, most parameters are close to 0** (more than half within ±{NEAR:g}): it "
            f"{_verdict(yes, [m for m in fracs if m not in yes])}.")


def claim_layers(all_stats, distances: dict) -> str:
    """The original lab's "each layer looks like the whole, higher layers deviate"
    (the numbers: :func:`~lab_utils.experiments.weights.depth_table`)."""
    t = st.depth_table(distances)
    similar = int((t["KS max"] < SIMILAR_KS).sum())
    rising = t[(t["ρ"] > 0) & (t["p"] < ALPHA)]
    stacks = ", ".join(f"{r.model} {r.stack}" for r in rising.itertuples())
    return (f"**Claim 2, each layer looks like the whole model but higher layers deviate** (Kolmogorov-Smirnov "
            f"distance of each block to the whole model): every block is within KS {SIMILAR_KS:g} in {similar} "
            f"of {len(t)} block stacks, and the distance rises significantly with depth (Spearman, "
            f"α = {ALPHA:g}) in {len(rising)} of {len(t)}" + (f" ({stacks})." if stacks else "."))


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


PRESPARSIFIED = 0.01  # exact zeros in >= 1% of the prunable weights: sparsified before release


def claim_presparsified(all_stats) -> str:
    """The original lab's "billion-parameter models come partly sparsified": what our
    models can say about it, from the exact zeros of the prunable weight matrices (what a
    developer's pruning would zero; :func:`~lab_utils.experiments.weights.claims_table`)."""
    fracs = {}
    for ws in all_stats:
        z, n, _ = st.prunable_zeros(ws)
        fracs[ws.label] = z / n if n else 0.0
    flagged = [m for m, f in fracs.items() if f >= PRESPARSIFIED]
    top = max(fracs, key=fracs.get)
    biggest = max(ws.n for ws in all_stats)
    if flagged:
        verdict = (f"{', '.join(flagged)} arrive{'s' if len(flagged) == 1 else ''} with at least "
                   f"{pct(PRESPARSIFIED, 0)} of the prunable weights exactly zero, a sign of sparsification "
                   f"before release (or of a quantizer that rounds small weights to 0)")
    else:
        verdict = (f"none of them arrives sparsified (at most {pct(fracs[top], 4)} of the prunable weights "
                   f"exactly zero, {top}; the threshold is {pct(PRESPARSIFIED, 0)})")
    scale = (f"with at most {_count(biggest)} parameters, these models cannot confirm or refute the claim "
             f"about billion-parameter models" if biggest < 1e9 else
             "at least one model measured has a billion parameters or more")
    return f"**Claim 3, large models come pre-sparsified**: {verdict}; {scale}."


def headlines(summary, alpha: float = ALPHA) -> dict[str, str]:
    """Short answers to the seed's three claims, for the write-up's first screen,
    from the per-model summary table (``weights.model_summary`` rows, dense models)."""
    most = int((summary["frac_abs_lt_0.05"] > 0.5).sum())
    out = {"near_zero": f"More than half lie within ±0.05 in {most} of {len(summary)} models."}
    trends, stacks = [], 0
    for r in summary.itertuples():
        for side in ("decoder", "encoder"):
            rho, p = getattr(r, f"{side}_rho", math.nan), getattr(r, f"{side}_p", math.nan)
            if rho is None or rho != rho:
                continue
            stacks += 1
            if rho > 0 and p < alpha:
                trends.append(f"{r.model} {side}")
    if stacks:
        out["layers"] = (f"The distance grows significantly with depth in {len(trends)} of {stacks} block stacks"
                         + (f": {', '.join(trends)}." if trends else "."))
    z = summary.exact_zero_frac
    worst = summary.model.iloc[int(z.to_numpy().argmax())]
    out["presparsified"] = (f"**None of these models comes pre-sparsified**: at most {z.max():.2%} of any "
                            f"model's parameters are exactly zero ({worst})." if z.max() < 0.01 else
                            f"**Some pre-sparsification**: {worst} has {z.max():.1%} exact zeros before any pruning.")
    return out


def resources_paragraph(memory, usage: dict) -> str:
    """Notebook 02's resources paragraph from its
    :func:`~lab_utils.experiments.weights.memory_table` and the kernel's usage so
    far (:func:`lab_utils.core.measure.process_usage`)."""
    later = memory.iloc[1:] if len(memory) > 1 else memory
    calibrated = memory[memory.method.isin(["wanda", "sparsegpt"]) & memory["pruning peak MiB"].notna()]
    engine_peak = (f" The pruning engine peaked at {human_bytes(calibrated['pruning peak MiB'].max() * 2**20)} "
                   f"while it built these checkpoints (in its own process, or in the run that cached them)."
                   if len(calibrated) else "")
    return (f"This notebook ran for {usage['elapsed_s']:.0f} s until here ({usage['cpu_s']:.0f} s of CPU time in "
            f"its kernel; load average {usage['load_average']:.1f} on {usage['cores']} cores). While a model was "
            f"loaded and measured, resident "
            f"memory rose by at most {later['increase / model'].max():.2f}x the model's size "
            f"({'below' if later['increase / model'].max() < 2 else 'above'} the 2x target); the first load, which "
            f"also imports the model code, rose by {memory['increase / model'].iloc[0]:.2f}x. The process peaked at "
            f"{human_bytes(memory['RSS peak MiB'].max() * 2**20)}." + engine_peak)
