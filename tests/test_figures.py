"""Every figure that draws methods or patterns takes their look from
lab_utils.presentation.style, and no two texts of a figure overlap."""

import itertools

import matplotlib
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D

from lab_utils.core import files
from lab_utils.experiments import benchmarks
from lab_utils.presentation import benchmarks_view, concepts_figures, style, sweep_view

matplotlib.use("Agg")

METHODS = ("random", "magnitude", "wanda", "sparsegpt")


@pytest.fixture()
def drawn(monkeypatch, tmp_output):
    """The figures the view modules save, kept open for inspection."""
    figs = []

    def keep(fig, name, close=True):
        figs.append(fig)
        return tmp_output / name

    monkeypatch.setattr(files, "save_figure", keep)  # every view saves through files.save_figure
    return figs


def _hex(color) -> str:
    return to_hex(color, keep_alpha=False).lower()


def looks(ax) -> dict[str, dict]:
    """Legend label -> colour, marker and fill of the line or scatter drawn with it."""
    out = {}
    for artist in [*ax.lines, *ax.collections]:
        label = artist.get_label()
        if not label or label.startswith("_"):
            continue
        if isinstance(artist, Line2D):
            out[label] = {"color": _hex(artist.get_color()), "marker": artist.get_marker(),
                          "fill": artist.get_fillstyle(), "ls": artist.get_linestyle()}
        elif isinstance(artist, PathCollection):
            face = artist.get_facecolor()
            out[label] = {"color": _hex(artist.get_edgecolor()[0]),
                          "fill": "none" if len(face) and _hex(face[0]) == "#ffffff" else "full"}
    return out


def check_methods(ax, methods=METHODS):
    """Each method's entries (``"wanda"``, ``"wanda 2:4"``) in the method's colour;
    an N:M pattern hollow or half filled; returns the labels checked."""
    seen = []
    for label, look in looks(ax).items():
        method, _, pattern = label.partition(" ")
        if method not in methods:
            continue
        assert look["color"] == _hex(style.method_color(method)), (label, look)
        if "marker" in look:
            assert look["marker"] == style.method_marker(method), (label, look)
        if pattern in ("2:4", "4:8"):
            assert look["fill"] != "full", (label, look)
        seen.append(label)
    return seen


# --------------------------------------------------------------------------- tables drawn
def sweep_table(methods=METHODS) -> pd.DataFrame:
    rows = [{"model": "M", "method": "dense", "pattern": "-", "requested": 0.0, "perplexity": 20.0}]
    for i, m in enumerate(methods):
        for s in (0.3, 0.5, 0.7):
            rows.append({"model": "M", "method": m, "pattern": "unstructured", "requested": s,
                         "perplexity": 20 * (1 + s * (i + 1))})
        for p in ("2:4", "4:8"):
            rows.append({"model": "M", "method": m, "pattern": p, "requested": 0.5, "perplexity": 40.0 + i})
    return pd.DataFrame(rows)


def bench_table(methods=METHODS) -> pd.DataFrame:
    values = {("dense", "unstructured", 0.0): 10.0}
    for i, m in enumerate(methods):
        values |= {(m, "unstructured", 0.5): 11.0 + i, (m, "unstructured", 0.7): 15.0 + i, (m, "2:4", 0.5): 20.0 + i}
    rows = [{"model": "m", "label": "M", "family": "decoder-only", "method": meth, "pattern": pat,
             "requested_sparsity": sp, "actual_sparsity": sp, "benchmark": "perplexity",
             "metric": "perplexity", "value": v, "seconds": 0.0, "prune_seconds": 0.0, "key": "k"}
            for (meth, pat, sp), v in values.items()]
    return benchmarks.add_dense(pd.DataFrame(rows))


# The smoke run's concepts tables (params/smoke.yaml): the 4-bit and int8 points sit
# side by side at the same perplexity; the default run adds more of them.
SPARSE = pd.DataFrame({"model": ["dense", "sparsified"], "dense_file_bytes": [538090408, 538090408],
                       "perplexity": [113.12, 1509.1]})
