"""Notebook 02's tables of whole models' weight statistics: is most of a model
close to zero, and do higher layers deviate from the overall distribution?
Each model is loaded (or pruned), measured by the streaming pass of
:mod:`lab_utils.experiments.weight_stats`, cached and let go; every table here
is derived from the statistics alone. Figures and sentences live in
:mod:`lab_utils.presentation.weights_view`.

A layer's distance to the whole model is the Kolmogorov-Smirnov statistic on
the shared core bin edges (:func:`ks_binned`): at most the true KS and below it
by at most one fine bin's mass, bounded in [0, 1], and not dominated by values
beyond the core (Wasserstein-1 would be driven by a few layer-norm weights near 10).
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils.core import files, memo
from lab_utils.core.measure import PeakMemory, release_freed_memory
from lab_utils.core.models import load_model, prunable_layers
from lab_utils.engine import checkpoints
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments.weight_stats import (
    DEFAULT_STATS,
    GROUP_ORDER,
    SMALL,
    BinSpec,
    Moments,
    StatsConfig,
    StatsError,
    WeightStats,
    merge_moments,
    parameters,
    stats_bytes,
    stats_from_bytes,
    weight_stats,
)

ALPHA = 0.05  # significance level of a depth correlation


# --------------------------------------------------------------------------- summaries
def group_moments(ws: WeightStats, mask: np.ndarray | None = None) -> Moments:
    rows = ws.tensors if mask is None else ws.tensors[mask]
    return merge_moments(Moments(int(r.numel), r.mean, r.m2, r.m3, r.m4)
                         for r in rows.itertuples() if r.numel)


def sample_of(ws: WeightStats, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is None:
        return ws.sample
    return ws.sample[np.asarray(mask)[ws.sample_owner]]


def summarize(ws: WeightStats, mask: np.ndarray | None = None) -> dict:
    """The headline numbers of the whole model (or of the rows in ``mask``)."""
    rows = ws.tensors if mask is None else ws.tensors[mask]
    n = int(rows["numel"].sum())
    mom = group_moments(ws, mask)
    s = np.abs(sample_of(ws, mask))
    qs = np.quantile(s, [0.5, 0.9, 0.99, 0.999]) if len(s) else [float("nan")] * 4
    out = {"params": n, "tensors": len(rows)}
    for t, key in zip(SMALL, ("lt_1e-3", "lt_1e-2", "lt_5e-2"), strict=True):
        out[f"frac_abs_lt_{t:g}"] = int(rows[key].sum()) / n if n else float("nan")
    out["exact_zeros"] = int(rows["zeros"].sum())
    out["exact_zero_frac"] = out["exact_zeros"] / n if n else float("nan")
    out["zero_rows"] = int(rows["zero_rows"].sum())
    out["zero_cols"] = int(rows["zero_cols"].sum())
    out.update(mean=mom.mean, std=mom.std, skewness=mom.skewness, excess_kurtosis=mom.kurtosis,
               min=float(rows["min"].min()) if n else float("nan"),
               max=float(rows["max"].max()) if n else float("nan"),
               abs_median=float(qs[0]), abs_q90=float(qs[1]), abs_q99=float(qs[2]),
               abs_q999=float(qs[3]))
    return out


def group_table(ws: WeightStats, by: str = "group") -> pd.DataFrame:
    """:func:`summarize` per value of the ``by`` column (group, component, name)."""
    rows = [{by: key, **summarize(ws, ws.tensors.index.isin(part.index))}
            for key, part in ws.tensors.groupby(by, sort=False, dropna=False)]
    out = pd.DataFrame(rows)
    if by == "group" and len(out):
        order = {g: i for i, g in enumerate(GROUP_ORDER)}
        out = out.sort_values("group", key=lambda s: s.map(lambda g: order.get(g, len(order))))
    out["share"] = out["params"] / ws.n
    return out.reset_index(drop=True)


def magnitude_cut(ws: WeightStats, sparsity_ratio: float) -> float:
    """The |w| below which ``sparsity_ratio`` of the prunable weights lie (in the
    seeded sample): the cut of global magnitude pruning (per-layer cuts scatter around it)."""
    s = np.abs(sample_of(ws, ws.mask(prunable=True)))
    if not len(s):
        raise StatsError("no sampled prunable weights: the model has no prunable layers")
    return float(np.quantile(s, sparsity_ratio))


# --------------------------------------------------------------------------- histograms
def core_histogram(ws: WeightStats, mask: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """(counts over the core edges, count below, count above) of a group."""
    m = slice(None) if mask is None else np.asarray(mask)
    return (ws.core_counts[m].sum(axis=0), int(ws.core_below[m].sum()),
            int(ws.core_above[m].sum()))


def outer_histogram(ws: WeightStats, mask: np.ndarray | None = None) -> np.ndarray:
    m = slice(None) if mask is None else np.asarray(mask)
    return ws.outer_counts[m].sum(axis=0)


def binned_cdf(counts: np.ndarray, below: int, above: int) -> np.ndarray:
    """F at every core edge: the fraction of values left of the edge."""
    n = int(counts.sum()) + below + above
    if n == 0:
        raise StatsError("empty histogram: no values to build a distribution from")
    return np.concatenate([[below], below + np.cumsum(counts)]) / n


def ks_binned(a: tuple[np.ndarray, int, int], b: tuple[np.ndarray, int, int]) -> float:
    """Kolmogorov-Smirnov distance of two histograms on the same edges, at those edges."""
    return float(np.max(np.abs(binned_cdf(*a) - binned_cdf(*b))))


# --------------------------------------------------------------------------- depth
def depth_distances(ws: WeightStats, level: str = "block") -> pd.DataFrame:
    """KS distance of each block (``level='block'``: every parameter in it) or
    each tensor inside a block (``level='tensor'``) to the whole model."""
    if level not in ("block", "tensor"):
        raise StatsError(f"level {level!r}: use 'block' or 'tensor'")
    overall = core_histogram(ws)
    df = ws.tensors
    inside = df[df["block"].notna()]
    rows = []
    if level == "block":
        for (side, block), part in inside.groupby(["side", "block"], sort=False):
            mask = df.index.isin(part.index)
            rows.append({"side": side, "block": int(block), "params": int(part["numel"].sum()),
                         "ks": ks_binned(core_histogram(ws, mask), overall)})
    else:
        for i, r in inside.iterrows():
            mask = df.index == i
            rows.append({"side": r.side, "block": int(r.block), "name": r["name"],
                         "component": r.component, "params": int(r.numel),
                         "ks": ks_binned(core_histogram(ws, mask), overall)})
    out = pd.DataFrame(rows)
    if len(out):
        n_blocks = out.groupby("side")["block"].transform("max") + 1
        out["depth"] = (out["block"] + 0.5) / n_blocks  # 0..1 within its stack
    return out


EXACT_N = 8  # up to this many points the p-value enumerates all n! orderings


def spearman(x, y) -> tuple[float, float]:
    """(rho, two-sided p). Up to :data:`EXACT_N` points the p-value is exact:
    the share of all n! orderings of y whose |rho| is at least as large (with
    4 blocks, a perfect rho = 1 has p = 2/24 = 0.083, where scipy's t
    approximation would print 0). Beyond that, scipy's t approximation.
    NaN when fewer than 3 points or a constant input."""
    from itertools import permutations

    from scipy import stats as sps

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan")
    res = sps.spearmanr(x, y)
    rho = float(res.statistic)
    if n > EXACT_N:
        return rho, float(res.pvalue)
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    perms = ry[np.array(list(permutations(range(n))))]
    rx_c = rx - rx.mean()
    pc = perms - perms.mean(axis=1, keepdims=True)
    rhos = (pc @ rx_c) / (np.sqrt((pc ** 2).sum(axis=1)) * np.sqrt((rx_c ** 2).sum()))
    return rho, float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


def depth_correlation(distances: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of distance against block index, per side."""
    rows = []
    for side, part in distances.groupby("side", sort=False):
        rho, p = spearman(part["block"], part["ks"])
        rows.append({"side": side, "n": len(part), "rho": rho, "p": p,
                     "significant": bool(p < ALPHA) if not math.isnan(p) else False})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- storage precision
