"""The pruning engine: a :class:`~lab_utils.engine.config.PruneConfig` in, a pruned model and a
:class:`PruneReport` out; the mask math is :mod:`lab_utils.core.sparsify`.

Calibrated methods run layer-sequentially, as in both papers' reference code but batched:
capture block 0's inputs (hidden states and every keyword argument: attention masks, rotary
embeddings, encoder states), then per block collect its layers' input statistics from the
dense block, prune its layers, and run the pruned block to get the next block's inputs. An
encoder-decoder model does its encoder first, so cross-attention calibrates on what the pruned
encoder produces. Memory stays at the model plus one block's activations.

On an accelerator the model stays in host memory and each block goes there and back
(:func:`block_on`); forward passes run in ``cfg.dtype`` (autocast), statistics and mask math
in float32. ``prune_model(..., offload=True)`` takes that path on the CPU too, with the same
masks bit for bit. :func:`lab_utils.engine.checkpoints.pruned_model` adds the checkpoint cache.

Mixture-of-experts blocks: every expert's projections are pruned as matrices (fused 3-D
parameters or per-expert layers), their statistics taken from the calibration tokens the router
sends that expert (its top-k), and N:M and OWL include them; routers and gates are never pruned.
An expert that receives fewer than :data:`MIN_EXPERT_TOKENS` tokens is pruned by magnitude
instead (no statistics to rank its weights by, and no weight update for SparseGPT): the report
counts those experts (``experts_fallback``). Magnitude, not statistics over every token, because
it needs no extra forward passes and claims no evidence the calibration did not provide.
Every report says which weights ``actual_sparsity`` counts and what fraction of the blocks'
matrix weights the pruner saw (``coverage``); below :data:`MIN_COVERAGE` it warns in one line
naming what it left out.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.profiler import record_function

from lab_utils.core import device as devices
from lab_utils.core import sparsify
from lab_utils.core.measure import PeakMemory
from lab_utils.core.models import (
    LoadedModel,
    coverage,
    expert_of,
    find_layers,
    prunable_layers,
    transformer_blocks,
    weight_out_in,
)
from lab_utils.core.progress import tqdm
from lab_utils.core.sparsify import SparsityError
from lab_utils.engine.calibration import (
    calibration_batches,
    capture_inputs,
    chunks_to,
    collect_statistics,
    propagate,
)
from lab_utils.engine.config import PruneConfig, resolve_config

# the settings every report holds (its first fields)
REPORT_FIELDS = ("method", "sparsity", "pattern", "scope", "nsamples", "seqlen", "seed", "owl", "calibration")
# an expert routed fewer calibration tokens than this is pruned by magnitude: below 64 tokens its
# Hessian has rank < 64 and its input norms are off by ~18% (sqrt(2/64)); a judgment, not a measured optimum
MIN_EXPERT_TOKENS = 64
MIN_COVERAGE = 0.99  # below: one warning line naming the block matrices the pruner left out
COUNTED = ("the linear layers and expert matrices of the transformer blocks (embeddings, head, "
           "norms, biases and routers excluded)")


class CoverageWarning(UserWarning):
    """The pruner saw less than :data:`MIN_COVERAGE` of the blocks' matrix weights."""


# --------------------------------------------------------------------------- pruning one layer
def _layer_seed(seed: int | None, index: int) -> int:
    return (seed or 0) * 1_000_003 + index


