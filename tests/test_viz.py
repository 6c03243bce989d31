"""Figure names, deterministic bytes, and what the figures and captions say."""

import re

import numpy as np
import pytest
import torch
from test_stats import GROWING, SMALL_CHUNKS, Synthetic

from lab_utils.core import files
from lab_utils.experiments import weight_stats, weights
from lab_utils.presentation import weights_view

SEED_PATTERN = re.compile(r"^vis_all_params_[A-Za-z0-9._-]+_sparsity_\d+(\.\d+)?%(_[a-z]+)?\.png$")


def test_figure_names_follow_the_seed():
    assert weights_view.figure_name("GPT2-medium", 0) == "vis_all_params_GPT2-medium_sparsity_0%.png"
    assert weights_view.figure_name("SmolLM2-135M", 0.5, "wanda") == "vis_all_params_SmolLM2-135M_sparsity_50%_wanda.png"
    assert weights_view.figure_name("BERT-large", 0.625, "magnitude").endswith("_sparsity_62.5%_magnitude.png")
    assert weights_view.figure_name("BART-large", 0.0, "sparsegpt") == "vis_all_params_BART-large_sparsity_0%.png"
    assert weights_view.figure_name("my model/v2", 0.7, "sparsegpt") == "vis_all_params_my-model-v2_sparsity_70%_sparsegpt.png"
    assert weights_view.figure_name("MiniLM-L6", 0.0, kind="layers") == "vis_layers_MiniLM-L6_sparsity_0%.png"
    for name in (weights_view.figure_name("Whisper-tiny.en", s, m) for s in (0, 0.5, 0.9) for m in ("magnitude", "sparsegpt")):
        assert SEED_PATTERN.match(name), name
    with pytest.raises(ValueError, match="kind"):
        weights_view.figure_name("x", 0, kind="All Params")


@pytest.fixture(scope="module")
def pair():
    """Dense synthetic stats and a magnitude-pruned copy measured on the same bins."""
    model = Synthetic(GROWING)
    dense = weight_stats.weight_stats(model, SMALL_CHUNKS, label="Synthetic")
    with torch.no_grad():  # half of every matrix, the embedding too: a spike at zero
        for W in (model.embed_tokens.weight, *(m.weight for b in model.layers
                                              for m in (b.q_proj, b.up_proj, b.down_proj))):
            W[W.abs() < W.abs().median()] = 0
    pruned = weight_stats.weight_stats(model, SMALL_CHUNKS, label="Synthetic", bins=dense.bins, reuse=dense,
                                       info={"sparsity": 0.5, "method": "magnitude"})
    return dense, pruned


def test_saving_the_same_figure_twice_gives_identical_bytes(pair, tmp_output):
    dense, pruned = pair
    makers = {"all_params": lambda: weights_view.all_params_figure(pruned, dense=dense),
              "depth": lambda: weights_view.depth_figure({"a": weights.depth_distances(dense)},
                                                {"a": weights.depth_distances(dense, "tensor")})}
    for kind, make in makers.items():
        name = weights_view.figure_name("Synthetic", 0.5, "magnitude", kind=kind)
        first = files.save_figure(make(), name).read_bytes()
        second = files.save_figure(make(), name).read_bytes()
        assert first[:8] == b"\x89PNG\r\n\x1a\n" and len(first) > 10_000
        assert first == second, kind
        assert (tmp_output / "figs" / name).is_file()
    assert not list((tmp_output / "figs").glob(".*tmp*"))  # atomic: no temporaries left


def test_log_axis_only_where_the_zero_spike_hides_the_rest(pair):
    dense, pruned = pair
    fig = weights_view.all_params_figure(dense)
    assert fig.axes[0].get_yscale() == "linear"
    fig = weights_view.all_params_figure(pruned, dense=dense)
    assert fig.axes[0].get_yscale() == "log"
    cut = weights.magnitude_cut(dense, 0.5)
    xs = {round(float(line.get_xdata()[0]), 9) for line in fig.axes[0].lines}
    assert {round(cut, 9), round(-cut, 9)} <= xs  # the pruning threshold is marked
    assert any("magnitude cut for 50%" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert fig.axes[1].get_yscale() == "log"


def test_layer_and_component_figures_have_a_row_per_block_and_group(pair):
    dense, _ = pair
    fig = weights_view.layers_figure(dense)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"block {i}" for i in range(len(GROWING))]
    fig = weights_view.components_figure(dense)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["attn.q", "mlp.up", "mlp.down",
                                                                    "embedding"]
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["norm", "bias"]


def test_4bit_note_appears_only_for_a_4bit_model(pair):
    dense, _ = pair
    texts = lambda fig: " ".join(t.get_text() for ax in fig.axes for t in ax.texts)  # noqa: E731
    assert "4-bit" not in texts(weights_view.all_params_figure(dense))
    dense.info["levels_per_block"] = 16
    try:
        assert "4-bit" in texts(weights_view.all_params_figure(dense))
        assert "4-bit" in weights_view.caption_all_params(dense)
    finally:
        dense.info.pop("levels_per_block")


