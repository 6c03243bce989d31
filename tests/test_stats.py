"""Streaming weight statistics against brute force on a synthetic model with known weights."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from lab_utils.experiments import weight_stats, weights
from lab_utils.presentation import weights_view


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)
        self.up_proj = nn.Linear(width, 2 * width)
        self.down_proj = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)


class Config:
    is_encoder_decoder = False
    architectures = ["SyntheticForCausalLM"]
    model_type = "llama"


class Synthetic(nn.Module):
    """A decoder stack whose block i has weights ~ N(0, stds[i]); the embedding
    (the largest tensor, as in a real model) is drawn like block 0, so the
    whole-model distribution sits near the first blocks."""

    def __init__(self, stds, width: int = 24, vocab: int = 1500, seed: int = 0, zeros: int = 0):
        super().__init__()
        self.config = Config()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in stds)
        self.final_norm = nn.LayerNorm(width)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.randn(vocab, width, generator=g) * stds[0])
            for block, std in zip(self.layers, stds, strict=True):
                for m in (block.q_proj, block.up_proj, block.down_proj):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                block.up_proj.bias.copy_(torch.randn(block.up_proj.bias.shape, generator=g) * std)
                block.norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=g))
            if zeros:  # exact zeros in known places
                self.layers[0].q_proj.weight.view(-1)[:zeros] = 0.0


def brute(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


GROWING = [0.02 * 1.35 ** i for i in range(8)]
EQUAL = [0.05] * 8
SMALL_CHUNKS = weight_stats.StatsConfig(chunk=4096, sample_size=20000)  # many chunks per tensor


@pytest.fixture(scope="module")
def growing():
    model = Synthetic(GROWING, zeros=37)
    return model, weight_stats.weight_stats(model, SMALL_CHUNKS, label="growing")


def test_param_table_classifies_every_tensor(growing):
    model, ws = growing
    t = ws.tensors
    assert t["numel"].sum() == sum(p.numel() for p in model.parameters())
    assert list(t.loc[t["block"] == 3, "component"].unique()) == ["attn.q", "mlp.up", "mlp.down", "norm"]
    assert set(t.loc[t["block"].isna(), "group"]) == {"embedding", "norm"}
    assert set(t.loc[t["kind"] == "bias", "group"]) == {"bias", "norm"}  # norm biases stay norms
    assert t.loc[t["prunable"], "kind"].eq("weight").all() and t["prunable"].sum() == 3 * 8


def test_counts_and_fractions_equal_brute_force(growing):
    model, ws = growing
    x = brute(model).double().numpy()
    s = weights.summarize(ws)
    assert s["params"] == x.size
    assert s["exact_zeros"] == int((x == 0).sum()) >= 37
    for t in weight_stats.SMALL:
        assert s[f"frac_abs_lt_{t:g}"] == np.count_nonzero(np.abs(x.astype(np.float32)) < t) / x.size
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-6, abs=1e-12)
    assert s["std"] == pytest.approx(x.std(), rel=1e-6)
    assert s["excess_kurtosis"] == pytest.approx(sps.kurtosis(x), rel=1e-5)
    assert s["skewness"] == pytest.approx(sps.skew(x), rel=1e-4, abs=1e-6)
    assert s["min"] == x.min() and s["max"] == x.max()


def test_moments_of_a_long_chunk_keep_their_digits():
    g = torch.Generator().manual_seed(1)
    x = 1.0 + 0.02 * torch.randn(1 << 21, generator=g) ** 3  # off-centre, heavy-tailed
    m = weight_stats.Moments.of(x)
    xd = x.double().numpy()
    assert m.mean == pytest.approx(xd.mean(), rel=1e-7)
    assert m.std == pytest.approx(xd.std(), rel=1e-5)
    assert m.kurtosis == pytest.approx(sps.kurtosis(xd), rel=1e-4)


def test_streaming_histogram_equals_one_histc_over_everything(growing):
    model, ws = growing
    x = brute(model)
    core, below, above = weights.core_histogram(ws)
    expected = torch.histc(x, ws.bins.core_bins, -ws.bins.core, ws.bins.core).long().numpy()
    assert np.array_equal(core, expected)
    assert below == int((x < -ws.bins.core).sum()) and above == int((x > ws.bins.core).sum())
    assert core.sum() + below + above == x.numel()
    assert above + below > 0  # the core quantile really cuts the tails
    # the coarse full-range histogram accounts for every value, tails exactly
    outer = weights.outer_histogram(ws)
    assert outer.sum() == x.numel()
    np_outer, _ = np.histogram(x.numpy(), ws.bins.outer_edges)
    # a value inside the core goes to the outer bin of its fine bin's centre:
    # at most one outer bin away, so the cumulative counts interleave
    c, e = np.cumsum(outer), np.cumsum(np_outer)
    assert np.all(c[1:] >= e[:-1]) and np.all(c[:-1] <= e[1:])
    assert np.abs(c - e).max() < 0.1 * x.numel()


def test_group_moments_merge_like_concatenation(growing):
    model, ws = growing
    mask = ws.mask(block=[2, 5])
    x = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                   if n.startswith(("layers.2.", "layers.5."))]).double().numpy()
    m = weights.group_moments(ws, mask)
    assert m.n == x.size
    assert m.std == pytest.approx(x.std(), rel=1e-6)
    assert m.kurtosis == pytest.approx(sps.kurtosis(x), rel=1e-5)


def test_sample_quantiles_are_close_to_exact(growing):
    model, ws = growing
    a = np.abs(brute(model).numpy())
    s = weights.summarize(ws)
    for key, q in (("abs_median", 0.5), ("abs_q90", 0.9)):
        # the sample's quantile has the rank of q +- a few sqrt(q(1-q)/n)
        rank = (a < s[key]).mean()
        assert abs(rank - q) < 4 * math.sqrt(q * (1 - q) / len(ws.sample)) + 1e-3
    assert len(ws.sample) == 20000


def test_ks_of_identical_and_disjoint_histograms():
    a = (np.array([0, 5, 5, 0]), 0, 0)
    assert weights.ks_binned(a, a) == 0
    assert weights.ks_binned((np.array([10, 0, 0, 0]), 0, 0), (np.array([0, 0, 0, 10]), 0, 0)) == 1
    with pytest.raises(weight_stats.StatsError):
        weights.binned_cdf(np.zeros(3, int), 0, 0)


def test_distance_rises_with_depth_when_std_grows(growing):
    _, ws = growing
    dist = weights.depth_distances(ws)
    assert list(dist["block"]) == list(range(8))
    corr = weights.depth_correlation(dist).iloc[0]
    assert corr["rho"] > 0.8 and corr["p"] < 0.05 and corr["significant"]
    assert dist["ks"].iloc[-1] > dist["ks"].iloc[0]
    text = weights_view.describe_correlation(corr["rho"], corr["p"], corr["n"])
    assert text.startswith("distance to the overall distribution rises with depth")


def test_no_significant_trend_when_std_is_equal():
    model = Synthetic(EQUAL, seed=3)
    ws = weight_stats.weight_stats(model, weight_stats.StatsConfig(chunk=4096, sample_size=5000), label="equal")
    corr = weights.depth_correlation(weights.depth_distances(ws)).iloc[0]
    assert corr["p"] > 0.05 and not corr["significant"]
    assert "no significant trend" in weights_view.describe_correlation(corr["rho"], corr["p"], corr["n"])


def test_spearman_p_is_exact_for_few_blocks():
    rho, p = weights.spearman([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 24)  # not significant with 4 blocks
    rho, p = weights.spearman(range(8), [1, 2, 3, 4, 5, 6, 8, 7])
    assert p < 0.01
    big = np.arange(30)
    rho, p = weights.spearman(big, big[::-1])
    assert rho == pytest.approx(-1.0) and p < 1e-6


def test_falling_trend_is_worded_as_falling():
    assert "falls with depth" in weights_view.describe_correlation(-0.9, 0.001, 10)
    assert "too few blocks" in weights_view.describe_correlation(float("nan"), float("nan"), 2)
    few = weights_view.describe_correlation(1.0, 2 / 24, 4)
    assert "rises with depth in rank order, but with only 4 blocks this is not significant" in few
    assert "exact p = 0.083" in few


def test_reuse_copies_unchanged_tensors_and_remeasures_pruned_ones(growing):
    model, dense = growing
    pruned = Synthetic(GROWING, zeros=37)
    with torch.no_grad():
        for block in pruned.layers:
            W = block.up_proj.weight
            W[W.abs() < W.abs().median()] = 0  # magnitude pruning of one prunable layer per block
    fresh = weight_stats.weight_stats(pruned, SMALL_CHUNKS, label="p", bins=dense.bins)
    reused = weight_stats.weight_stats(pruned, SMALL_CHUNKS, label="p", bins=dense.bins, reuse=dense)
    assert np.array_equal(fresh.core_counts, reused.core_counts)
    assert fresh.info["reused_tensors"] == 0
    assert reused.info["reused_tensors"] == int((~reused.tensors["prunable"]).sum()) > 0
    assert weights.summarize(fresh) == pytest.approx(weights.summarize(reused), rel=1e-9, nan_ok=True)
    x = brute(pruned)
    assert weights.summarize(reused)["exact_zeros"] == int((x == 0).sum())
    # removal only: no survivor moved to another bin
    assert weights.survivors_moved(reused, dense) == 0
    with torch.no_grad():
        for block in pruned.layers:
            W = block.down_proj.weight
            W[W != 0] *= 1.01  # what SparseGPT does to survivors (in miniature)
    moved = weight_stats.weight_stats(pruned, weight_stats.StatsConfig(chunk=4096), label="p",
                                      bins=dense.bins, reuse=dense)
    assert weights.survivors_moved(moved, dense) > 0.05


def test_magnitude_cut_is_the_sampled_quantile_of_prunable_weights(growing):
    model, ws = growing
    cut = weights.magnitude_cut(ws, 0.5)
    w = torch.cat([m.weight.detach().reshape(-1).abs() for b in model.layers
                   for m in (b.q_proj, b.up_proj, b.down_proj)])
    assert abs((w < cut).float().mean().item() - 0.5) < 0.02


def test_levels_per_block_tells_4bit_from_float():
    model = Synthetic(EQUAL[:2])
    assert weights.levels_per_block(model, rows=8)["max_levels"] > 16
    with torch.no_grad():  # 16 levels per group of 32 weights of a row, like GGUF Q4_1
        for b in model.layers:
            g = b.down_proj.weight[:, :32]  # (the only layer with rows of >= 32 weights)
            lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
            g.copy_(lo + torch.round((g - lo) / (hi - lo) * 15) * (hi - lo) / 15)
    assert weights.levels_per_block(model, rows=8)["max_levels"] <= 16
    levels = weights.levels_per_block(model)  # every row
    assert levels["max_levels"] <= 16 and levels["fraction_on_4bit_grid"] == 1


def test_nested_peak_memory_probes_keep_the_outer_mark(monkeypatch):
    # The kernel's readings scripted, so that the bookkeeping is tested, not the machine (the
    # real probes are measured by benchmarks/bench_stats.py): the inner probe resets the mark,
    # so the outer one must take the mark reached before it (300) and not the later one (160).
    from lab_utils.core.measure import PeakMemory

    marks = iter([100, 300, 150, 160])  # outer enter, inner enter, inner exit, outer exit
    monkeypatch.setattr(PeakMemory, "_vmhwm", staticmethod(lambda: next(marks)))
    monkeypatch.setattr(PeakMemory, "_reset_vmhwm", staticmethod(lambda: None))
    monkeypatch.setattr(PeakMemory, "rss", staticmethod(lambda: 50))
    with PeakMemory() as outer, PeakMemory() as inner:
        pass
    assert (inner.start, inner.peak, outer.peak, outer.end) == (50, 150, 300, 50)
    assert PeakMemory._open == []


def test_the_pass_reads_views_of_one_chunk_and_copies_no_tensor(monkeypatch):
    # Fixed memory, counted rather than measured: every piece a worker gets is a view into its
    # parameter's storage (no copy of a whole tensor) of at most `chunk` values.
    model = Synthetic(EQUAL[:2])
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, real = [], weight_stats._chunk_stats
    monkeypatch.setattr(weight_stats, "_chunk_stats",
                        lambda part, *a: seen.append(part) or real(part, *a))
    config = weight_stats.StatsConfig(chunk=1000, sample_size=100)
    weight_stats.weight_stats(model, config)
    assert sum(p.numel() for p in seen) == sum(p.numel() for p in model.parameters())
    assert max(p.numel() for p in seen) == 1000
    assert all(p.untyped_storage().data_ptr() in storages for p in seen)


def test_bad_input_is_one_clear_error():
    with pytest.raises(weight_stats.StatsError, match="chunk"):
        weight_stats.StatsConfig(chunk=0)
    with pytest.raises(weight_stats.StatsError, match="chunk"):
        weight_stats.StatsConfig(chunk=True)
    with pytest.raises(weight_stats.StatsError, match="core"):
        weight_stats.BinSpec(core=2.0, outer=1.0)
    with pytest.raises(weight_stats.StatsError, match="level"):
        ws = weight_stats.weight_stats(Synthetic(EQUAL[:2]), weight_stats.StatsConfig(sample_size=100))
        weights.depth_distances(ws, level="row")


def test_tiny_whisper_has_both_stacks_and_every_component():
    from tiny_models import build_tiny

    ws = weight_stats.weight_stats(build_tiny("whisper"), weight_stats.StatsConfig(sample_size=2000), label="tiny")
    groups = set(ws.tensors["group"])
    assert {"attn.q", "xattn.q", "mlp.up", "embedding", "norm", "bias", "conv"} <= groups
    dist = weights.depth_distances(ws)
    assert set(dist["side"]) == {"encoder", "decoder"}
    row = weights.model_summary(ws, dist)
    assert row["encoder_blocks"] == 2 and row["decoder_blocks"] == 2


def test_model_stats_are_cached_exactly_and_rebuilt_when_damaged(tiny_dirs, tmp_cache, monkeypatch):
    name = str(tiny_dirs["llama"])
    first = weights.model_stats(name)
    calls = []
    real = weights.measure_model
    monkeypatch.setattr(weights, "measure_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = weights.model_stats(name)
    assert calls == []  # read back, not measured
    assert again.label == first.label and again.bins == first.bins and again.info == first.info
    for k in weight_stats._ARRAYS:
        assert np.array_equal(getattr(again, k), getattr(first, k)) and getattr(again, k).dtype == getattr(first, k).dtype
    assert again.tensors.equals(first.tensors)
    [entry] = list((tmp_cache / "steps").glob("weight-stats-*.npz"))
    entry.write_bytes(entry.read_bytes()[:-10])  # truncated: fails its checksum
    weights.model_stats(name)
    assert calls == [1]
