"""Weight statistics that stream over a model's parameters, one chunk at a time.

The seed draws a histogram of *all* parameters and concludes that most are
close to zero and that higher layers deviate from the overall distribution.
Measuring that on GPT-2 medium (355M floats) or anything bigger must not put
every weight into one array, so every number here is accumulated tensor by
tensor, in flat chunks of at most :data:`CHUNK` values:

* counts (exact zeros, ``|w| < 1e-3, 1e-2, 5e-2``) by comparison;
* mean, std, skewness and kurtosis from central moments per chunk, merged
  across chunks and tensors with Pébay's pairwise update in float64, so a
  norm weight near 1 and an embedding near 0 combine without cancellation;
* histograms with ``torch.histc`` on bin edges fixed for the whole model: a
  fine *core* histogram over ``[-core, core]`` (core = the 99.99% quantile of
  ``|w|``), with the counts below and above it, and a coarse *outer* one over
  the full range ``[-max|w|, max|w|]`` for the tails (the values beyond the
  core are binned exactly; those inside go to the outer bin of their fine
  bin's centre, which saves a second pass of ``histc`` over every value). Bin counts are odd, so
  zero sits in the middle of a bin and the spike of exact zeros is one bar.
  Histograms of a layer, a block or a component are sums of per-tensor rows;
* quantiles from a seeded sample (with replacement, allocated to tensors in
  proportion to their size): :data:`SAMPLE_SIZE` values give a quantile's rank
  to within about ``sqrt(q (1 - q) / n)``, i.e. +/-0.05% at the median.

Distance of a layer to the whole-model distribution is the Kolmogorov-Smirnov
statistic ``max |F_layer - F_model|`` evaluated on the shared core bin edges
(:func:`ks_binned`). It is exact at those edges, so it is at most the true KS
and below it by at most the mass of one fine bin; it is bounded in [0, 1],
needs no choice of scale, and values beyond the core range cannot dominate it
(Wasserstein-1 would be driven by a few layer-norm weights near 10).

Everything returns dataclasses or pandas tables; figures live in
:mod:`lab_utils.viz`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils.models import component_of, prunable_layers, transformer_blocks

CHUNK = 1 << 20  # values per chunk: each worker's temporaries stay near 4 MB each
SMALL = (1e-3, 1e-2, 5e-2)  # thresholds of the "near zero" fractions (strict |w| < t)
CORE_BINS = 8193  # odd: zero is the centre of a bin
OUTER_BINS = 2049
SAMPLE_SIZE = 1 << 20
CORE_QUANTILE = 0.9999  # the fine histogram covers |w| up to this quantile
ALPHA = 0.05  # significance level used when wording a correlation

# Display order of the parameter groups (weights by component, then the rest).
GROUP_ORDER = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
               "xattn.q", "xattn.k", "xattn.v", "xattn.o",
               "mlp.gate", "mlp.up", "mlp.down",
               "embedding", "conv", "pooler", "head", "other", "norm", "bias")


class StatsError(ValueError):
    """Bad input to a statistic, in one line naming the fix."""


# --------------------------------------------------------------------------- moments
@dataclass(frozen=True)
class Moments:
    """Count, mean and central moment sums M2..M4 (sum of (x - mean)^k)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        """Moments of one chunk: deviations from the chunk's mean, summed by
        torch (cascade summation for the sum, BLAS dot products for the third
        and fourth powers: no temporaries, ~3x faster than ``(d2 * d).sum()``
        and far faster than float64 on CPU); chunks then merge in float64."""
        x = x.reshape(-1)
        n = x.numel()
        if n == 0:
            return cls()
        mean = float(x.sum()) / n
        d = x - mean
        d2 = d * d
        return cls(n, mean, float(d2.sum()), float(torch.dot(d2, d)), float(torch.dot(d2, d2)))

    def merge(self, other: Moments) -> Moments:
        """Pébay (2008) pairwise update: exact in exact arithmetic, stable in float64."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        na, nb = self.n, other.n
        n = na + nb
        delta = other.mean - self.mean
        d_n = delta / n
        mean = self.mean + d_n * nb
        m2 = self.m2 + other.m2 + delta * d_n * na * nb
        m3 = (self.m3 + other.m3 + delta * d_n * d_n * na * nb * (na - nb)
              + 3 * d_n * (na * other.m2 - nb * self.m2))
        m4 = (self.m4 + other.m4 + delta * d_n ** 3 * na * nb * (na * na - na * nb + nb * nb)
              + 6 * d_n * d_n * (na * na * other.m2 + nb * nb * self.m2)
              + 4 * d_n * (na * other.m3 - nb * self.m3))
        return Moments(n, mean, m2, m3, m4)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0)."""
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")

    @property
    def skewness(self) -> float:
        return (math.sqrt(self.n) * self.m3 / self.m2 ** 1.5) if self.m2 > 0 else float("nan")

    @property
    def kurtosis(self) -> float:
        """Excess (Fisher) kurtosis: 0 for a normal distribution, > 0 for heavy tails."""
        return (self.n * self.m4 / (self.m2 * self.m2) - 3.0) if self.m2 > 0 else float("nan")