@torch.no_grad()
@record_function("lab::prune_layer")  # a named stage for `python -m benchmarks profile`; free otherwise
def prune_layer(module: nn.Module, cfg: PruneConfig, sparsity_ratio: float, stat: dict | None,
                index: int = 0, inverses: dict | None = None) -> None:
    """Prune one linear layer in place with the configured method.

    ``inverses``: SparseGPT's inverse Hessians by ``stat["input"]``, filled
    and reused across the layers of one block that read the same input."""
    W = weight_out_in(module)
    n, m = cfg.prune_n, cfg.prune_m
    if cfg.method == "random":  # host-side generator: the same draw on every device
        W_mask = sparsify.random_mask(W, sparsity_ratio, n, m, cfg.scope,
                                      _layer_seed(cfg.seed, index)).to(W.device)
    elif cfg.method == "magnitude" or stat is None or stat["count"] == 0:
        W_mask = sparsify.magnitude_mask(W, sparsity_ratio, n, m, cfg.scope or "row")
    elif cfg.method == "wanda":
        W_mask = sparsify.wanda_mask(W, stat["sum"] / stat["count"], sparsity_ratio, n, m, cfg.scope)
    else:
        key = stat.get("input")
        shared = inverses if inverses is not None and key is not None else {}
        if key not in shared:
            shared[key] = sparsify.sparsegpt_inverse(stat["sum"].mul_(2.0 / stat["count"]))
        W_new, _ = sparsify.sparsegpt_prune(W, None, sparsity_ratio, n, m, inverse=shared[key])
        W.copy_(W_new.to(W.dtype))
        return
    W.masked_fill_(W_mask, 0)


# --------------------------------------------------------------------------- the report
@dataclass
class PruneReport:
    model: str
    family: str
    method: str
    sparsity: float  # requested
    pattern: str
    scope: str | None
    nsamples: int | None
    seqlen: int | None
    seed: int | None
    owl: bool
    calibration: str | None
    actual_sparsity: float = 0.0  # over actual_sparsity_over
    actual_sparsity_over: str = COUNTED
    actual_sparsity_total: float = 0.0  # over all parameters
    prunable_params: int = 0
    total_params: int = 0
    coverage: float | None = None  # of the blocks' matrix weights, those pruned (None: a report from before)
    left_out: list[str] = field(default_factory=list)  # block matrices the pruner did not see
    experts: int = 0  # experts in the blocks (0: a dense model)
    experts_fallback: int = 0  # experts pruned by magnitude, for lack of calibration tokens
    nm_verified: bool | None = None  # None for unstructured
    nm_violations: int = 0
    seconds: float = 0.0  # wall clock, model loading excluded
    threads: int = 0  # torch threads the pruning ran on (0: not recorded, a checkpoint from before)
    cpu_seconds: float = 0.0  # CPU time of all threads (less sensitive to a busy machine)
    peak_memory_bytes: int = 0  # peak RSS of the process while pruning
    start_memory_bytes: int = 0  # RSS when pruning started (model loaded)
    device: str = "cpu"  # where the blocks were pruned
    dtype: str = "float32"  # of the calibration forward passes
    peak_device_memory_bytes: int | None = None  # allocator peak on an accelerator; None on the CPU
    layers: list[dict] = field(default_factory=list)
    block_sparsity: dict = field(default_factory=dict)  # OWL targets per side
    checkpoint: str | None = None
    key: str = ""
    from_cache: bool = False

    def layer_table(self):
        import pandas as pd  # deferred: the engine needs pandas for this table only

        return pd.DataFrame(self.layers)

    def summary(self) -> dict:
        """The headline numbers (what the command line prints)."""
        keep = ("model", "method", "pattern", "sparsity", "scope", "nsamples", "seqlen", "seed",
                "owl", "actual_sparsity", "actual_sparsity_over", "actual_sparsity_total", "coverage",
                "left_out", "experts", "experts_fallback", "nm_verified", "seconds", "cpu_seconds",
                "peak_memory_bytes", "device", "dtype", "peak_device_memory_bytes", "checkpoint", "key",
                "from_cache")
        return {k: getattr(self, k) for k in keep}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PruneReport:
        return cls(**json.loads(text))

    @classmethod
    def of(cls, model: str, family: str, cfg: PruneConfig, **measured) -> PruneReport:
        """A report of ``cfg``: its keyed settings, as every report has held them."""
        return cls(model, family, **{k: getattr(cfg, k) for k in REPORT_FIELDS}, **measured)