STRUCTURED_SMOKE = pd.DataFrame({"neurons_removed": [0.0, 0.5], "file_bytes": [538090408, 378837832],
                                 "perplexity": [113.12, 692.8]})
QUANT_SMOKE = pd.DataFrame({"scheme": ["fp32", "int8 per channel", "dynamic int8 (torch)", "4-bit RTN g32"],
                            "file_bytes": [538090408, 220229832, 220408536, 179818624],
                            "perplexity": [113.12, 113.14, 277.1, 113.12]})
STRUCTURED_DEFAULT = pd.DataFrame({"neurons_removed": [0.0, 0.1, 0.25, 0.5],
                                   "file_bytes": [538090408, 506000000, 458000000, 378837832],
                                   "perplexity": [66.7, 80.2, 130.5, 692.8]})
QUANT_DEFAULT = pd.DataFrame({"scheme": ["fp32", "int8 per channel", "dynamic int8 (torch)", "4-bit RTN g32",
                                         "4-bit RTN g64"],
                              "file_bytes": [538090408, 220229832, 220408536, 179818624, 176000000],
                              "perplexity": [66.7, 66.8, 67.9, 68.1, 68.9]})


# --------------------------------------------------------------------------- one look per method
def test_a_method_keeps_its_colour_and_marker_in_every_figure(drawn):
    sweep_view.plot_perplexity(sweep_table(), "M")
    benchmarks_view.metric_figure(bench_table(), "m")
    df = bench_table()
    sizes = df[df.metric == "perplexity"][["model", "method", "pattern", "requested_sparsity"]].assign(
        format="bitmask+zstd", file_bytes=range(100, 100 + len(df)), dense_file_bytes=200)
    benchmarks_view.size_figure(df, sizes, "m")
    sweep_fig, bench_fig, size_fig = drawn
    for fig in (sweep_fig, bench_fig, size_fig):
        seen = check_methods(fig.axes[0])
        assert {s.split()[0] for s in seen} == set(METHODS)
        assert any(" 2:4" in s for s in seen)
    assert any(" 4:8" in s for s in check_methods(sweep_fig.axes[0]))
    for fig in drawn[:2]:  # dense: the reference line, in the dense colour
        dense = [v for k, v in looks(fig.axes[0]).items() if k.startswith("dense")]
        assert dense and all(v["color"] == _hex(style.method_color("dense")) for v in dense)


def test_the_colour_does_not_depend_on_which_methods_are_drawn(drawn):
    # Colours picked by position (C0, C1, ...) swapped Wanda and SparseGPT between figures.
    sweep_view.plot_perplexity(sweep_table(("wanda", "sparsegpt")), "M")
    benchmarks_view.metric_figure(bench_table(("sparsegpt", "wanda")), "m")
    a, b = (looks(f.axes[0]) for f in drawn)
    assert a["wanda"]["color"] == b["wanda"]["color"] == _hex(style.method_color("wanda"))
    assert a["sparsegpt"]["color"] == b["sparsegpt"]["color"] != a["wanda"]["color"]


def test_owl_allocation_lines_keep_the_method_colour(drawn):
    rows = [{"allocation": alloc, "side": "decoder", "component": comp, "block": b,
             "sparsity": 0.6 + (0.05 * (b - 1) if alloc == "OWL" else 0.0), "numel": 100}
            for alloc in ("uniform", "OWL") for comp in ("q", "mlp") for b in range(3)]
    sweep_view.plot_owl_heatmap(pd.DataFrame(rows), "M", "wanda", 0.6)
    lines = looks(drawn[0].axes[0])
    assert set(lines) == {"OWL (decoder)", "uniform (decoder)"}
    assert {v["color"] for v in lines.values()} == {_hex(style.method_color("wanda"))}
    assert lines["OWL (decoder)"]["ls"] != lines["uniform (decoder)"]["ls"]