def merge_moments(parts) -> Moments:
    total = Moments()
    for m in parts:
        total = total.merge(m)
    return total


# --------------------------------------------------------------------------- bins
@dataclass(frozen=True)
class BinSpec:
    """Bin edges shared by every tensor of a model (and by its pruned versions,
    so dense and sparse histograms can be compared bar by bar)."""

    core: float  # the fine histogram covers [-core, core]
    outer: float  # the coarse one covers [-outer, outer]
    core_bins: int = CORE_BINS
    outer_bins: int = OUTER_BINS

    def __post_init__(self):
        if not (self.core > 0 and self.outer >= self.core):
            raise StatsError(f"bins need 0 < core <= outer, got core={self.core}, outer={self.outer}")

    @property
    def core_edges(self) -> np.ndarray:
        return np.linspace(-self.core, self.core, self.core_bins + 1)

    @property
    def outer_edges(self) -> np.ndarray:
        return np.linspace(-self.outer, self.outer, self.outer_bins + 1)

    @property
    def core_width(self) -> float:
        return 2 * self.core / self.core_bins


def _centres(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:]) / 2


# --------------------------------------------------------------------------- the parameter table
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _side_of(name: str) -> str:
    parts = name.split(".")
    for side in ("encoder", "decoder"):
        if side in parts:
            return side
    return ""