def fill_coverage(report: PruneReport, model: nn.Module) -> None:
    """The report's coverage and the matrices left out; below :data:`MIN_COVERAGE`, one warning line."""
    report.coverage, report.left_out = coverage(model)
    if report.sparsity > 0 and report.coverage < MIN_COVERAGE:
        warnings.warn(f"{report.model}: the pruner saw {report.coverage:.1%} of the block matrices' weights; "
                      f"left out, unpruned and outside actual_sparsity: {', '.join(report.left_out)}",
                      CoverageWarning, stacklevel=3)


def fill_report(report: PruneReport, model: nn.Module, targets: dict[str, float] | None = None) -> None:
    """Measure what the pruning did: sparsity per layer (zeros counted in the weights), over
    the prunable layers and over all parameters, the coverage and the N:M check."""
    rows = []
    for pl in prunable_layers(model):
        W = pl.weight
        rows.append({"name": pl.name, "side": pl.side, "block": pl.block,
                     "component": pl.component, "numel": W.numel(),
                     "zeros": W.numel() - int(torch.count_nonzero(W)), "sparsity": sparsify.sparsity(W),
                     "target": (targets or {}).get(pl.name, report.sparsity)})
    report.layers = rows
    report.experts = len({expert_of(r["name"]) for r in rows} - {None})
    fill_coverage(report, model)
    report.prunable_params = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    report.actual_sparsity = zeros / max(1, report.prunable_params)
    params = list(model.parameters())  # tied tensors once
    report.total_params = sum(p.numel() for p in params)
    # numel - count_nonzero, not (p == 0).sum(): summing a bool tensor materializes it as
    # int64 (2x a float32 embedding's bytes at once) and is ~7x slower on CPU
    zeros_total = sum(p.numel() - int(torch.count_nonzero(p)) for p in params)
    report.actual_sparsity_total = zeros_total / max(1, report.total_params)
    prune_n, prune_m = sparsify.parse_pattern(report.pattern)
    if prune_n:
        report.nm_violations = sum(sparsify.nm_violations(pl.weight, prune_n, prune_m)
                                   for pl in prunable_layers(model))
        report.nm_verified = report.nm_violations == 0
    else:
        report.nm_verified, report.nm_violations = None, 0


# --------------------------------------------------------------------------- the driver
def _sides_in_order(model: nn.Module) -> list[tuple[str, str, nn.ModuleList]]:
    sides = transformer_blocks(model)
    order = [s for s in ("encoder", "decoder") if s in sides]
    return [(s, *sides[s]) for s in order]


def prune_model(lm: LoadedModel, cfg: PruneConfig, *, offload: bool = False,
                batches: list[dict] | None = None) -> PruneReport:
    """Prune ``lm.model`` in place as ``cfg`` (resolved first) says and return the measured
    sparsity per layer and overall, the N:M check, the time and the peak memory.

    The blocks are pruned on ``cfg.device``, each moved there and back when the model sits
    elsewhere; ``offload=True`` takes that path even when it is already there. ``batches``
    replaces the calibration batches drawn from ``cfg`` (as
    :func:`~lab_utils.engine.calibration.calibration_batches` makes them: a model built from
    its configuration has no tokenizer)."""
    cfg = resolve_config(lm.spec, cfg, lm.model.config)
    report = PruneReport.of(lm.spec.name, lm.family, cfg, threads=torch.get_num_threads(),
                            device=cfg.device, dtype=cfg.dtype)
    model = lm.model
    model.eval()
    targets: dict[str, float] = {}
    device = torch.device(cfg.device)
    devices.reset_peak_memory(device)
    with PeakMemory() as mem, torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        if cfg.sparsity > 0:
            with record_function("lab::prune"):
                targets, report.block_sparsity, fallback = _prune(lm, cfg, offload=offload, batches=batches)
            report.experts_fallback = len(fallback)
        devices.synchronize(device)
        report.seconds = time.perf_counter() - t0
        report.cpu_seconds = time.process_time() - c0
    report.peak_memory_bytes, report.start_memory_bytes = mem.peak, mem.start
    report.peak_device_memory_bytes = devices.peak_memory(device)
    fill_report(report, model, targets)
    return report