def test_quality_vs_file_uses_the_method_and_concept_colours():
    fig = concepts_figures.draw_quality_vs_file(SPARSE, STRUCTURED_SMOKE, QUANT_SMOKE, "M", "magnitude")
    seen = looks(fig.axes[0])
    assert seen["dense"]["color"] == _hex(style.method_color("dense"))
    assert seen["sparsified, magnitude (dense file)"]["color"] == _hex(style.method_color("magnitude"))
    assert seen["quantization"]["color"] == _hex(style.method_color("quantization"))
    assert seen["structured pruning (MLP neurons)"]["color"] == _hex(style.method_color("structured pruning"))


def test_style_is_one_distinct_look_per_method_and_pattern():
    names = ["dense", *METHODS]
    assert len({style.method_color(m) for m in names}) == len(names)
    assert len({style.method_marker(m) for m in names}) == len(names)
    patterns = ["unstructured", "2:4", "4:8"]
    assert len({(str(style.pattern_linestyle(p)), style.pattern_fill(p)) for p in patterns}) == 3
    # OWL keeps the method's colour and marker; an unknown method still gets one fixed look
    assert style.method_color("wanda+owl") == style.method_color("wanda (OWL)") == style.method_color("wanda")
    assert style.line_style("wanda OWL")["ls"] != style.line_style("wanda")["ls"]
    assert style.method_color("obs") == style.method_color("obs")


# --------------------------------------------------------------------------- labels never collide
def _tick_labels(axis):
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for ticks, locs in ((axis.get_major_ticks(), axis.get_majorticklocs()),
                        (axis.get_minor_ticks(), axis.get_minorticklocs())):
        for tick, loc in zip(ticks, locs, strict=False):
            if lo <= loc <= hi:  # a tick outside the view is not drawn
                out += [tick.label1, tick.label2]
    return out


def text_boxes(fig) -> list[tuple[str, object]]:
    """(text, window extent) of every drawn text of ``fig``: titles, axis and tick
    labels, legend entries and the texts placed on the axes."""
    if not hasattr(fig.canvas, "get_renderer"):  # closed by the view after saving
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = list(fig.texts)  # the suptitle among them
    for ax in fig.axes:
        texts += [*ax.texts, ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        texts += _tick_labels(ax.xaxis) + _tick_labels(ax.yaxis)
        if ax.get_legend() is not None:
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
    unique = {id(t): t for t in texts}.values()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in unique
            if t.get_visible() and t.get_text().strip()]


def overlaps(fig) -> list[tuple[str, str]]:
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(text_boxes(fig), 2) if ba.overlaps(bb)]


@pytest.mark.parametrize("structured, quant", [(STRUCTURED_SMOKE, QUANT_SMOKE), (STRUCTURED_DEFAULT, QUANT_DEFAULT)],
                         ids=["smoke", "default"])
def test_quality_vs_file_labels_never_overlap(structured, quant):
    fig = concepts_figures.draw_quality_vs_file(SPARSE, structured, quant, "SmolLM2-135M", "magnitude")
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "int8 per channel" in labels and "4-bit RTN g32" in labels
    assert not overlaps(fig)


def test_overlap_check_catches_labels_printed_over_each_other():
    # The check itself: two labels at one point do overlap (the figure before adjustText).
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.scatter([180, 220], [113.1, 113.1])
    ax.annotate("4-bit RTN g32", (180, 113.1), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.annotate("int8 per channel", (220, 113.1), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlim(150, 550)
    assert ("4-bit RTN g32", "int8 per channel") in overlaps(fig)
    plt.close(fig)


def test_sweep_and_benchmark_figures_have_no_overlapping_text(drawn):
    sweep_view.plot_perplexity(sweep_table(), "M")
    benchmarks_view.metric_figure(bench_table(), "m")
    for fig in drawn:
        assert not overlaps(fig)
