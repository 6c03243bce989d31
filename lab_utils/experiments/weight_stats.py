"""Streaming weight statistics of one model in memory, in fixed memory.

Every number is accumulated tensor by tensor, in flat chunks of at most
:attr:`StatsConfig.chunk` values, so hundreds of millions of floats never sit
in one array: near-zero counts by comparison; mean, std, skewness and kurtosis
from per-chunk central moments merged with Pébay's pairwise update in float64
(a norm weight near 1 and an embedding near 0 combine without cancellation);
histograms on edges fixed for the whole model, a fine *core* one over
``[-core, core]`` (core = the 99.99% quantile of ``|w|``) and a coarse *outer*
one over the full range for the tails, with odd bin counts so the exact zeros
are one bar; quantiles from a seeded sample, whose :data:`SAMPLE_SIZE` values
place a quantile's rank within about ``sqrt(q (1 - q) / n)`` (+/-0.05% at the
median). A group's histogram is a sum of per-tensor rows. The tables derived
from the statistics are :mod:`lab_utils.experiments.weights`.
"""

from __future__ import annotations

import functools
import io as _io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils.core import memo
from lab_utils.core.checks import whole_number
from lab_utils.core.measure import num_threads
from lab_utils.core.models import component_of, prunable_layers, transformer_blocks
from lab_utils.core.progress import tqdm

CHUNK = 1 << 20  # values per chunk: each worker's temporaries stay near 4 MB each
SMALL = (1e-3, 1e-2, 5e-2)  # thresholds of the "near zero" fractions (strict |w| < t)
CORE_BINS = 8193  # odd: zero is the centre of a bin
OUTER_BINS = 2049
SAMPLE_SIZE = 1 << 20
CORE_QUANTILE = 0.9999  # the fine histogram covers |w| up to this quantile

# Display order of the parameter groups (weights by component, then the rest).
GROUP_ORDER = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
               "xattn.q", "xattn.k", "xattn.v", "xattn.o",
               "mlp.gate", "mlp.up", "mlp.down",
               "embedding", "conv", "pooler", "head", "other", "norm", "bias")


class StatsError(ValueError):
    """Bad input to a statistic, in one line naming the fix."""


@dataclass(frozen=True)
class StatsConfig:
    """What a statistics pass computes with: the seeded sample (``sample_size``
    values drawn with ``seed``), the chunk length and the device of the pass
    (both change how sums round, so they belong to the result's key)."""

    sample_size: int = SAMPLE_SIZE
    seed: int = 0
    chunk: int = CHUNK
    device: str = "cpu"

    def __post_init__(self):
        whole_number("chunk", self.chunk, error=StatsError)


DEFAULT_STATS = StatsConfig()


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
    return functools.reduce(Moments.merge, parts, Moments())


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


# --------------------------------------------------------------------------- the parameter table
def _side_of(name: str) -> str:
    parts = name.split(".")
    return next((side for side in ("encoder", "decoder") if side in parts), "")


def param_table(model: nn.Module) -> pd.DataFrame:
    """One row per parameter tensor (tied tensors once), in module order.

    Columns: name, side, block (None outside the transformer blocks),
    component (``attn.q`` ... ``mlp.down``, ``embedding``, ``norm``, ``conv``,
    ``pooler``, ``head``, ``other``), kind (``weight``/``bias``/...), group (the component
    for weights, ``bias`` for the biases of linear and conv layers, ``norm``
    for every norm parameter), numel, prunable (the weights that
    :func:`lab_utils.core.models.prunable_layers` would prune), ndim.
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
            elif "norm" in type(module).__name__.lower():
                component = "norm"
            elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
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


def parameters(model: nn.Module) -> list[torch.Tensor]:
    """Parameters in the order of :func:`param_table`: torch lists them module by
    module, each module's own, tied tensors once."""
    return list(model.parameters())


# --------------------------------------------------------------------------- the streaming pass
@dataclass
class WeightStats:
    """Everything the figures and tables need, without the weights themselves:
    ``tensors`` (:func:`param_table` plus counts and moments) and the histogram
    arrays have one row per parameter tensor, so a group's histogram is a sum of rows."""

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