@contextlib.contextmanager
def block_on(block: nn.Module, device: torch.device, offload: bool):
    """Run the body with ``block``'s parameters and buffers on ``device``,
    then copy them back into the host tensors they came from (the pruned
    weights with them). Without ``offload`` the block stays where it is."""
    if not offload:
        yield
        return
    host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in [*block.parameters(), *block.buffers()]:
        if id(t) not in host:  # a tensor tied twice inside the block moves once
            host[id(t)] = (t, t.data)
            t.data = t.data.to(device, copy=True)
    try:
        yield
    finally:
        for t, data in host.values():
            data.copy_(t.data)
            t.data = data


def _forward(device: torch.device, dtype: torch.dtype):
    """The forward passes in ``dtype`` (autocast); float32 runs as it is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _placement(model: nn.Module, cfg: PruneConfig, offload: bool) -> tuple[torch.device, torch.device, bool]:
    """(device to prune on, device the model sits on, whether blocks move):
    a model in host memory is pruned on an accelerator block by block."""
    device, home = torch.device(cfg.device), devices.model_device(model)
    same = device.type == home.type and (device.index is None or device.index == home.index)
    return (home if same else device), home, offload or not same


def _with_tokens(name: str, stat: dict | None) -> dict | None:
    """A layer's statistics, or None for an expert routed fewer than :data:`MIN_EXPERT_TOKENS`
    tokens (pruned by magnitude)."""
    if stat is not None and expert_of(name) and stat["count"] < max(1, MIN_EXPERT_TOKENS):
        return None
    return stat


def _prune(lm: LoadedModel, cfg: PruneConfig, *, offload: bool = False,
           batches: list[dict] | None = None) -> tuple[dict[str, float], dict, set[str]]:
    """Prune every block; return the target sparsity of each layer (by name), OWL's sparsity
    per block and side (empty without OWL) and the experts pruned by magnitude for lack of tokens."""
    model = lm.model
    sides = _sides_in_order(model)
    if not sides:
        raise SparsityError(f"{lm.spec.name}: no transformer blocks found to prune")
    block_sparsity = {side: [cfg.sparsity] * len(blocks) for side, _, blocks in sides}

    if not cfg.calibrated:
        return _prune_uncalibrated(model, cfg), {}, set()

    if batches is None:
        batches = calibration_batches(lm, cfg.nsamples, cfg.seqlen, cfg.seed or 0, cfg.calibration,
                                      cfg.batch_tokens)
    device, _home, offload = _placement(model, cfg, offload)
    dtype = devices.DTYPES[cfg.dtype]
    owl_sparsity: dict = {}
    if cfg.owl:
        block_sparsity = owl_sparsity = _owl_allocation(model, sides, batches, cfg, device, offload)

    targets: dict[str, float] = {}
    fallback: set[str] = set()
    index = 0
    for side, prefix, blocks in sides:
        # the model runs up to the side's first block where it sits (the host, when offloading)
        chunks = capture_inputs(model, blocks[0], batches, side)
        with record_function("lab::copies"):
            chunks_to(chunks, device, dtype, copy=offload)
        desc = f"{cfg.method} {side}"
        for i, block in enumerate(tqdm(blocks, desc=desc, leave=False)):
            with block_on(block, device, offload):
                layers = find_layers(block)
                s = block_sparsity[side][i]
                stats = {}
                if cfg.method in sparsify.CALIBRATED:
                    kind = "hessian" if cfg.method == "sparsegpt" else "norm"
                    with _forward(device, dtype):
                        stats = collect_statistics(block, layers, chunks, kind)
                # the mask math in float32 whatever the forward dtype: Wanda's and SparseGPT's
                # rankings tie-break on the last bits, and the Cholesky of X^T X in bfloat16
                # (8 bits of mantissa) loses rank; sparsify casts to float32 itself
                inverses: dict = {}
                for name, module in layers.items():
                    stat = _with_tokens(name, stats.get(name))
                    if stat is None and name in stats:
                        fallback.add(f"{prefix}.{i}.{expert_of(name)}")
                    prune_layer(module, cfg, s, stat, index, inverses=inverses)
                    targets[f"{prefix}.{i}.{name}"] = s
                    index += 1
                del stats, inverses
                if i + 1 < len(blocks):  # the last block's outputs feed nothing we calibrate
                    with _forward(device, dtype):
                        propagate(block, chunks)
        del chunks
    return targets, owl_sparsity, fallback


def _prune_uncalibrated(model: nn.Module, cfg: PruneConfig) -> dict[str, float]:
    """Random or magnitude pruning, layer by layer or over all layers at once
    (scope 'global'); returns the target sparsity of each layer."""
    targets: dict[str, float] = {}
    layers = prunable_layers(model)
    if cfg.scope == "global" and not cfg.prune_n:
        if cfg.method == "random":
            g = torch.Generator().manual_seed(_layer_seed(cfg.seed, 0))
            metrics = [torch.rand(pl.shape, generator=g) for pl in layers]
        else:
            metrics = [pl.weight.abs() for pl in layers]
        masks = sparsify.global_masks(metrics, cfg.sparsity)
        del metrics
        for pl, W_mask in zip(layers, masks, strict=True):
            pl.weight.masked_fill_(W_mask, 0)
            targets[pl.name] = cfg.sparsity
        return targets
    for index, pl in enumerate(tqdm(layers, desc=cfg.method, leave=False)):
        prune_layer(pl.module, cfg, cfg.sparsity, None, index)
        targets[pl.name] = cfg.sparsity
    return targets


def _owl_allocation(model: nn.Module, sides: list[tuple[str, str, nn.ModuleList]], batches: list[dict],
                    cfg: PruneConfig, device: torch.device, offload: bool = False) -> dict[str, list[float]]:
    """OWL: outlier ratio of every block of the dense model (Wanda scores above
    ``cfg.owl_m`` times their block mean), turned into per-block sparsities whose
    mean is ``cfg.sparsity`` (per side for an encoder-decoder model), spread by
    ``cfg.owl_lambda``. The forward passes run on ``device`` in ``cfg.dtype``."""
    dtype = devices.DTYPES[cfg.dtype]
    ratios: dict[str, list[float]] = {}
    for side, _prefix, blocks in sides:
        chunks = capture_inputs(model, blocks[0], batches, side)
        chunks_to(chunks, device, dtype, copy=offload)
        ratios[side] = []
        for block in tqdm(blocks, desc=f"owl {side}", leave=False):
            with block_on(block, device, offload):
                layers = find_layers(block)
                with _forward(device, dtype):
                    stats = collect_statistics(block, layers, chunks, "norm", propagate=True)
                metrics = [_owl_metric(weight_out_in(m), _with_tokens(n, stats[n])) for n, m in layers.items()]
                ratios[side].append(sparsify.outlier_ratio(metrics, cfg.owl_m))
        del chunks
    return {side: sparsify.owl_sparsities(r, cfg.sparsity, cfg.owl_lambda) for side, r in ratios.items()}


def _owl_metric(W: torch.Tensor, stat: dict | None) -> torch.Tensor:
    """Wanda's score of ``W``; an expert without enough tokens counts by magnitude, as it is pruned."""
    if stat is None:
        return W.abs().float()
    return sparsify.wanda_metric(W, stat["sum"] / max(1, stat["count"]))