def test_rebin_keeps_zero_centred_and_counts_inside(pair):
    dense, _ = pair
    counts = weights.core_histogram(dense)[0]
    window = weights_view.display_window(dense)
    edges, merged = weights_view.rebin(dense, counts, window)
    assert len(merged) % 2 == 1 and len(edges) == len(merged) + 1
    mid = len(merged) // 2
    assert edges[mid] < 0 < edges[mid + 1] and edges[mid] == pytest.approx(-edges[mid + 1])
    assert edges[-1] >= window * 0.99
    lo = np.searchsorted(dense.bins.core_edges, edges[0] - 1e-12)
    hi = np.searchsorted(dense.bins.core_edges, edges[-1] - 1e-12)
    assert merged.sum() == counts[lo:hi].sum()


def test_zero_spike():
    flat = np.full(21, 100)
    assert not weights_view.zero_spike(flat)
    flat[10] = 10_000
    assert weights_view.zero_spike(flat)


def test_captions_follow_the_numbers(pair):
    dense, pruned = pair
    s = weights.summarize(dense)
    cap = weights_view.caption_all_params(dense)
    assert cap.startswith(f"{100 * s['frac_abs_lt_0.05']:.1f}% of Synthetic's")
    assert "No surviving weight changed value" in weights_view.caption_pruned(pruned, dense)
    moved_model = Synthetic(GROWING)
    with torch.no_grad():
        for block in moved_model.layers:
            W = block.down_proj.weight
            W[W.abs() < W.abs().median()] = 0
            W *= 1.05  # survivors updated, as SparseGPT does
    moved = weight_stats.weight_stats(moved_model, weight_stats.StatsConfig(chunk=4096), label="Synthetic",
                                      bins=dense.bins, info={"sparsity": 0.5, "method": "sparsegpt"})
    assert "changed value (they moved" in weights_view.caption_pruned(moved, dense)
    dist = weights.depth_distances(dense)
    assert "rises with depth" in weights_view.caption_layers(dense, dist)
    assert "rises with depth" in weights_view.caption_depth({"Synthetic": dist})
    assert weights_view.caption_components(dense).startswith("In Synthetic, embedding holds the most")


def test_claims_are_worded_by_the_data(pair):
    dense, pruned = pair
    near = weights_view.claim_near_zero([dense])
    frac = weights.summarize(dense)["frac_abs_lt_0.05"]
    assert ("holds for every model" in near) == (frac > 0.5)
    assert "holds for no model" in near or "holds for every" in near
    dist = {"Synthetic": weights.depth_distances(dense)}
    layers = weights_view.claim_layers([dense], dist)
    rising = weights.depth_table(dist).query("ρ > 0 and p < 0.05")
    assert (f"rises significantly with depth (Spearman, α = 0.05) in {len(rising)}") in layers
    assert "none of them arrives sparsified" in weights_view.claim_presparsified([dense])
    pruned.label = "Pruned"
    try:
        assert "prunable weights exactly zero, a sign of sparsification" in weights_view.claim_presparsified([pruned])
    finally:
        pruned.label = "Synthetic"
    assert "cannot confirm or refute" in weights_view.claim_presparsified([dense])


def test_the_claims_tables_hold_the_numbers_the_sentences_leave_out(pair):
    dense, _ = pair
    t = weights.claims_table([dense]).iloc[0]
    s = weights.summarize(dense)
    assert t["within ±0.05"] == s["frac_abs_lt_0.05"] and t["median |w|"] == s["abs_median"]
    assert t["exact zeros, prunable"] + t["exact zeros, elsewhere"] == s["exact_zeros"]
    d = weights.depth_table({"Synthetic": weights.depth_distances(dense)})
    assert (d["KS min"] <= d["KS max"]).all() and set(d.columns) >= {"ρ", "p", "farthest block"}


def test_a_sparsified_histogram_is_drawn_in_its_methods_colour(pair):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from lab_utils.presentation import style

    dense, pruned = pair
    for method in ("magnitude", "sparsegpt"):
        fig = weights_view.all_params_figure(pruned, dense=dense, method=method)
        patch = next(p for p in fig.axes[0].patches if p.get_label().endswith(f"after {method}"))
        assert to_hex(patch.get_facecolor(), keep_alpha=False) == style.method_color(method).lower()
        plt.close(fig)


def test_headlines_answer_the_three_claims_from_the_summary_table():
    import pandas as pd

    from lab_utils.presentation import weights_view
    summary = pd.DataFrame({"model": ["A", "B"], "frac_abs_lt_0.05": [0.7, 0.3],
                            "decoder_rho": [0.9, float("nan")], "decoder_p": [0.01, float("nan")],
                            "encoder_rho": [float("nan"), -0.2], "encoder_p": [float("nan"), 0.5],
                            "exact_zero_frac": [0.0, 0.002]})
    h = weights_view.headlines(summary)
    assert h["near_zero"] == "More than half lie within ±0.05 in 1 of 2 models."
    assert h["layers"] == "The distance grows significantly with depth in 1 of 2 block stacks: A decoder."
    assert "at most 0.20%" in h["presparsified"] and "(B)" in h["presparsified"]
