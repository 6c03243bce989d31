"""The five concepts side by side, and the figures of notebook 01.

Every cell of the side-by-side table is written from the demo tables: a
ratio to the dense model, the measured quality, or "unchanged" when the
measured numbers are equal.
"""

from __future__ import annotations

import math

import pandas as pd

from lab_utils.core import files
from lab_utils.presentation import style

MB = 1e6


def _ratio(new: float, old: float) -> str:
    if new == old:
        return f"unchanged ({old / MB:.1f} MB)"
    return f"{old / MB:.1f} -> {new / MB:.1f} MB (x{new / old:.2f})"


def _speed(new, old) -> str:
    """Forward speed-up of row ``new`` over row ``old`` (CPU time; wall time in brackets)."""
    return (f"x{old.forward_cpu_s / new.forward_cpu_s:.2f} (CPU time; wall time "
            f"x{old.forward_s / new.forward_s:.2f})")


def _ppl(new: float, old: float) -> str:
    return f"perplexity {old:.1f} -> {new:.1f} ({new / old - 1:+.0%})"


def _changes(new: pd.Series, old: pd.Series) -> dict:
    """File, memory, speed and quality of table row ``new`` against row ``old``."""
    return {"file": _ratio(new.file_bytes, old.file_bytes),
            "memory": _ratio(new.memory_bytes, old.memory_bytes),
            "speed": _speed(new, old), "quality": _ppl(new.perplexity, old.perplexity)}


def pick_moe_row(moe_table: pd.DataFrame, router: str = "linear") -> pd.Series:
    """The MoE setting the summary shows: half of the neurons active (or the
    closest fraction below 1) with the given router."""
    t = moe_table[(moe_table.router == router) & (moe_table.active_fraction < 1)]
    if t.empty:
        t = moe_table[moe_table.router == router]
    return t.iloc[(t.active_fraction - 0.5).abs().argmin()]


def side_by_side(sparse: pd.DataFrame, structured: pd.DataFrame, quant: pd.DataFrame,
                 distill: pd.DataFrame, moe: pd.DataFrame) -> pd.DataFrame:
    """One row per technique (quantization: one per scheme): what changes in the
    file, in memory, in speed and in quality, as measured in this run."""
    rows = []
    d, s = sparse.iloc[0], sparse.iloc[1]
    rows.append({"technique": "Sparsification", "setting": f"{s.prunable_zero_fraction:.0%} of prunable weights zeroed",
                 "file": _ratio(s.dense_file_bytes, d.dense_file_bytes)
                 + f"; bitmask format {s.filter(like='bitmask').iloc[0] / MB:.1f} MB",
                 "memory": _ratio(s.memory_bytes, d.memory_bytes),
                 "speed": _speed(s, d), "quality": _ppl(s.perplexity, d.perplexity)})
    r = structured.iloc[-1]
    rows.append({"technique": "Pruning (structured)",
                 "setting": f"{r.neurons_removed:.0%} of MLP neurons removed",
                 **_changes(r, structured.iloc[0])})
    for _, q in quant.iloc[1:].iterrows():
        rows.append({"technique": "Quantization", "setting": f"{q.scheme} ({q.bits_per_weight:.2f} bits/weight)",
                     **_changes(q, quant.iloc[0])})
    t = distill.set_index("model")
    teacher, student = t.loc["teacher"], t.loc["student, distilled"]
    rows.append({"technique": "Distillation",
                 "setting": f"{int(student.layers)}-layer student of a {int(teacher.layers)}-layer teacher",
                 "file": _ratio(student.bytes_fp32, teacher.bytes_fp32) + " (fp32 weights)",
                 "memory": _ratio(student.bytes_fp32, teacher.bytes_fp32),
                 "speed": _speed(student, teacher),
                 "quality": f"accuracy {teacher.accuracy:.1%} -> {student.accuracy:.1%} "
                            f"(labels only: {t.loc['student, labels only'].accuracy:.1%})"})
    m = pick_moe_row(moe)
    dense_ppl = m.dense_perplexity if "dense_perplexity" in m else math.nan
    rows.append({"technique": "MoEfication", "setting": f"{int(m.top_k)} of {int(m.experts)} experts "
                 f"({m.active_fraction:.1%} of MLP neurons), {m.router} router",
                 "file": "unchanged (+ a router of d_model x experts per layer)",
                 "memory": "unchanged (all experts stay loaded)",
                 "speed": f"MLP multiply-adds x{m.mlp_macs_fraction:.2f} with an expert kernel "
                          f"(simulated here by masking: not timed)",
                 "quality": _ppl(m.perplexity, dense_ppl)
                 + f"; {m.captured:.1%} of the MLP output captured"})
    return pd.DataFrame(rows)