FOUR_BIT_LEVELS = 16  # distinct values a 4-bit code can take


@torch.no_grad()
def levels_per_block(model: nn.Module, block: int = 32, rows: int | None = None, seed: int = 0) -> dict:
    """Distinct values in each run of ``block`` weights of a row, over every
    prunable layer (``rows``: that many rows per layer, drawn with ``seed``):
    ``max_levels`` (the most in any block) and ``fraction_on_4bit_grid``
    (blocks with at most 16; nan if none). A 4-bit block format (GGUF's Q4_1:
    32 weights on 16 levels) has at most 16; fp16/fp32 weights about ``block``."""
    g = torch.Generator().manual_seed(seed)
    worst = on_grid = blocks = 0
    for pl in prunable_layers(model):
        W = pl.weight
        cols = (W.shape[1] // block) * block
        if cols == 0:
            continue
        if rows is not None:
            W = W[torch.randperm(W.shape[0], generator=g)[:rows]]
        groups = W[:, :cols].reshape(-1, block).sort(dim=1).values
        levels = 1 + torch.count_nonzero(groups[:, 1:] != groups[:, :-1], dim=1)
        worst = max(worst, int(levels.max()))
        on_grid += int((levels <= FOUR_BIT_LEVELS).sum())
        blocks += levels.numel()
    return {"group_size": block, "max_levels": worst,
            "fraction_on_4bit_grid": on_grid / blocks if blocks else float("nan")}


def model_stats(name: str, prune: PruneConfig | None = None, config: StatsConfig = DEFAULT_STATS, *,
                bins: BinSpec | None = None, reuse: WeightStats | None = None,
                cache: bool = True) -> WeightStats:
    """:func:`measure_model`, cached once per arguments and code version as a
    checksummed .npz (a damaged entry is recomputed). Not :mod:`~lab_utils.core.memo`'s
    JSON, so the key is built here from the arguments (``reuse`` only saves time)."""
    key = memo.key_value({"name": name, "prune": prune, "config": config, "bins": bins})
    path = memo.step_path("weight-stats", key).with_suffix(".npz")
    if cache:
        data = files.read_checked(path)
        if data is not None:
            try:
                return stats_from_bytes(data)
            except (ValueError, KeyError, OSError):
                pass  # unreadable despite its checksum (another version's layout): recompute
    ws = measure_model(name, prune, config, bins=bins, reuse=reuse)
    if cache:
        files.write_checked(path, stats_bytes(ws))
    return ws


def measure_model(name: str, prune: PruneConfig | None = None, config: StatsConfig = DEFAULT_STATS, *,
                  bins: BinSpec | None = None, reuse: WeightStats | None = None) -> WeightStats:
    """Load (or prune with ``prune``, through :func:`~lab_utils.engine.checkpoints.pruned_model`)
    one model, stream its statistics, and let the model go. ``info`` records the
    model's family, source, size in memory, storage precision, the process's
    resident memory before and at its peak, and a pruned model's engine report.
    For a pruned model pass the dense statistics as ``reuse`` (and their bins)."""
    sparsity = prune.sparsity if prune is not None else 0.0
    with PeakMemory() as mem:
        if sparsity > 0:
            # A missing Wanda/SparseGPT checkpoint is built in a child process:
            # calibration activations are the engine's memory, not this step's
            # (the engine's peak is reported next to this step's).
            lm, report = checkpoints.pruned_model(name, prune, separate_process=True)
        else:
            lm, report = load_model(name), None
        model = lm.model
        params = parameters(model)
        info = {"name": name, "family": lm.spec.family, "source": lm.spec.source,
                "note": lm.spec.preset.note if lm.spec.preset else "",
                "model_bytes": sum(p.numel() * p.element_size() for p in params),
                "levels_per_block": levels_per_block(model, rows=8, seed=config.seed)["max_levels"],
                "sparsity": float(sparsity), "method": prune.method if sparsity > 0 else None}
        if report is not None:
            info.update(actual_sparsity=report.actual_sparsity,
                        actual_sparsity_total=report.actual_sparsity_total,
                        from_cache=report.from_cache, prune_seconds=report.seconds,
                        prune_peak_bytes=report.peak_memory_bytes)
        del params
        ws = weight_stats(model, config, label=lm.label, bins=bins, info=info, reuse=reuse)
        del lm, model
        gc.collect()
        release_freed_memory()
    ws.info.update(rss_before=mem.start, rss_peak=mem.peak, rss_after=mem.end)
    return ws


def survivors_moved(pruned: WeightStats, dense: WeightStats) -> float:
    """Lower bound on the fraction of surviving prunable weights whose value
    changed: mass that *arrived* in a fine bin (beyond what the dense model had
    there) divided by the survivors. Removing weights (magnitude, Wanda,
    random) only takes mass away, so this is 0; SparseGPT's updates move
    survivors between bins (width ~1e-4), so it is positive. The centre bin,
    where the pruned zeros land, is left out."""
    if pruned.bins != dense.bins:
        raise StatsError("pruned and dense statistics need the same bins: pass bins=dense.bins")
    mp, md = pruned.mask(prunable=True), dense.mask(prunable=True)
    p, d = pruned.core_counts[mp].sum(axis=0), dense.core_counts[md].sum(axis=0)
    centre = len(p) // 2
    arrived = np.clip(p - d, 0, None)
    arrived[centre] = 0
    survivors = int(pruned.tensors.loc[mp, "numel"].sum() - pruned.tensors.loc[mp, "zeros"].sum())
    return float(arrived.sum() / survivors) if survivors else float("nan")


def model_summary(ws: WeightStats, distances: pd.DataFrame | None = None) -> dict:
    """One row of the per-model numbers table: summary + depth correlation."""
    row = {"model": ws.label, **{k: ws.info.get(k) for k in ("family", "sparsity", "method")
                                  if k in ws.info}}
    row.update(summarize(ws))
    row["prunable_params"] = int(ws.tensors.loc[ws.tensors["prunable"], "numel"].sum())
    distances = depth_distances(ws) if distances is None else distances
    for r in depth_correlation(distances).itertuples():
        ks = distances.loc[distances["side"] == r.side, "ks"]
        row.update({f"{r.side}_blocks": r.n, f"{r.side}_ks_first": float(ks.iloc[0]),
                    f"{r.side}_ks_last": float(ks.iloc[-1]),
                    f"{r.side}_rho": r.rho, f"{r.side}_p": r.p})
    return row


def models_table(all_stats) -> pd.DataFrame:
    """The models measured: family, source, parameters, prunable, size in memory, storage."""
    rows = []
    for ws in all_stats:
        rows.append({"model": ws.label, "family": ws.info.get("family"),
                     "source": ws.info.get("source"), "parameters": ws.n,
                     "prunable": int(ws.tensors.loc[ws.tensors["prunable"], "numel"].sum()),
                     "MiB in memory": ws.info.get("model_bytes", 0) / 2 ** 20,
                     "distinct values per 32 weights": ws.info.get("levels_per_block")})
    return pd.DataFrame(rows)


NEAR = 0.05  # "close to 0": |w| < 0.05, the scale of the original lab's GPT-2 histogram


def prunable_zeros(ws: WeightStats) -> tuple[int, int, int]:
    """(exact zeros in the prunable weights, their number, exact zeros elsewhere)."""
    mp = ws.mask(prunable=True)
    return (int(ws.tensors.loc[mp, "zeros"].sum()), int(ws.tensors.loc[mp, "numel"].sum()),
            int(ws.tensors.loc[~mp, "zeros"].sum()))


def claims_table(all_stats) -> pd.DataFrame:
    """One row per model: the numbers behind claims 1 and 3 and under each
    model's histogram (fractions as fractions; the write-up formats them)."""
    rows = []
    for ws in all_stats:
        s = summarize(ws)
        z, n, other = prunable_zeros(ws)
        rows.append({"model": ws.label, "parameters": int(ws.n),
                     "within ±0.001": s["frac_abs_lt_0.001"], "within ±0.01": s["frac_abs_lt_0.01"],
                     f"within ±{NEAR:g}": s[f"frac_abs_lt_{NEAR:g}"], "median |w|": s["abs_median"],
                     "std": s["std"], "excess kurtosis": s["excess_kurtosis"],
                     "exact zeros, prunable": z, "exact zero fraction, prunable": z / n if n else 0.0,
                     "exact zeros, elsewhere": other, "all-zero rows": int(ws.tensors["zero_rows"].sum()),
                     "most distinct values in 32 weights": ws.info.get("levels_per_block")})
    return pd.DataFrame(rows)


def depth_table(distances: dict) -> pd.DataFrame:
    """One row per block stack (a model's decoder or encoder): the range of its
    blocks' KS distances to the whole model, the farthest block, and the
    Spearman correlation of distance with depth."""
    rows = []
    for label, dist in distances.items():
        for r in depth_correlation(dist).itertuples():
            part = dist[dist["side"] == r.side]
            far = part.loc[part["ks"].idxmax()]
            rows.append({"model": label, "stack": r.side, "blocks": int(r.n), "KS min": part["ks"].min(),
                         "KS max": part["ks"].max(), "farthest block": int(far.block), "ρ": r.rho, "p": r.p,
                         "p exact": r.n <= EXACT_N})
    return pd.DataFrame(rows)


def memory_table(all_stats) -> pd.DataFrame:
    """Resident memory around each model's load-measure-release step, against
    the size of the model's own parameters (the target: increase < 2x), and
    the pruning engine's peak for the calibrated checkpoints."""
    rows = []
    for ws in all_stats:
        i = ws.info
        if "rss_peak" not in i:
            continue
        size = i.get("model_bytes", 0)
        rows.append({"model": ws.label, "sparsity": i.get("sparsity", 0.0), "method": i.get("method"),
                     "model MiB": size / 2 ** 20, "RSS before MiB": i["rss_before"] / 2 ** 20,
                     "RSS peak MiB": i["rss_peak"] / 2 ** 20,
                     "increase MiB": (i["rss_peak"] - i["rss_before"]) / 2 ** 20,
                     "increase / model": (i["rss_peak"] - i["rss_before"]) / size if size else float("nan"),
                     # the engine's own peak while it pruned (in a child process for
                     # Wanda/SparseGPT, or in an earlier run that cached them): nan if dense
                     "pruning peak MiB": i["prune_peak_bytes"] / 2 ** 20 if i.get("prune_peak_bytes")
                     else float("nan")})
    return pd.DataFrame(rows)