def param_table(model: nn.Module) -> pd.DataFrame:
    """One row per parameter tensor (tied tensors once), in module order.

    Columns: name, side, block (None outside the transformer blocks),
    component (``attn.q`` ... ``mlp.down``, ``embedding``, ``norm``, ``conv``,
    ``pooler``, ``head``, ``other``), kind (``weight``/``bias``/...), group (the component
    for weights, ``bias`` for the biases of linear and conv layers, ``norm``
    for every norm parameter), numel, prunable (the weights that
    :func:`lab_utils.models.prunable_layers` would prune), ndim.
    """
    sides = transformer_blocks(model)
    prefixes = sorted(((prefix, side) for side, (prefix, _) in sides.items()),
                      key=lambda ps: -len(ps[0]))
    prunable = {id(pl.module.weight) for pl in prunable_layers(model)}
    rows, seen = [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            side, block, inner = _side_of(mname), None, None
            for prefix, s in prefixes:
                if mname.startswith(prefix + "."):
                    idx, _, inner = mname[len(prefix) + 1:].partition(".")
                    if idx.isdigit():
                        side, block = s, int(idx)
                    break
            if isinstance(module, nn.Embedding):
                component = "embedding"
            elif _is_norm(module):
                component = "norm"
            elif _is_linear(module):
                component = (component_of(inner) if block is not None
                             else "pooler" if "pooler" in mname else "head")
            elif isinstance(module, nn.Conv1d | nn.Conv2d):
                component = "conv"
            else:
                component = "other"
            group = component
            if pname == "bias" and component not in ("norm", "embedding"):
                group = "bias"
            rows.append({"name": f"{mname}.{pname}" if mname else pname, "side": side,
                         "block": block, "component": component, "kind": pname, "group": group,
                         "numel": p.numel(), "prunable": id(p) in prunable, "ndim": p.dim()})
    df = pd.DataFrame(rows)
    if len(df):
        df["block"] = df["block"].astype("Int64")
    return df


def _parameters(model: nn.Module) -> list[torch.Tensor]:
    """Parameters in the order of :func:`param_table` (tied tensors once)."""
    out, seen = [], set()
    for _, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# --------------------------------------------------------------------------- the streaming pass
@dataclass
class WeightStats:
    """Everything the figures and tables need, without the weights themselves.

    ``tensors`` has one row per parameter tensor (see :func:`param_table`)
    plus its counts and moments; the histogram arrays have one row per tensor,
    so any group's histogram is a sum of rows.
    """

    label: str
    bins: BinSpec
    tensors: pd.DataFrame
    core_counts: np.ndarray  # (tensors, core_bins) int64
    core_below: np.ndarray  # values < -core, per tensor
    core_above: np.ndarray  # values > core
    outer_counts: np.ndarray  # (tensors, outer_bins); values beyond +-outer are in outer_clipped
    outer_clipped: np.ndarray
    sample: np.ndarray  # float32 seeded sample of the values
    sample_owner: np.ndarray  # row of ``tensors`` each sample came from
    seed: int = 0
    info: dict = field(default_factory=dict)  # model name, family, source, note, sparsity, method ...

    @property
    def n(self) -> int:
        return int(self.tensors["numel"].sum())

    def mask(self, **where) -> np.ndarray:
        """Rows of ``tensors`` matching every ``column=value`` (a list/tuple = any of)."""
        m = np.ones(len(self.tensors), dtype=bool)
        for col, val in where.items():
            vals = val if isinstance(val, list | tuple | set) else [val]
            m &= self.tensors[col].isin(list(vals)).to_numpy(dtype=bool)
        return m


def _allocate(numels: list[int], total: int) -> list[int]:
    """Split ``total`` samples in proportion to the sizes (largest remainder,
    ties by position, so the split is deterministic)."""
    n = sum(numels)
    if n == 0:
        return [0] * len(numels)
    exact = [total * k / n for k in numels]
    base = [int(math.floor(e)) for e in exact]
    left = total - sum(base)
    order = sorted(range(len(numels)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return base


def default_bins(model: nn.Module, *, sample_size: int = SAMPLE_SIZE, seed: int = 0,
                 core_quantile: float = CORE_QUANTILE) -> BinSpec:
    """Edges from the data: the outer range is max |w| (exact, streamed); the
    core is the ``core_quantile`` of |w| in a seeded sample."""
    params = _parameters(model)
    if not params:
        raise StatsError("the model has no parameters")
    absmax = max(max(-float(lo), float(hi)) for lo, hi in
                 (torch.aminmax(p.detach()) for p in params if p.numel()))
    sample, _ = _sample(params, sample_size, seed)
    core = float(np.quantile(np.abs(sample), core_quantile)) if len(sample) else absmax
    outer = absmax if absmax > 0 else 1.0
    core = min(core, outer) if core > 0 else outer
    return BinSpec(core=core, outer=outer)


def _sample(params: list[torch.Tensor], sample_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    counts = _allocate([p.numel() for p in params], sample_size)
    values, owners = [], []
    for i, (p, k) in enumerate(zip(params, counts, strict=True)):
        if k == 0:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)  # one stream per tensor
        idx = torch.randint(p.numel(), (k,), generator=g)
        values.append(p.detach().reshape(-1)[idx].to(torch.float32).cpu().numpy())
        owners.append(np.full(k, i, dtype=np.int32))
    if not values:
        return np.zeros(0, np.float32), np.zeros(0, np.int32)
    return np.concatenate(values), np.concatenate(owners)


@dataclass
class _Chunk:
    """What one chunk contributes (merged in chunk order, so the result does
    not depend on which thread finished first)."""

    zeros: int
    small: tuple[int, int, int]
    core: np.ndarray
    below: int
    above: int
    tail: np.ndarray | None  # outer histogram of the values beyond the core
    clipped: int
    lo: float
    hi: float
    moments: Moments
    total: float  # sum and sum of squares: the fingerprint
    sumsq: float


@torch.no_grad()
def _chunk_stats(part: torch.Tensor, bins: BinSpec, device) -> _Chunk:
    x = part.to(device=device, dtype=torch.float32)
    n = x.numel()
    a = x.abs()
    # count_nonzero, not bool.sum(): the latter is ~7x slower on CPU
    small = tuple(int(torch.count_nonzero(a < t)) for t in SMALL)
    core = torch.histc(x, bins.core_bins, -bins.core, bins.core).to(torch.int64).cpu().numpy()
    tail = x[a > bins.core]  # rare (0.01% by construction): only these get an exact outer bin
    below = above = clipped = 0
    tail_hist = None
    if tail.numel():
        below, above = int(torch.count_nonzero(tail < 0)), int(torch.count_nonzero(tail > 0))
        tail_hist = torch.histc(tail, bins.outer_bins, -bins.outer, bins.outer).to(torch.int64).cpu().numpy()
        clipped = int(torch.count_nonzero(tail.abs() > bins.outer))
    lo, hi = torch.aminmax(x)
    total, sumsq = float(x.sum()), float(torch.dot(x, x))
    mom = Moments.of(x)
    return _Chunk(n - int(torch.count_nonzero(x)), small, core, below, above, tail_hist, clipped,
                  float(lo), float(hi), mom, total, sumsq)


def _fingerprint(flat: torch.Tensor, chunk: int, device) -> tuple[float, float]:
    total = sq = 0.0
    for part in flat.split(chunk):
        x = part.to(device=device, dtype=torch.float32)
        total += float(x.sum())
        sq += float(torch.dot(x, x))
    return total, sq


def _reusable(reuse: WeightStats, row, fingerprint) -> int | None:
    """Row of ``reuse`` holding the same, unchanged, non-prunable tensor."""
    if row["prunable"]:
        return None
    hit = np.flatnonzero(reuse.tensors["name"].to_numpy() == row["name"])
    if len(hit) != 1:
        return None
    r = reuse.tensors.iloc[hit[0]]
    same = (int(r.numel) == int(row["numel"]) and r["fp_sum"] == fingerprint[0]
            and r["fp_sumsq"] == fingerprint[1])
    return int(hit[0]) if same else None


@contextlib.contextmanager
def _one_thread_per_op():
    """Run torch ops on one thread each while the pass runs several at once:
    histc is serial anyway, and every sum then rounds the same way in every
    pass (so the fingerprints that ``reuse`` compares are reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Accumulator:
    """Per-tensor sums of chunk results, filled in chunk order."""

    def __init__(self, T: int, bins: BinSpec):
        self.core = np.zeros((T, bins.core_bins), np.int64)
        self.outer = np.zeros((T, bins.outer_bins), np.int64)
        self.below, self.above, self.clipped = (np.zeros(T, np.int64) for _ in range(3))
        self.cols = {k: np.zeros(T, np.int64) for k in ("zeros", "lt_1e-3", "lt_1e-2", "lt_5e-2",
                                                         "zero_rows", "zero_cols")}
        self.moments = [Moments()] * T
        self.lo, self.hi = np.full(T, np.inf), np.full(T, -np.inf)
        self.fp = np.zeros((T, 2))

    def add(self, i: int, c: _Chunk) -> None:
        self.cols["zeros"][i] += c.zeros
        for key, v in zip(("lt_1e-3", "lt_1e-2", "lt_5e-2"), c.small, strict=True):
            self.cols[key][i] += v
        self.core[i] += c.core
        self.below[i] += c.below
        self.above[i] += c.above
        self.clipped[i] += c.clipped
        if c.tail is not None:
            self.outer[i] += c.tail
        self.lo[i], self.hi[i] = min(self.lo[i], c.lo), max(self.hi[i], c.hi)
        self.moments[i] = self.moments[i].merge(c.moments)
        self.fp[i] += (c.total, c.sumsq)

    def copy_row(self, i: int, reuse: WeightStats, j: int) -> None:
        r = reuse.tensors.iloc[j]
        for k in self.cols:
            self.cols[k][i] = r[k]
        self.core[i], self.outer[i] = reuse.core_counts[j], reuse.outer_counts[j]
        self.below[i], self.above[i] = reuse.core_below[j], reuse.core_above[j]
        self.clipped[i] = reuse.outer_clipped[j]
        self.moments[i] = Moments(int(r.numel), r["mean"], r.m2, r.m3, r.m4)
        self.lo[i], self.hi[i] = r["min"], r["max"]


@torch.no_grad()
def weight_stats(model: nn.Module, *, label: str = "model", bins: BinSpec | None = None,
                 sample_size: int = SAMPLE_SIZE, seed: int = 0, chunk: int = CHUNK,
                 device: str | torch.device = "cpu", progress: bool = True,
                 info: dict | None = None, reuse: WeightStats | None = None,
                 workers: int | None = None) -> WeightStats:
    """Stream once over every parameter of ``model`` (tied tensors once).

    ``bins``: pass the dense model's :class:`BinSpec` when measuring a pruned
    copy, so the histograms share their edges. ``reuse``: the dense model's
    statistics; a tensor that is not prunable and whose fingerprint (sum and
    sum of squares, two cheap reductions) matches is copied from it instead of
    being measured again: pruning leaves embeddings and norms alone, and they
    are up to half of a small model. ``workers`` threads (default: torch's
    thread count) each take a chunk, because ``torch.histc`` runs on one core.
    Memory beyond the model: a few temporaries of one chunk per worker plus
    the per-tensor histograms.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise StatsError(f"chunk must be a positive integer, got {chunk!r}")
    table = param_table(model)
    params = _parameters(model)
    if not params:
        raise StatsError("the model has no parameters")
    if reuse is not None and bins is not None and reuse.bins != bins:
        raise StatsError("reuse needs the same bins: pass bins=reuse.bins")
    bins = bins or (reuse.bins if reuse is not None else
                    default_bins(model, sample_size=sample_size, seed=seed))
    acc = _Accumulator(len(params), bins)
    workers = max(1, workers or torch.get_num_threads())
    with _one_thread_per_op():
        todo = []
        for i, p in enumerate(params):
            j = None
            if reuse is not None and not table.iloc[i]["prunable"]:
                acc.fp[i] = _fingerprint(p.detach().reshape(-1), chunk, device)
                j = _reusable(reuse, table.iloc[i], acc.fp[i])
            if j is None:
                todo.append(i)
            else:  # unchanged since the dense pass: copy its row
                acc.copy_row(i, reuse, j)
        tasks = [(i, part) for i in todo for part in params[i].detach().reshape(-1).split(chunk)]
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(tasks), desc=f"stats {label}", disable=not progress, leave=False) as bar:
            for i, c in pool.map(lambda t: (t[0], _chunk_stats(t[1], bins, device)), tasks):
                acc.add(i, c)  # pool.map yields in task order: deterministic merging
                bar.update()
        for i in todo:
            p = params[i]
            # whole rows/columns of zeros (what structured pre-pruning leaves);
            # only possible when the tensor has at least a row's worth of zeros
            if p.dim() == 2 and acc.cols["zeros"][i] >= min(p.shape):
                z = p.detach() == 0
                acc.cols["zero_rows"][i] = int(torch.count_nonzero(z.all(dim=1)))
                acc.cols["zero_cols"][i] = int(torch.count_nonzero(z.all(dim=0)))
                del z
    # values inside the core go to the outer bin of their fine bin's centre (the
    # outer bins are >= 4 fine bins wide, so this moves nothing visibly)
    centre_to_outer = np.clip(np.floor((_centres(bins.core_edges) + bins.outer)
                                       / (2 * bins.outer) * bins.outer_bins), 0,
                              bins.outer_bins - 1).astype(np.int64)
    targets, starts = np.unique(centre_to_outer, return_index=True)  # monotone: runs of bins
    if todo:
        acc.outer[np.ix_(todo, targets)] += np.add.reduceat(acc.core[todo], starts, axis=1)
    for k, v in acc.cols.items():
        table[k] = v
    table["min"], table["max"] = acc.lo, acc.hi
    table["mean"] = [m.mean for m in acc.moments]
    table["m2"] = [m.m2 for m in acc.moments]
    table["m3"] = [m.m3 for m in acc.moments]
    table["m4"] = [m.m4 for m in acc.moments]
    table["fp_sum"], table["fp_sumsq"] = acc.fp[:, 0], acc.fp[:, 1]
    sample, owner = _sample(params, sample_size, seed)
    info = {**(info or {}), "reused_tensors": len(params) - len(todo)}
    return WeightStats(label, bins, table, acc.core, acc.below, acc.above, acc.outer,
                       acc.clipped, sample, owner, seed, info)


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
    """:func:`summarize` per group (``by``: group, component, side+block, name)."""
    keys = ["side", "block"] if by == "block" else [by]
    df = ws.tensors
    if by == "block":
        df = df[df["block"].notna()]
    rows = []
    for key, part in df.groupby(keys, sort=False, dropna=False):
        mask = ws.tensors.index.isin(part.index)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(keys, key, strict=True)), **summarize(ws, mask)})
    out = pd.DataFrame(rows)
    if by == "group" and len(out):
        order = {g: i for i, g in enumerate(GROUP_ORDER)}
        out = out.sort_values("group", key=lambda s: s.map(lambda g: order.get(g, len(order))))
    out["share"] = out["params"] / ws.n
    return out.reset_index(drop=True)


