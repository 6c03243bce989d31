"""Does sparsity buy time on a CPU? Dense vs ``torch.sparse`` CSR matmuls, in both regimes.

A pruned layer that keeps its zeros runs as fast as the dense one. A CSR layer skips them,
but each kept weight costs far more (an index to read, scattered access, no cache blocking),
so CSR only wins above some sparsity, the *crossover*, measured per shape by
:func:`layer_speed` in two regimes: *prefill* (a prompt of many tokens: compute-bound) and
*decode* (one token, the weights streamed from memory: each format cycles through enough
copies of its weight that they do not sit in cache, so the time is its bytes' traffic).
:func:`to_sparse_aware` swaps :class:`CSRLinear` in where that pays;
inside such a model the CSR layers work feature-major (torch multiplies a sparse matrix on
the left only, so ``x @ W.T`` is ``(W @ x.T).T``), siblings sharing one transpose of their
input. :func:`tune_sparse_aware` keeps the plan only if it is faster end to end;
:func:`forward_speed` times whole forward passes and :func:`flop_limit` bounds their
speed-up; :func:`generation_sweep` times greedy generation (tokens/s) against the bytes one
token reads (:func:`lab_utils.core.formats.token_bytes`) and the machine's streaming rate.

Timings on a shared machine are noisy: compare ratios measured in one run (every variant is
timed interleaved, medians). The CSR kernels are the CPU's; :func:`forward_speed` times models
wherever they sit. Figures and sentences live in :mod:`lab_utils.presentation.speed_view`.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils.core import formats, memo
from lab_utils.core.checks import whole_number
from lab_utils.core.data import forward_inputs
from lab_utils.core.device import model_device
from lab_utils.core.measure import median_seconds, time_calls
from lab_utils.core.models import (
    DECODER_ONLY,
    _auto_class,
    _conv1d_type,
    load_model,
    prunable_layers,
    resolve,
    set_module,
    weight_out_in,
)
from lab_utils.core.progress import tqdm
from lab_utils.engine import checkpoints
from lab_utils.engine.config import PruneConfig, hf_config


@dataclass(frozen=True)
class Timing:
    """How a timing is taken: on ``tokens`` input rows, ``warmup`` untimed
    rounds then ``repeats`` timed ones (medians), on ``threads`` torch threads
    (resolved when made: a cached timing is keyed by the threads it ran on).
    ``cycle_mib`` > 0: each timed call cycles through that many MiB of distinct
    copies of the weight in each format, so that none is read from cache (the
    decode regime; 0: one weight, as a prompt's matmul reads it)."""

    tokens: int = 512
    warmup: int = 1
    repeats: int = 5
    threads: int = field(default_factory=torch.get_num_threads)
    cycle_mib: int = 0

    def __post_init__(self):
        for name in ("tokens", "repeats", "threads"):
            whole_number(f"Timing.{name}", getattr(self, name))
        for name in ("warmup", "cycle_mib"):
            whole_number(f"Timing.{name}", getattr(self, name), minimum=0)

    @property
    def regime(self) -> str:
        return "decode" if self.tokens == 1 else "prefill"

    def copies(self, nbytes: int) -> int:
        """How many copies of a weight of ``nbytes`` one timed call reads."""
        return max(2, math.ceil(self.cycle_mib * 2**20 / nbytes)) if self.cycle_mib else 1


@dataclass(frozen=True)
class Generation:
    """How greedy generation is timed: a prompt of ``prompt_tokens`` tokens of real
    text, ``new_tokens`` generated with the KV cache (never stopping early),
    ``warmup`` untimed then ``repeats`` timed generations per model, in turns;
    the streaming rate is read over a buffer of ``stream_mib`` MiB."""

    new_tokens: int = 32
    prompt_tokens: int = 16
    warmup: int = 1
    repeats: int = 3
    threads: int = field(default_factory=torch.get_num_threads)
    stream_mib: int = 64

    def __post_init__(self):
        for name in ("new_tokens", "prompt_tokens", "repeats", "threads", "stream_mib"):
            whole_number(f"Generation.{name}", getattr(self, name))
        whole_number("Generation.warmup", self.warmup, minimum=0)


# --------------------------------------------------------------------------- layers
def sparse_weight(shape: tuple[int, int], sparsity_ratio: float, seed: int = 0) -> torch.Tensor:
    """A random out x in weight with exactly round(sparsity * in) zeros in
    every row (the per-row count that magnitude or Wanda pruning leaves)."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    n_zero = round(sparsity_ratio * in_f)
    if n_zero:
        drop = torch.rand(out_f, in_f, generator=g).argsort(dim=1)[:, :n_zero]
        W.scatter_(1, drop, 0.0)
    return W


def to_csr(W: torch.Tensor) -> torch.Tensor:
    """W as a CSR tensor with int32 row pointers and column indices when they
    fit: torch hands int64 indices to MKL's sparse kernel only after
    converting them, on every call."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and what we measure
        warnings.simplefilter("ignore", UserWarning)
        W_csr = W.detach().to_sparse_csr()
        if max(W_csr.shape) < 2**31 and W_csr.values().numel() < 2**31:
            W_csr = torch.sparse_csr_tensor(W_csr.crow_indices().int(), W_csr.col_indices().int(),
                                            W_csr.values(), W_csr.shape)
        return W_csr


def feature_major(x: torch.Tensor) -> torch.Tensor:
    """The activations ``x`` (..., in) as one contiguous in x tokens matrix.
    Free when ``x`` is already the transposed view of one (the output of a
    feature-major :class:`CSRLinear`, or an elementwise op on it)."""
    return x.reshape(-1, x.shape[-1]).t().contiguous()


def csr_matmul(W_csr: torch.Tensor, xT: torch.Tensor) -> torch.Tensor:
    """``W @ xT`` for a CSR ``W`` (out x in) and a dense, contiguous ``xT``
    (in x tokens): torch multiplies a sparse matrix on the left only, so the
    activations go in feature-major and come out feature-major (out x tokens).
    The product is written straight into a fresh, unfilled tensor (``addmm``
    with beta=0 into itself, which BLAS semantics never read): plain
    ``torch.sparse.mm`` first fills its output with zeros and ``addmm`` without
    ``out=`` copies its input there, two passes over the output saved."""
    if xT.requires_grad and torch.is_grad_enabled():
        return torch.sparse.mm(W_csr, xT)  # out= has no backward; gradients flow to the activations
    yT = xT.new_empty(W_csr.shape[0], xT.shape[1])
    return torch.addmm(yT, W_csr, xT, beta=0, out=yT)


def csr_linear(x: torch.Tensor, W_csr: torch.Tensor, bias: torch.Tensor | None = None,
               xT: torch.Tensor | None = None, token_major_out: bool = True) -> torch.Tensor:
    """``x @ W.T + bias`` with W in CSR. By default a drop-in for one linear
    layer, token-major in and out, paying a transpose on the way in and one on
    the way out (a contiguous output, as the next layer may view() it). Pass
    ``xT`` (``x`` already feature-major) to skip the first, and
    ``token_major_out=False`` to return the transposed view instead of the
    second."""
    yT = csr_matmul(W_csr, feature_major(x) if xT is None else xT)
    if bias is not None:
        yT += bias[:, None]
    y = yT.t().contiguous() if token_major_out else yT.t()
    return y.reshape(*x.shape[:-1], W_csr.shape[0])


def csr_bytes(W_csr: torch.Tensor) -> int:
    """Bytes a CSR tensor holds as torch keeps it: values, row pointers, column indices."""
    return sum(t.numel() * t.element_size() for t in (W_csr.values(), W_csr.crow_indices(), W_csr.col_indices()))


def _copies(W: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``W`` and ``n - 1`` copies of it in memory of their own (a CSR tensor's three parts each)."""
    if W.layout == torch.sparse_csr:
        return [W] + [torch.sparse_csr_tensor(W.crow_indices().clone(), W.col_indices().clone(),
                                              W.values().clone(), W.shape) for _ in range(n - 1)]
    return [W] + [W.clone() for _ in range(n - 1)]


def layer_speed(shapes: Iterable[tuple[int, int]], sparsities: Iterable[float], timing: Timing | None = None,
                seed: int = 0) -> pd.DataFrame:
    """Median time of ``x @ W.T`` (x: ``timing.tokens`` x in) dense and CSR, per shape and
    sparsity, timed in turns under the same load. ``csr_ms`` is the CSR kernel on
    feature-major activations, as the sparse-aware model runs it; ``speedup`` = dense / that.
    ``drop_in_ms`` / ``drop_in_speedup`` add both transposes (one CSR layer in a dense model; nan
    at one token, where they are free).
    With ``timing.cycle_mib`` each call reads the next of ``dense_copies`` / ``csr_copies``
    copies of the weight (times are per product); ``dense_gb_s`` / ``csr_gb_s`` are the weight
    bytes each kernel reads per second, ``byte_limit`` dense bytes / CSR bytes as torch holds them."""
    timing = timing or Timing(warmup=2, repeats=7)
    shapes = sorted({tuple(int(v) for v in s) for s in shapes})
    sparsities = sorted({float(s) for s in sparsities})
    rows = []
    g = torch.Generator().manual_seed(seed)
    jobs = [(s, sp) for s in shapes for sp in sparsities]
    for shape, sp in tqdm(jobs, desc=f"layer timings ({timing.regime})"):
        W = sparse_weight(shape, sp, seed)
        W_csr = to_csr(W)
        dense_b, sparse_b = W.numel() * W.element_size(), csr_bytes(W_csr)
        Ws, Cs = _copies(W, timing.copies(dense_b)), _copies(W_csr, timing.copies(sparse_b))
        load = os.getloadavg()[0]
        x = torch.randn(timing.tokens, shape[1], generator=g)
        xT = feature_major(x)
        fns = {"dense": lambda Ws=Ws, x=x: [torch.nn.functional.linear(x, w) for w in Ws],
               "csr": lambda Cs=Cs, xT=xT: [csr_matmul(c, xT) for c in Cs]}
        if timing.tokens > 1:  # the transposes of one row are free: no drop-in timing at decode
            fns["drop_in"] = lambda Cs=Cs, x=x: [csr_linear(x, c) for c in Cs]
        med = median_seconds(time_calls(fns, timing.warmup, timing.repeats, timing.threads))
        dense_s, csr_s = med["dense"] / len(Ws), med["csr"] / len(Cs)
        drop_in_s = med["drop_in"] / len(Cs) if "drop_in" in med else math.nan
        rows.append({"regime": timing.regime, "shape": f"{shape[0]}x{shape[1]}", "out_features": shape[0],
                     "in_features": shape[1], "sparsity": sp, "tokens": timing.tokens, "dense_ms": 1e3 * dense_s,
                     "csr_ms": 1e3 * csr_s, "speedup": dense_s / csr_s, "drop_in_ms": 1e3 * drop_in_s,
                     "drop_in_speedup": dense_s / drop_in_s, "dense_copies": len(Ws), "csr_copies": len(Cs),
                     "dense_gb_s": dense_b / dense_s / 1e9, "csr_gb_s": sparse_b / csr_s / 1e9,
                     "byte_limit": dense_b / sparse_b, "threads": timing.threads, "load_avg": load})
        del Ws, Cs
    return pd.DataFrame(rows)


def predicted_speedup(speed: pd.DataFrame, shape: tuple[int, int], sparsity_ratio: float) -> float:
    """CSR speed-up for ``shape`` at ``sparsity_ratio``, interpolated from a
    :func:`layer_speed` table (linearly in log speed-up between the measured
    sparsities, flat beyond them). A shape that was not timed borrows the
    timed shape with the closest number of weights. The table must hold one regime."""
    if "regime" in speed and speed.regime.nunique() > 1:
        raise ValueError("predicted_speedup needs the timings of one regime (prefill or decode), "
                         f"got {sorted(speed.regime.unique())}: select one, e.g. speed[speed.regime == 'decode']")
    t = speed[(speed.out_features == shape[0]) & (speed.in_features == shape[1])]
    if t.empty:
        numel = speed.out_features * speed.in_features
        nearest = (np.log(numel) - math.log(shape[0] * shape[1])).abs().idxmin()
        t = speed[speed["shape"] == speed.loc[nearest, "shape"]]
    t = t.groupby("sparsity")["speedup"].median().sort_index()
    return float(np.exp(np.interp(sparsity_ratio, t.index.to_numpy(), np.log(t.to_numpy()))))


def crossover(speed: pd.DataFrame, margin: float = 0.0) -> pd.DataFrame:
    """Per shape (and regime, when the table has both): the sparsity above which CSR beats
    dense by more than ``margin`` at every measured point (interpolated between the last
    losing and the first winning sparsity; nan if it never wins, the lowest measured
    sparsity if it always wins), and the measured speed-ups."""
    rows = []
    by = ["regime", "shape"] if "regime" in speed else ["shape"]
    for key, t in speed.groupby(by, sort=False):
        t = t.groupby("sparsity")["speedup"].median().sort_index()
        s, v = t.index.to_numpy(), np.log(t.to_numpy())
        target = math.log(1 + margin)
        wins = v > target
        if not wins[-1]:
            cross = math.nan
        elif wins.all():
            cross = float(s[0])
        else:
            i = int(np.flatnonzero(~wins)[-1])  # last losing point; all above it win
            cross = float(s[i] + (target - v[i]) * (s[i + 1] - s[i]) / (v[i + 1] - v[i]))
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)) | {"crossover_sparsity": cross}
        row.update({f"speedup@{sp:g}": float(np.exp(val)) for sp, val in zip(s, v, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- modules
class TransposeCache:
    """One slot holding the last activation a group of :class:`CSRLinear`
    layers read, in feature-major form. Sibling layers that read the same
    tensor (q, k and v; an MLP's gate and up) transpose it once: the slot is
    hit when the input is the very same tensor object, unmodified since (its
    version counter; tensors made under ``torch.inference_mode`` have none,
    and there the transformer code's habit of never writing into an
    activation that several projections read is relied upon)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._src, self._version, self._xT = None, None, None

    def feature_major(self, x: torch.Tensor) -> torch.Tensor:
        try:
            version = x._version
        except RuntimeError:  # an inference tensor
            version = None
        if x is self._src and version == self._version:
            return self._xT
        xT = feature_major(x)
        self._src, self._version, self._xT = x, version, xT
        return xT


# Components whose output may stay feature-major (a transposed view): it goes
# to an activation function, a product, a residual add or the next CSR layer,
# which all read it without a copy. The rest copy back to token-major: q, k
# and v above all, since CPU scaled-dot-product attention runs its fast path
# only when the head dimension is contiguous (measured: the slow path cost
# more than the copies save), and any component not recognised.
FEATURE_MAJOR_OUT = ("mlp.gate", "mlp.up", "mlp.down", "attn.o", "xattn.o")


class CSRLinear(nn.Module):
    """A linear layer whose weight (out x in) is a CSR tensor.

    Alone it is a drop-in for ``nn.Linear`` (token-major in and out). Inside a
    sparse-aware model (:func:`to_sparse_aware`) it works feature-major: it
    reads its input through a :class:`TransposeCache` shared with its
    siblings, and with ``token_major_out=False`` returns ``(W @ x.T).T`` as a
    transposed view instead of copying it back."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 cache: TransposeCache | None = None, token_major_out: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_csr", to_csr(weight), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.cache = cache
        self.token_major_out = token_major_out

    @classmethod
    def from_module(cls, module: nn.Module, cache: TransposeCache | None = None,
                    token_major_out: bool = True) -> CSRLinear:
        """From ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is in x out)."""
        return cls(weight_out_in(module).contiguous(), module.bias, cache, token_major_out)

    @property
    def nnz(self) -> int:
        return int(self.weight_csr.values().numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xT = self.cache.feature_major(x) if self.cache is not None else None
        return csr_linear(x, self.weight_csr, self.bias, xT, self.token_major_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"token_major_out={self.token_major_out}")


def sparse_plan(model: nn.Module, speed: pd.DataFrame | None, margin: float = 0.1,
                force: bool = False) -> pd.DataFrame:
    """Per prunable layer: its shape, sparsity, the predicted CSR speed-up and
    whether to use CSR (predicted speed-up >= 1 + margin; every layer when
    ``force``). The margin keeps layers near the crossover dense: there the
    timing noise is as large as the gain."""
    rows = []
    for pl in prunable_layers(model):
        W = pl.weight
        sparsity = float((W == 0).float().mean())
        pred = predicted_speedup(speed, pl.shape, sparsity) if speed is not None else math.nan
        rows.append({"name": pl.name, "component": pl.component, "shape": f"{pl.shape[0]}x{pl.shape[1]}",
                     "sparsity": sparsity, "predicted_speedup": pred,
                     "use_csr": bool(force or pred >= 1 + margin)})
    return pd.DataFrame(rows)


def to_sparse_aware(model: nn.Module, speed: pd.DataFrame | None, margin: float = 0.1,
                    force: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """A copy of ``model`` with the layers that
    :func:`sparse_plan` picks replaced by :class:`CSRLinear`; returns
    (model, plan). ``force=True`` converts every prunable layer. The CSR
    layers share one :class:`TransposeCache` and hand on feature-major
    outputs except where an attention kernel reads them."""
    plan = sparse_plan(model, speed, margin, force)
    target = copy.deepcopy(model)
    cache = TransposeCache()
    for r in plan[plan.use_csr].itertuples():
        set_module(target, r.name, CSRLinear.from_module(
            target.get_submodule(r.name), cache, token_major_out=r.component not in FEATURE_MAJOR_OUT))
    return target.eval(), plan


# --------------------------------------------------------------------------- whole model
def forward_speed(models: dict[str, nn.Module], inputs: dict, warmup: int = 1, repeats: int = 5,
                  threads: int | None = None) -> pd.DataFrame:
    """Median seconds of a forward pass for each model (timed interleaved on
    the same ``inputs``) and its speed-up over the first model."""
    baseline = next(iter(models))
    times = time_calls({name: (lambda m=m: m(**inputs)) for name, m in models.items()},
                       warmup, repeats, threads, device=model_device(next(iter(models.values()))))
    med = median_seconds(times)
    return pd.DataFrame({"model": list(models), "median_s": [med[n] for n in models],
                         "speedup": [med[baseline] / med[n] for n in models],
                         "repeats": repeats})


def linear_macs(model: nn.Module, inputs: dict) -> pd.DataFrame:
    """Multiply-adds of every linear layer in one forward pass on ``inputs``
    (counted with forward hooks): dense (out x in per row of input) and
    effective (nonzero weights per row, for the prunable layers)."""
    conv1d = _conv1d_type()
    prunable = {pl.name for pl in prunable_layers(model)}
    rows, hooks = [], []

    def hook(name):
        def fn(module, args, output):
            rows_in = args[0].numel() // args[0].shape[-1]
            if isinstance(module, CSRLinear):
                out_f, in_f, nnz = module.out_features, module.in_features, module.nnz
            else:
                W = weight_out_in(module)
                out_f, in_f = W.shape
                nnz = int((W != 0).sum()) if name in prunable else out_f * in_f
            rows.append({"name": name, "prunable": name in prunable, "rows": rows_in,
                         "dense_macs": rows_in * out_f * in_f, "macs": rows_in * nnz})
        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | conv1d | CSRLinear):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return pd.DataFrame(rows)


def flop_limit(model: nn.Module, inputs: dict) -> dict:
    """The end-to-end speed-up allowed by counting the linear layers'
    multiply-adds: dense count / count with only the nonzero weights of the
    prunable layers. The dense layers (the output head above all) stay as they
    are; attention products, norms and activations are not counted, so the
    true limit is lower still."""
    t = linear_macs(model, inputs)
    dense, sparse = int(t.dense_macs.sum()), int(t.macs.sum())
    head = t[~t.prunable]
    return {"dense_macs": dense, "sparse_macs": sparse, "limit": dense / sparse,
            "unprunable_share": float(head.dense_macs.sum() / dense)}


# --------------------------------------------------------------------------- sweeps and figures
def prunable_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The distinct out x in shapes of a model's prunable layers."""
    return sorted({tuple(pl.shape) for pl in prunable_layers(model)})


def model_shapes(model_name: str) -> list[tuple[int, int]]:
    """The distinct prunable shapes of a model, read from its config alone
    (the model is built on the meta device: no weights are loaded)."""
    spec = resolve(model_name)
    config = hf_config(spec)
    with torch.device("meta"):
        model = _auto_class(spec.family, config).from_config(config)
    return prunable_shapes(model)


def tune_sparse_aware(model: nn.Module, speed: pd.DataFrame | None,
                      check: Callable[[dict[str, nn.Module]], pd.DataFrame], margin: float = 0.1
                      ) -> tuple[nn.Module, pd.DataFrame, float]:
    """:func:`to_sparse_aware`, checked end to end: the per-layer table cannot see what happens
    between layers (transposes, layouts a later op must copy), so ``check`` times the plan
    against the dense model ({"dense": ..., "sparse-aware": ...} -> a table with ``speedup``
    in that order: :func:`forward_speed` or :func:`generation_speed`) and, if it is not faster,
    the dense model is returned.

    Returns (model, plan, checked speed-up), ``plan.use_csr`` cleared after a fall-back, nan
    when no layer was worth converting. Time the returned model again to report it: the
    check's own ratio is biased by the selection."""
    aware, plan = to_sparse_aware(model, speed, margin)
    if not plan.use_csr.any():
        return model, plan, math.nan
    checked = float(check({"dense": model, "sparse-aware": aware}).speedup.iloc[1])
    if checked >= 1.0:
        return aware, plan, checked
    return model, plan.assign(use_csr=False), checked


def forward_sweep(model_name: str, method: str, sparsities: Iterable[float], speed: pd.DataFrame,
                  timing: Timing | None = None, margin: float = 0.1, all_csr: bool = True) -> pd.DataFrame:
    """Whole forward passes at each sparsity (``method``'s pruning, engine defaults), timed
    interleaved: the pruned model with dense kernels, the sparse-aware model
    (:func:`tune_sparse_aware` on the ``speed`` table) and, with ``all_csr``, every prunable
    layer in CSR. Speed-ups are over dense; ``checked_speedup`` is the check's own
    measurement and ``fell_back`` says the plan lost it."""
    timing = timing or Timing()
    rows, dense = [], load_model(model_name)  # each sparsity prunes a copy (or reads its checkpoint into one)
    for sparsity in tqdm(sorted(float(s) for s in sparsities), desc="forward timings"):
        lm, _ = checkpoints.pruned_model(dense, PruneConfig(method, sparsity))
        inputs = forward_inputs(lm, timing.tokens)
        aware, plan, checked = tune_sparse_aware(
            lm.model, speed, lambda ms, inputs=inputs: forward_speed(ms, inputs, timing.warmup, timing.repeats, timing.threads),
            margin)
        # With no layer in CSR, the sparse-aware model *is* the dense model:
        # timing it again would only measure the machine's noise.
        variants = {"dense": lm.model} | ({"sparse-aware": aware} if plan.use_csr.any() else {})
        if all_csr:
            variants["all-csr"] = to_sparse_aware(lm.model, None, force=True)[0]
        load = os.getloadavg()[0]
        t = forward_speed(variants, inputs, timing.warmup, timing.repeats, timing.threads).set_index("model")
        if not plan.use_csr.any():
            t.loc["sparse-aware"] = t.loc["dense"]
        limit = flop_limit(lm.model, inputs)
        row = {"model": model_name, "label": lm.label, "method": method, "sparsity": sparsity,
               "tokens": int(next(v for k, v in inputs.items() if k.endswith("input_ids")).numel()),
               "dense_s": t.loc["dense", "median_s"], "sparse_aware_s": t.loc["sparse-aware", "median_s"],
               "sparse_aware_speedup": t.loc["sparse-aware", "speedup"],
               "csr_layers": int(plan.use_csr.sum()), "layers": len(plan),
               "sparse_aware_is_dense": not plan.use_csr.any(),
               "checked_speedup": checked, "fell_back": bool(checked < 1.0),
               "flop_limit": limit["limit"], "unprunable_share": limit["unprunable_share"],
               "threads": timing.threads, "repeats": timing.repeats, "load_avg": load}
        if all_csr:
            row.update(all_csr_s=t.loc["all-csr", "median_s"], all_csr_speedup=t.loc["all-csr", "speedup"])
        rows.append(row)
        del lm, aware, variants
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- generation
LOGIT_TOLERANCE = 1e-4  # largest |logit difference| between formats, relative to the largest |logit|
GENERATION_FORMATS = ("csr", "bitmask")  # the byte limits reported (csr: the one timed)


def stream_rate(mib: int, repeats: int = 5, threads: int | None = None) -> float:
    """Bytes per second this machine reads from memory: medians of summing an ``mib`` MiB
    float32 buffer (take it several times the last-level cache)."""
    buf = torch.ones(mib * 2**20 // 4)
    med = median_seconds(time_calls({"sum": buf.sum}, 1, repeats, threads))
    return buf.numel() * 4 / float(med["sum"])


def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation with the KV cache: ``prompt`` and exactly ``new_tokens`` more tokens."""
    from transformers import GenerationConfig

    eos = getattr(model.config, "eos_token_id", None)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                           use_cache=True, eos_token_id=eos, pad_token_id=pad)
    with torch.inference_mode():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg)


def generation_speed(models: dict[str, nn.Module], prompt: torch.Tensor, gen: Generation
                     ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Tokens per second of :func:`greedy` for each model (timed in turns; the prompt's
    prefill included) and its speed-up over the first model; and each one's generated ids."""
    ids: dict[str, torch.Tensor] = {}

    def run(name, model):
        ids[name] = greedy(model, prompt, gen.new_tokens)

    times = time_calls({name: (lambda n=name, m=m: run(n, m)) for name, m in models.items()},
                       gen.warmup, gen.repeats, gen.threads)
    med = median_seconds(times)
    first = next(iter(models))
    table = pd.DataFrame({"model": list(models), "median_s": [med[n] for n in models],
                          "tokens_per_s": [gen.new_tokens / med[n] for n in models],
                          "speedup": [med[first] / med[n] for n in models]})
    return table, ids


def compare_formats(dense: nn.Module, sparse: nn.Module, prompt: torch.Tensor, new_tokens: int,
                    known: dict[str, torch.Tensor] | None = None) -> dict:
    """The same weights held dense and in CSR: the largest logit difference on ``prompt``
    (and whether it is within :data:`LOGIT_TOLERANCE`), and their greedy continuations: equal,
    or the first new token where they part and the dense model's logit margin there (its
    token's logit minus the other's: a small margin is a near tie that rounding decides).
    ``known`` may hold ids already generated ({"dense": ..., "sparse": ...})."""
    known = known or {}
    with torch.inference_mode():
        a, b = dense(input_ids=prompt).logits, sparse(input_ids=prompt).logits
        diff, scale = float((a - b).abs().max()), float(a.abs().max())
        ids = {k: known.get(k) if known.get(k) is not None else greedy(m, prompt, new_tokens)
               for k, m in (("dense", dense), ("sparse", sparse))}
        n = prompt.shape[1]
        d, s = ids["dense"][0, n:], ids["sparse"][0, n:]
        parted = torch.nonzero(d != s).flatten()
        first, margin = math.nan, math.nan
        if len(parted):
            first = int(parted[0])
            logits = dense(input_ids=ids["dense"][:, :n + first]).logits[0, -1]
            margin = float(logits[d[first]] - logits[s[first]])
    return {"logits_max_abs_diff": diff, "logits_agree": diff <= LOGIT_TOLERANCE * scale,
            "texts_equal": not len(parted), "first_divergence": first, "divergence_margin": margin,
            "ids": ids}


def generation_sweep(model_name: str, method: str, sparsities: Iterable[float], speed: pd.DataFrame,
                     gen: Generation, margin: float = 0.1) -> pd.DataFrame:
    """Greedy generation at each sparsity (``method``'s pruning, engine defaults): the pruned
    model with dense kernels and the sparse-aware model planned on the decode-regime rows of
    ``speed`` (:func:`tune_sparse_aware`, checked on one generation each), in turns. One row
    per format of :data:`GENERATION_FORMATS`: ``byte_limit`` = the dense model's bytes per
    token / those with every prunable layer in that format (:func:`formats.token_bytes`);
    the ``csr`` row holds the measured tokens/s (torch's CSR, int32 indices:
    ``run_byte_limit`` is that model's limit as it holds them) and the formats check of
    :func:`compare_formats` (the pruned weights dense against all of them in CSR). The
    machine's streaming rate is measured in the same run: ``*_of_stream`` = tokens/s over
    what reading the model's bytes at that rate allows."""
    decode = speed[speed.regime == "decode"] if "regime" in speed else speed
    dense = load_model(model_name)
    prompt = forward_inputs(dense, gen.prompt_tokens)["input_ids"]
    stream = stream_rate(gen.stream_mib, gen.repeats + 2, gen.threads)
    rows = []
    for sparsity in tqdm(sorted(float(s) for s in sparsities), desc="generation timings"):
        lm, _ = checkpoints.pruned_model(dense, PruneConfig(method, sparsity))
        model = lm.model
        aware, plan, checked = tune_sparse_aware(
            model, decode, lambda ms: generation_speed(ms, prompt, replace(gen, repeats=1))[0], margin)
        variants = {"dense": model} | ({"sparse-aware": aware} if plan.use_csr.any() else {})
        load = os.getloadavg()[0]
        t, ids = generation_speed(variants, prompt, gen)
        t = t.set_index("model")
        if not plan.use_csr.any():  # the sparse-aware model *is* the dense model
            t.loc["sparse-aware"] = t.loc["dense"]
        all_csr = plan.use_csr.all()
        csr_model = aware if all_csr else to_sparse_aware(model, None, force=True)[0]
        check = compare_formats(model, csr_model, prompt, gen.new_tokens,
                                {"dense": ids["dense"], "sparse": ids.get("sparse-aware") if all_csr else None})
        layers, other, bits = formats.token_reads(model)
        dense_b = formats.token_bytes("dense", layers, other, bits)
        run_b = dense_b + sum(csr_bytes(m.weight_csr) - m.out_features * m.in_features * bits // 8
                              for m in aware.modules() if isinstance(m, CSRLinear))  # the plan's layers in CSR
        tokenizer = lm.tokenizer
        text = {k: tokenizer.decode(v[0, prompt.shape[1]:]) if tokenizer is not None else ""
                for k, v in check.pop("ids").items()}
        dense_tps, sparse_tps = t.loc["dense", "tokens_per_s"], t.loc["sparse-aware", "tokens_per_s"]
        for fmt in GENERATION_FORMATS:
            timed = fmt == "csr"
            row = {"model": model_name, "label": lm.label, "method": method, "sparsity": sparsity, "format": fmt,
                   "prompt_tokens": int(prompt.shape[1]), "new_tokens": gen.new_tokens,
                   "tokens_per_s_dense": dense_tps, "tokens_per_s_sparse": sparse_tps if timed else math.nan,
                   "speedup": sparse_tps / dense_tps if timed else math.nan,
                   "byte_limit": dense_b / formats.token_bytes(fmt, layers, other, bits),
                   "run_byte_limit": dense_b / run_b if timed else math.nan,
                   "csr_layers": int(plan.use_csr.sum()) if timed else 0, "layers": len(plan),
                   "checked_speedup": checked if timed else math.nan, "fell_back": bool(timed and checked < 1.0),
                   "stream_gb_s": stream / 1e9, "dense_mb_per_token": dense_b / 1e6,
                   "dense_of_stream": dense_tps * dense_b / stream,
                   "sparse_of_stream": sparse_tps * run_b / stream if timed else math.nan}
            if timed:
                row.update(check, text_dense=text["dense"], text_csr=text["sparse"])
            rows.append(row | {"threads": gen.threads, "repeats": gen.repeats, "load_avg": load})
        del lm, model, aware, csr_model, variants
    return pd.DataFrame(rows)


@memo.step("03-layer-speed")
def models_layer_speed(models, sparsities, timing: Timing) -> pd.DataFrame:
    """:func:`layer_speed` of every distinct prunable shape of ``models``, as a
    cached step (a rerun shows the first run's times)."""
    shapes = sorted({shape for name in models for shape in model_shapes(name)})
    return layer_speed(shapes, sparsities, timing)


@memo.step("03-forward-speed")
def models_forward_speed(models, method: str, sparsities, timing: Timing, layer_sparsities,
                         layer_timing: Timing) -> pd.DataFrame:
    """:func:`forward_sweep` of the first decoder-only model of ``models`` (the
    first model without one), planned on :func:`models_layer_speed`'s table
    of ``layer_sparsities`` timed as ``layer_timing``; a cached step."""
    model = next((m for m in models if resolve(m).family == DECODER_ONLY), models[0])
    speed = models_layer_speed(models, layer_sparsities, layer_timing)
    return forward_sweep(model, method, sparsities, speed, timing)


@memo.step("03-generation-speed")
def models_generation_speed(models, method: str, sparsities, gen: Generation, layer_sparsities,
                            decode_timing: Timing) -> pd.DataFrame:
    """:func:`generation_sweep` of the first decoder-only model of ``models`` (an empty table
    when there is none), planned on :func:`models_layer_speed`'s decode-regime table of
    ``layer_sparsities`` timed as ``decode_timing``; a cached step."""
    model = next((m for m in models if resolve(m).family == DECODER_ONLY), None)
    if model is None:
        return pd.DataFrame()
    speed = models_layer_speed(models, layer_sparsities, decode_timing)
    return generation_sweep(model, method, sparsities, speed, gen)