def draw_quality_vs_file(sparse: pd.DataFrame, structured: pd.DataFrame, quant: pd.DataFrame,
                         label: str, method: str | None = None, protocol: str = "quick"):
    """The figure of :func:`quality_vs_file_figure`, not saved. adjustText moves
    the point labels apart (a fixed number of iterations: the same data gives
    the same picture); the legend sits outside the axes, where no label can reach it."""
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    fig, ax = plt.subplots()
    d = sparse.iloc[0]
    ax.scatter([d.dense_file_bytes / MB], [d.perplexity], s=160, label="dense", zorder=3,
               **style.scatter_style(style.DENSE))
    s = sparse.iloc[1]
    ax.scatter([s.dense_file_bytes / MB], [s.perplexity], s=50,
               label=f"sparsified{f', {method}' if method else ''} (dense file)",
               **style.scatter_style(method or "sparsified"))
    texts = []
    r = structured.iloc[1:]
    look = style.line_style("structured pruning")
    ax.plot(r.file_bytes / MB, r.perplexity, label="structured pruning (MLP neurons)", **look)
    for _, row in r.iterrows():
        texts.append(ax.text(row.file_bytes / MB, row.perplexity, f"{row.neurons_removed:.0%}", fontsize=8))
    q = quant.iloc[1:]
    ax.scatter(q.file_bytes / MB, q.perplexity, s=50, label="quantization", **style.scatter_style("quantization"))
    for _, row in q.iterrows():
        texts.append(ax.text(row.file_bytes / MB, row.perplexity, row.scheme, fontsize=8))
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(f"perplexity, {protocol} (log scale)")
    ax.set_title(f"{label}: quality vs file size")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if texts:
        points = pd.concat([r[["file_bytes", "perplexity"]], q[["file_bytes", "perplexity"]]])
        # Every marker the labels must keep off, the dense and sparsified ones included.
        xs = list(points.file_bytes / MB) + [d.dense_file_bytes / MB, s.dense_file_bytes / MB]
        ys = list(points.perplexity) + [d.perplexity, s.perplexity]
        adjust_text(texts, x=xs, y=ys, ax=ax, iter_lim=500, expand=(1.15, 1.4),
                    arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6})
    return fig


def quality_vs_file_figure(sparse: pd.DataFrame, structured: pd.DataFrame, quant: pd.DataFrame,
                           label: str, method: str | None = None, protocol: str = "quick"):
    """Perplexity vs file size of every model variant of the first three demos
    (``method``: the sparsification demo's), as ``figs/concepts_quality_vs_file_<label>.png``."""
    fig = draw_quality_vs_file(sparse, structured, quant, label, method, protocol)
    return files.save_figure(fig, f"concepts_quality_vs_file_{label}.png")


def moe_figure(table: pd.DataFrame, label: str, protocol: str = "quick"):
    """Perplexity and captured MLP output vs the fraction of MLP neurons active."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for router, t in table.groupby("router", sort=True):
        a.plot(t.active_fraction, t.perplexity, label=f"{router} router", **style.router_style(router))
        b.plot(t.active_fraction, t.captured, label=f"{router} router", **style.router_style(router))
    if "dense_perplexity" in table:
        a.axhline(table.dense_perplexity.iloc[0], color=style.method_color("dense"), ls="--", lw=1, label="dense")
    a.set_yscale("log")
    for ax in (a, b):
        ax.set_xlabel("fraction of MLP neurons active per token")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    a.set_ylabel(f"perplexity, {protocol} (log scale)")
    b.set_ylabel("fraction of the MLP output captured")
    fig.suptitle(f"{label}: MoEfication")
    return files.save_figure(fig, f"concepts_moe_{label}.png")


def layer_masks_figure(scores: dict, masks: dict, layer: str, label: str, corner: int = 16):
    """The ``corner`` x ``corner`` top-left weights of one layer: each score
    (a heatmap) and each mask (black: pruned). Written to
    ``figs/concepts_layer_masks_<label>.png``."""
    import matplotlib.pyplot as plt

    panels = list(scores.items()) + list(masks.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
    for ax, (name, t) in zip(axes, panels, strict=True):
        is_mask = not t.dtype.is_floating_point
        im = ax.imshow(t[:corner, :corner].float().numpy(), cmap="Greys" if is_mask else "viridis",
                       vmin=0 if is_mask else None, vmax=1 if is_mask else None)
        ax.set_title(f"{name} mask" if is_mask else name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if not is_mask:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{label}, {layer}: rows (outputs) x columns (inputs) {corner} x {corner}; black = pruned")
    return files.save_figure(fig, f"concepts_layer_masks_{label}.png")