def default_bins(model: nn.Module, *, sample_size: int = SAMPLE_SIZE, seed: int = 0) -> BinSpec:
    """Edges from the data: the outer range is max |w| (exact, streamed); the
    core is the :data:`CORE_QUANTILE` of |w| in a seeded sample."""
    params = parameters(model)
    if not params:
        raise StatsError("the model has no parameters")
    absmax = max(max(-float(lo), float(hi)) for lo, hi in
                 (torch.aminmax(p.detach()) for p in params if p.numel()))
    sample, _ = _sample(params, sample_size, seed)
    core = float(np.quantile(np.abs(sample), CORE_QUANTILE)) if len(sample) else absmax
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
def weight_stats(model: nn.Module, config: StatsConfig = DEFAULT_STATS, *, label: str = "model",
                 bins: BinSpec | None = None, info: dict | None = None,
                 reuse: WeightStats | None = None) -> WeightStats:
    """Stream once over every parameter of ``model`` (tied tensors once).

    ``bins``: the dense model's :class:`BinSpec` when measuring a pruned copy,
    so the histograms share their edges. ``reuse``: the dense model's
    statistics; a non-prunable tensor whose fingerprint (sum and sum of
    squares) matches is copied from it: pruning leaves embeddings and norms
    alone, up to half of a small model. One thread per chunk (torch's thread
    count), because ``torch.histc`` runs on one core.
    """
    sample_size, seed, chunk, device = config.sample_size, config.seed, config.chunk, config.device
    table = param_table(model)
    params = parameters(model)
    if not params:
        raise StatsError("the model has no parameters")
    if reuse is not None and bins is not None and reuse.bins != bins:
        raise StatsError("reuse needs the same bins: pass bins=reuse.bins")
    bins = bins or (reuse.bins if reuse is not None else
                    default_bins(model, sample_size=sample_size, seed=seed))
    acc = _Accumulator(len(params), bins)
    workers = max(1, torch.get_num_threads())
    # One thread per op while the pass runs several at once: histc is serial
    # anyway, and every sum then rounds the same way in every pass (so the
    # fingerprints that ``reuse`` compares are reproducible).
    with num_threads(1):
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
                tqdm(total=len(tasks), desc=f"stats {label}", leave=False) as bar:
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
    edges = bins.core_edges
    centre_to_outer = np.clip(np.floor(((edges[:-1] + edges[1:]) / 2 + bins.outer)
                                       / (2 * bins.outer) * bins.outer_bins), 0,
                              bins.outer_bins - 1).astype(np.int64)
    targets, starts = np.unique(centre_to_outer, return_index=True)  # monotone: runs of bins
    if todo:
        acc.outer[np.ix_(todo, targets)] += np.add.reduceat(acc.core[todo], starts, axis=1)
    for k, v in acc.cols.items():
        table[k] = v
    table["min"], table["max"] = acc.lo, acc.hi
    for k in ("mean", "m2", "m3", "m4"):
        table[k] = [getattr(m, k) for m in acc.moments]
    table["fp_sum"], table["fp_sumsq"] = acc.fp[:, 0], acc.fp[:, 1]
    sample, owner = _sample(params, sample_size, seed)
    info = {**(info or {}), "reused_tensors": len(params) - len(todo)}
    return WeightStats(label, bins, table, acc.core, acc.below, acc.above, acc.outer,
                       acc.clipped, sample, owner, seed, info)


# --------------------------------------------------------------------------- the statistics cache
_ARRAYS = ("core_counts", "core_below", "core_above", "outer_counts", "outer_clipped", "sample",
           "sample_owner")


def stats_bytes(ws: WeightStats) -> bytes:
    """A WeightStats as one .npz (arrays, and its tables and info as JSON bytes):
    loaded back with ``allow_pickle=False``, so reading a cache runs no code."""
    meta = {"label": ws.label, "bins": [ws.bins.core, ws.bins.outer, ws.bins.core_bins, ws.bins.outer_bins],
            "tensors": memo.encode(ws.tensors), "seed": ws.seed, "info": memo.encode(ws.info)}
    buf = _io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{k: getattr(ws, k) for k in _ARRAYS})
    return buf.getvalue()


def stats_from_bytes(data: bytes) -> WeightStats:
    with np.load(_io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        arrays = {k: z[k] for k in _ARRAYS}
    core, outer, core_bins, outer_bins = meta["bins"]
    return WeightStats(label=meta["label"], bins=BinSpec(core, outer, core_bins, outer_bins),
                       tensors=memo.decode(meta["tensors"]), seed=meta["seed"],
                       info=memo.decode(meta["info"]), **arrays)