def magnitude_cut(ws: WeightStats, sparsity_ratio: float, prunable_only: bool = True) -> float:
    """The |w| below which ``sparsity_ratio`` of the (prunable) weights lie:
    the cut of global magnitude pruning (per-layer cuts scatter around it).
    From the seeded sample."""
    s = np.abs(sample_of(ws, ws.mask(prunable=True) if prunable_only else None))
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


# --------------------------------------------------------------------------- storage precision
@torch.no_grad()
def levels_per_block(model: nn.Module, block: int = 32, rows: int = 8, seed: int = 0) -> int:
    """Most distinct values found in any group of ``block`` consecutive weights
    of a few sampled rows of every prunable layer. GGUF Q4_1 stores 32 weights
    on 16 levels, so a 4-bit model gives <= 16; fp16/fp32 weights give ~32."""
    g = torch.Generator().manual_seed(seed)
    most = 0
    for pl in prunable_layers(model):
        W = pl.weight
        cols = (W.shape[1] // block) * block
        if cols == 0:
            continue
        pick = torch.randperm(W.shape[0], generator=g)[:rows]
        groups = W[pick, :cols].reshape(-1, block).sort(dim=1).values
        distinct = 1 + torch.count_nonzero(groups[:, 1:] != groups[:, :-1], dim=1)
        most = max(most, int(distinct.max()))
    return most


class RssPeak:
    """Peak resident memory of this process while the block runs, sampled
    every ``interval`` seconds by a thread (the kernel's high-water mark is
    not used: the pruning engine resets it for its own measurement)."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval = interval
        self.start = self.peak = self.end = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end = self.rss()
        self.peak = max(self.peak, self.end)
        return False


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS: glibc keeps them otherwise, and
    the next model's "before" would include this one's leftovers."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# --------------------------------------------------------------------------- the statistics cache
_ARRAYS = ("core_counts", "core_below", "core_above", "outer_counts", "outer_clipped", "sample",
           "sample_owner")


def stats_bytes(ws: WeightStats) -> bytes:
    """A WeightStats as one .npz (arrays, and its tables and info as JSON bytes):
    loaded back with ``allow_pickle=False``, so reading a cache runs no code."""
    import io as _io
    import json

    from lab_utils import memo

    meta = {"label": ws.label, "bins": [ws.bins.core, ws.bins.outer, ws.bins.core_bins, ws.bins.outer_bins],
            "tensors": memo.encode(ws.tensors), "seed": ws.seed, "info": memo.encode(ws.info)}
    buf = _io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{k: getattr(ws, k) for k in _ARRAYS})
    return buf.getvalue()


def stats_from_bytes(data: bytes) -> WeightStats:
    import io as _io
    import json

    from lab_utils import memo

    with np.load(_io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        arrays = {k: z[k] for k in _ARRAYS}
    core, outer, core_bins, outer_bins = meta["bins"]
    return WeightStats(label=meta["label"], bins=BinSpec(core, outer, core_bins, outer_bins),
                       tensors=memo.decode(meta["tensors"]), seed=meta["seed"],
                       info=memo.decode(meta["info"]), **arrays)


def model_stats(name: str, sparsity: float = 0.0, method: str | None = None, *,
                bins: BinSpec | None = None, reuse: WeightStats | None = None, seed: int = 0,
                progress: bool = True, sample_size: int = SAMPLE_SIZE, cache: bool = True,
                **prune_kw) -> WeightStats:
    """:func:`measure_model`, cached: the statistics of a model (and of each
    pruned version) are computed once per parameters and code version, and
    read back in a fraction of a second (checksummed; a damaged entry is
    recomputed)."""
    from lab_utils import io, memo

    key = {"name": name, "sparsity": float(sparsity), "method": method, "seed": seed,
           "sample_size": sample_size, "prune": prune_kw,
           "bins": None if bins is None else [bins.core, bins.outer, bins.core_bins, bins.outer_bins]}
    path = memo.step_path("weight-stats", key).with_suffix(".npz")
    if cache:
        data = io.read_checked(path)
        if data is not None:
            try:
                return stats_from_bytes(data)
            except (ValueError, KeyError, OSError):
                pass  # unreadable despite its checksum (another version's layout): recompute
    ws = measure_model(name, sparsity, method, bins=bins, reuse=reuse, seed=seed, progress=progress,
                       sample_size=sample_size, **prune_kw)
    if cache:
        io.write_checked(path, stats_bytes(ws))
    return ws


def measure_model(name: str, sparsity: float = 0.0, method: str | None = None, *,
                  bins: BinSpec | None = None, reuse: WeightStats | None = None, seed: int = 0,
                  progress: bool = True, sample_size: int = SAMPLE_SIZE, **prune_kw) -> WeightStats:
    """Load (or prune, through :func:`lab_utils.prune.pruned_model`) one model,
    stream its statistics, and let the model go: only the statistics stay.

    ``info`` records the family, source, preset note, in-memory size of the
    parameters, the distinct values per group of 32 weights (storage
    precision), the process's resident memory before and at its peak, and for
    a pruned model the engine's report (actual sparsity, cache hit). For a
    pruned model pass the dense statistics as ``reuse`` (and their bins).
    """
    import gc

    from lab_utils import prune

    with RssPeak() as mem:
        if float(sparsity) > 0:
            if method is None:
                raise StatsError(f"sparsity {sparsity}: name the method that pruned it, e.g. 'magnitude'")
            # A missing Wanda/SparseGPT checkpoint is built in a child process:
            # calibration activations are the engine's memory, not this step's
            # (the engine's peak is reported next to this step's).
            lm, report = prune.pruned_model(name, method, sparsity, seed=seed, progress=progress,
                                            separate_process=True, **prune_kw)
        else:
            from lab_utils.models import load_model

            lm, report = load_model(name), None
        model = lm.model
        params = _parameters(model)
        info = {"name": name, "family": lm.spec.family, "source": lm.spec.source,
                "note": lm.spec.preset.note if lm.spec.preset else "",
                "model_bytes": sum(p.numel() * p.element_size() for p in params),
                "levels_per_block": levels_per_block(model, seed=seed),
                "sparsity": float(sparsity), "method": method if float(sparsity) > 0 else None}
        if report is not None:
            info.update(actual_sparsity=report.actual_sparsity,
                        actual_sparsity_total=report.actual_sparsity_total,
                        from_cache=report.from_cache, prune_seconds=report.seconds,
                        prune_peak_bytes=report.peak_memory_bytes)
        del params
        ws = weight_stats(model, label=lm.label, bins=bins, seed=seed, progress=progress,
                          sample_size=sample_size, info=info, reuse=reuse)
        del lm, model
        gc.collect()
        _release_freed_memory()
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
        row[f"{r.side}_blocks"] = r.n
        row[f"{r.side}_ks_first"] = float(distances.loc[distances["side"] == r.side, "ks"].iloc[0])
        row[f"{r.side}_ks_last"] = float(distances.loc[distances["side"] == r.side, "ks"].iloc[-1])
        row[f"{r.side}_rho"] = r.rho
        row[f"{r.side}_p"] = r.p
    return row


def models_table(all_stats) -> pd.DataFrame:
    """The models measured: family, source, parameters, prunable, size in memory, storage."""
    rows = []
    for ws in all_stats:
        levels = ws.info.get("levels_per_block")
        rows.append({"model": ws.label, "family": ws.info.get("family"),
                     "source": ws.info.get("source"), "parameters": ws.n,
                     "prunable": int(ws.tensors.loc[ws.tensors["prunable"], "numel"].sum()),
                     "MiB in memory": ws.info.get("model_bytes", 0) / 2 ** 20,
                     "distinct values per 32 weights": levels})
    return pd.DataFrame(rows)


def save_csv(table: pd.DataFrame, name: str) -> Path:
    """Write a table to ``results/<name>`` atomically (the write-up reads it from there)."""
    from lab_utils import io

    return io.write_csv(table, io.results_dir() / name)


# --------------------------------------------------------------------------- the seed's claims
NEAR = 0.05  # "close to 0": |w| < 0.05, the scale of the seed's GPT-2 histogram
SIMILAR_KS = 0.1  # a block "looks like" the whole model when its KS distance is below this


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def claim_near_zero(all_stats) -> str:
    """The seed's "most parameters are close to 0", measured per model."""
    parts, holds = [], []
    for ws in all_stats:
        s = summarize(ws)
        frac = s[f"frac_abs_lt_{NEAR:g}"]
        holds.append(frac > 0.5)
        parts.append(f"{ws.label}: {_pct(frac)} within ±{NEAR:g} ({_pct(s['frac_abs_lt_0.01'])} within "
                     f"±0.01, median |w| {s['abs_median']:.3g}, excess kurtosis "
                     f"{s['excess_kurtosis']:.3g})")
    names = [ws.label for ws in all_stats]
    yes = [n for n, h in zip(names, holds, strict=True) if h]
    no = [n for n, h in zip(names, holds, strict=True) if not h]
    if not no:
        verdict = "The claim holds for every model measured"
    elif not yes:
        verdict = "The claim does not hold for any model measured"
    else:
        verdict = f"The claim holds for {', '.join(yes)} but not for {', '.join(no)}"
    return (f"**Claim 1, most parameters are close to 0.** Reading “close to 0” as |w| < {NEAR:g} "
            f"and “most” as more than half: {'; '.join(parts)}. {verdict}. A positive excess "
            f"kurtosis means more mass at the centre and in the tails than a normal distribution "
            f"of the same spread.")


def claim_layers(all_stats, distances: dict) -> str:
    """The seed's "each layer looks like the whole, higher layers deviate"."""
    parts = []
    for ws in all_stats:
        dist = distances[ws.label]
        for r in depth_correlation(dist).itertuples():
            part = dist[dist["side"] == r.side]
            worst = part.loc[part["ks"].idxmax()]
            similar = "all" if part["ks"].max() < SIMILAR_KS else "not all"
            parts.append(f"{ws.label} {r.side}: {similar} {r.n} blocks within KS {SIMILAR_KS:g} of the "
                         f"whole model (largest {worst.ks:.3f}, block {int(worst.block)}); "
                         f"{describe_correlation(r.rho, r.p, r.n)}")
    return ("**Claim 2, each layer looks like the whole model but higher layers deviate.** "
            "Distance is the Kolmogorov-Smirnov statistic between a block's parameters and all "
            "of the model's, on shared bins. " + ". ".join(parts) + ".")


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


PRESPARSIFIED = 0.01  # exact zeros in >= 1% of the prunable weights: sparsified before release


def claim_presparsified(all_stats) -> str:
    """The seed's "billion-parameter models come partly sparsified": what our
    models can and cannot say about it. Exact zeros are counted in the
    prunable weight matrices (what a developer's pruning would zero) and
    everywhere else (zero-initialized biases, padding rows) separately."""
    parts, flagged, biggest = [], [], 0
    for ws in all_stats:
        biggest = max(biggest, ws.n)
        mp = ws.mask(prunable=True)
        n_pr = int(ws.tensors.loc[mp, "numel"].sum())
        z_pr = int(ws.tensors.loc[mp, "zeros"].sum())
        z_other = int(ws.tensors.loc[~mp, "zeros"].sum())
        frac = z_pr / n_pr if n_pr else 0.0
        if frac >= PRESPARSIFIED:
            flagged.append(f"{ws.label} ({_pct(frac)})")
        rows = int(ws.tensors["zero_rows"].sum())
        parts.append(f"{ws.label} ({_count(ws.n)} parameters): {z_pr:,} exact zeros in the prunable "
                     f"weights = {_pct(frac, 4)}, {z_other:,} elsewhere, {rows} all-zero "
                     f"row{'s' if rows != 1 else ''}")
    if flagged:
        verdict = (f"{', '.join(flagged)} arrive{'s' if len(flagged) == 1 else ''} with at least "
                   f"{_pct(PRESPARSIFIED, 0)} of the prunable weights exactly zero: a sign of "
                   f"sparsification before release (or of a quantizer that rounds small weights to 0)")
    else:
        verdict = (f"none of them arrives sparsified: every model has fewer than "
                   f"{_pct(PRESPARSIFIED, 0)} of its prunable weights exactly zero, while pruning "
                   f"to 50% leaves 50% (next section)")
    scale = (f"These models have at most {_count(biggest)} parameters, so they cannot confirm or "
             "refute the claim about billion-parameter models; run this notebook with such a model "
             "in `models` (a hub id or a local folder) to measure it the same way."
             if biggest < 1e9 else "At least one model measured has a billion parameters or more, "
             "so this measures the claim directly for it.")
    return (f"**Claim 3, large models come pre-sparsified.** Exact zeros before any pruning: "
            f"{'; '.join(parts)}. So {verdict}. {scale}")


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
