"""One look per pruning method and per sparsity pattern, for every figure.

A method keeps its colour and marker in every figure of the lab, so Wanda is
green in the sweep, the benchmarks, the file sizes and the concepts alike. A
pattern changes the line style and the marker's fill, never the colour ("wanda
2:4" is a hollow green Wanda marker); OWL keeps its method's look with a
dash-dot line. The colours are the Okabe-Ito palette, which stays
distinguishable for the common forms of colour blindness and in greyscale.
"""

from __future__ import annotations

import zlib

DENSE = "dense"
UNSTRUCTURED = "unstructured"

METHOD_COLORS = {
    DENSE: "#000000",
    "random": "#CC79A7",     # reddish purple
    "magnitude": "#0072B2",  # blue
    "wanda": "#009E73",      # bluish green
    "sparsegpt": "#D55E00",  # vermillion
}
METHOD_MARKERS = {DENSE: "*", "random": "X", "magnitude": "o", "wanda": "s", "sparsegpt": "D"}

# The concepts of notebook 01 that are not pruning methods, in the same palette.
CONCEPT_COLORS = {"structured pruning": "#E69F00", "quantization": "#56B4E9",
                  "distillation": "#F0E442", "moefication": "#999999"}
CONCEPT_MARKERS = {"structured pruning": "P", "quantization": "^", "distillation": "v", "moefication": "h"}

# MoEfication's two routers: the concept's colour and marker, the oracle (an upper bound) dashed and hollow.
ROUTER_LINESTYLES = {"linear": "-", "oracle": "--"}


def router_style(router: str) -> dict:
    """Keyword arguments for ``ax.plot`` of one MoE router's line."""
    color = CONCEPT_COLORS["moefication"]
    oracle = router == "oracle"
    return {"color": color, "marker": CONCEPT_MARKERS["moefication"], "ls": ROUTER_LINESTYLES.get(router, ":"),
            "markerfacecolor": "white" if oracle else color, "markeredgecolor": color}


# A pattern: the line that joins a method's points, and how its markers are filled.
PATTERN_LINESTYLES = {UNSTRUCTURED: "-", "2:4": "--", "4:8": ":"}
PATTERN_FILLS = {UNSTRUCTURED: "full", "2:4": "none", "4:8": "left"}
OWL_LINESTYLE = "-."

# For a method or pattern the lab does not name here (a new method, "1:4"): a
# stable pick from what is left, so it still looks the same in every figure.
_SPARE_COLORS = ("#E69F00", "#56B4E9", "#F0E442", "#999999", "#882255", "#44AA99")
_SPARE_MARKERS = ("v", "P", "h", "<", ">", "p")
_SPARE_LINESTYLES = ("-.", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 2)))
_SPARE_FILLS = ("bottom", "right", "top")


def _pick(name: str, options):
    return options[zlib.crc32(name.encode()) % len(options)]


def split_owl(method: str) -> tuple[str, bool]:
    """``"wanda+owl"``, ``"wanda OWL"``, ``"wanda (OWL)"`` -> ``("wanda", True)``."""
    low = method.lower().replace("(", " ").replace(")", " ").replace("+", " ").split()
    owl = "owl" in low
    base = " ".join(w for w in low if w != "owl") or method.lower()
    return base, owl


def method_color(method: str) -> str:
    base, _ = split_owl(method)
    return METHOD_COLORS.get(base) or CONCEPT_COLORS.get(base) or _pick(base, _SPARE_COLORS)


def method_marker(method: str) -> str:
    base, _ = split_owl(method)
    return METHOD_MARKERS.get(base) or CONCEPT_MARKERS.get(base) or _pick(base, _SPARE_MARKERS)


def pattern_linestyle(pattern: str):
    return PATTERN_LINESTYLES.get(pattern) or _pick(pattern, _SPARE_LINESTYLES)


def pattern_fill(pattern: str) -> str:
    return PATTERN_FILLS.get(pattern) or _pick(pattern, _SPARE_FILLS)


def line_style(method: str, pattern: str = UNSTRUCTURED) -> dict:
    """Keyword arguments for ``ax.plot`` of one method and pattern: colour and
    marker of the method, line style and marker fill of the pattern (OWL: a
    dash-dot line). ``ax.plot(x, y, ls="", **line_style(...))`` draws markers only."""
    _, owl = split_owl(method)
    color = method_color(method)
    fill = pattern_fill(pattern)
    kw = {"color": color, "marker": method_marker(method),
          "ls": OWL_LINESTYLE if owl else pattern_linestyle(pattern), "fillstyle": fill,
          "markeredgecolor": color}
    if fill != "full":
        kw["markerfacecoloralt"] = "white"
    return kw


def scatter_style(method: str, pattern: str = UNSTRUCTURED) -> dict:
    """Keyword arguments for ``ax.scatter`` of one method and pattern (scatter has
    no half fill: a pattern other than unstructured draws a hollow marker)."""
    color = method_color(method)
    hollow = pattern_fill(pattern) != "full"
    return {"marker": method_marker(method), "edgecolors": color,
            "facecolors": "white" if hollow else color, "linewidths": 1.5 if hollow else 1.0}
