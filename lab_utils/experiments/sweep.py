"""The sparsification sweep of notebook 03: prune every model with every method, pattern and
sparsity; measure the sparsity asked and obtained, the time and, for decoder-only models, the
perplexity. Checkpoints and perplexities are cached, so a rerun takes seconds.
:func:`settings` expands methods x patterns x sparsities (for the benchmarks too); figures are
drawn by :mod:`lab_utils.presentation.sweep_view`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import pandas as pd
import psutil

from lab_utils.core import memo, sparsify
from lab_utils.core.device import resolved
from lab_utils.core.evaluation import perplexity
from lab_utils.core.models import DECODER_ONLY, LoadedModel, load_model, resolve
from lab_utils.engine import checkpoints, prune
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments import executor as ex

DENSE = "dense"  # the method of the baseline setting


@dataclass(frozen=True)
class SweepConfig:
    """The settings of notebook 03's sweep and OWL comparison: which models,
    methods, patterns and sparsities, the calibration (``nsamples`` windows of
    ``seqlen`` tokens, ``seed``), the perplexity windows (``eval_windows`` of
    ``eval_seqlen`` tokens) and where pruning runs. ``device`` and ``dtype``
    are resolved when the config is made ("auto" becomes this machine's), so
    a cached table is keyed by the hardware that computed it."""

    models: tuple
    methods: tuple = ("magnitude", "wanda", "sparsegpt")
    patterns: tuple = (sparsify.UNSTRUCTURED,)
    sparsities: tuple = (0.5,)
    nsamples: int = 16
    seqlen: int | None = 256
    seed: int = 0
    eval_windows: int = 8
    eval_seqlen: int | None = 256
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        for name in ("models", "methods", "patterns", "sparsities"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        device, dtype = resolved(self.device, self.dtype)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "dtype", dtype)

    def prune_config(self, method: str, sparsity: float, pattern: str = sparsify.UNSTRUCTURED,
                     owl: bool = False) -> PruneConfig:
        """One setting of the sweep as the engine takes it."""
        return PruneConfig(method, sparsity, pattern, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed,
                           owl=owl, device=self.device, dtype=self.dtype)


def settings(methods, patterns, sparsities) -> list[tuple[str, str, float]]:
    """(method, pattern, requested sparsity) to run: the dense baseline
    ``("dense", "unstructured", 0.0)`` first, then for each pattern (each
    requested sparsity above 0 for ``unstructured``, N/M for an N:M pattern)
    every method; a repeated setting once. An unknown method, pattern or a
    sparsity outside [0, 1) is refused in one line."""
    for m in methods:
        sparsify.check_method(m)
    configs = []
    for p in patterns:
        n, m = sparsify.parse_pattern(p)
        if n:
            configs.append((sparsify.pattern_name(n, m), n / m))
        else:
            configs += [(sparsify.UNSTRUCTURED, sparsify.check_sparsity_ratio(s))
                        for s in sorted(set(sparsities)) if s > 0]
    out = [(DENSE, sparsify.UNSTRUCTURED, 0.0)]
    out += [(method, pattern, float(s)) for pattern, s in configs for method in methods]
    return list(dict.fromkeys(out))


_DENSE: dict[str, LoadedModel] = {}  # the dense model of the last job here (jobs come grouped by model)


def dense_model(model_name: str) -> LoadedModel:
    """The dense model, loaded once per process (one held at a time): a job prunes a copy of it
    (or reads its checkpoint into one). Loading reads and converts the whole folder, its
    tokenizer too, several times the cost of the copy; :func:`release` lets it go."""
    if model_name in _DENSE:
        return _DENSE[model_name]
    release()
    lm = load_model(model_name)
    # held only when it and a pruned copy take under half the free memory: a large model is
    # loaded per job instead of being doubled in every worker
    if 2 * sum(p.numel() * p.element_size() for p in lm.model.parameters()) < psutil.virtual_memory().available / 2:
        _DENSE[model_name] = lm
    return lm


def release() -> None:
    """Drop the dense model that :func:`dense_model` holds."""
    _DENSE.clear()


def run_one(model_name: str, cfg: PruneConfig, sweep: SweepConfig) -> tuple[dict, prune.PruneReport]:
    """Prune (or load from the cache) and measure one configuration, on
    ``cfg.device`` (the engine moves one block at a time there; the perplexity,
    ``sweep.eval_windows`` of ``sweep.eval_seqlen`` tokens, is measured there too)."""
    lm, report = checkpoints.pruned_model(dense_model(model_name), cfg)  # a copy, or the dense model itself
    ppl = math.nan
    if lm.family == DECODER_ONLY:
        if sweep.device != "cpu":  # the held dense model stays in host memory for the next copies
            lm = dataclasses.replace(lm, model=copy.deepcopy(lm.model) if cfg.sparsity == 0 else lm.model)
            lm.model.to(sweep.device)
        ppl = perplexity.evaluate(lm, sweep.eval_seqlen, sweep.eval_windows, cache_key=report.key)["perplexity"]
    pruned = cfg.sparsity > 0
    row = {"model": lm.label, "family": lm.family, "method": cfg.method if pruned else DENSE,
           "pattern": cfg.pattern if pruned else "-", "owl": cfg.owl, "requested": cfg.sparsity,
           "actual": report.actual_sparsity, "actual_total": report.actual_sparsity_total,
           "coverage": report.coverage,
           "nm_ok": report.nm_verified, "seconds": report.seconds, "cpu_seconds": report.cpu_seconds,
           "threads": report.threads,
           "peak_memory_gib": report.peak_memory_bytes / 2**30, "perplexity": ppl,
           "cached": report.from_cache}
    return row, report


@memo.step("03-sweep", ignore=("executor", "workers"))
def sparsity_sweep(cfg: SweepConfig, executor: str | ex.Executor = ex.LOCAL,
                   workers: int | None = None) -> pd.DataFrame:
    """One row per (model, method, pattern, sparsity) of ``cfg``, plus one dense row per
    model: requested vs actual sparsity, seconds, peak memory, perplexity. A cached step
    (``sparsity_sweep.compute`` recomputes).

    The settings are jobs on ``executor`` (:func:`lab_utils.experiments.executor.run_jobs`:
    ``"local"``: ``workers`` processes of one thread each; ``"serial"``: here, in turn; a
    scheduler address or file: that cluster, asking for ``{"GPU": 1}`` on an accelerator
    ``device``). Part of pruning runs on one core, so two side by side finish sooner; each
    row's ``seconds`` is then its own wall time with another job beside it.
    """
    grid = settings(cfg.methods, cfg.patterns, cfg.sparsities)  # the dense baseline first
    # each model's jobs together: a worker then loads a model once for a run of its jobs
    jobs = [(m, "magnitude" if meth == DENSE else meth, pat, s) for m in cfg.models for meth, pat, s in grid]
    try:
        rows = ex.run_jobs(
            sweep_job, [{"model_name": m, "cfg": cfg.prune_config(meth, s, pat), "sweep": cfg}
                        for m, meth, pat, s in jobs],
            executor, workers=workers, desc="sweep", resources=ex.accelerator_resources(cfg.device),
            describe=lambda j: f"pruning {j['model_name']} ({j['cfg'].method}, {j['cfg'].pattern}, "
                               f"{j['cfg'].sparsity:g})")
    finally:
        release()  # jobs run here (serial) leave their model behind
    # the rows as before: the dense ones first, then each model's settings
    rows = [r for _, r in sorted(enumerate(rows), key=lambda ir: (jobs[ir[0]][3] > 0, ir[0]))]
    df = pd.DataFrame(rows)
    dense = df[df.method == DENSE].set_index("model").perplexity
    df["ppl_vs_dense"] = df.perplexity / df.model.map(dense)
    return df


def sweep_job(model_name: str, cfg: PruneConfig, sweep: SweepConfig) -> dict:
    """One row of :func:`sparsity_sweep` (what a worker runs)."""
    return run_one(model_name, cfg, sweep)[0]


@memo.step("03-owl")
def owl_comparison(cfg: SweepConfig, method: str, sparsity: float):
    """Uniform vs OWL allocation at the same mean sparsity, on the first
    decoder-only model of ``cfg.models``; a cached step.

    Returns (layers, summary): the actual sparsity of every prunable layer
    under both allocations (block, component, side), and one row per
    allocation with its perplexity and actual sparsity; (None, None) without
    a decoder-only model.
    """
    model = next((m for m in cfg.models if resolve(m).family == DECODER_ONLY), None)
    if model is None:
        return None, None
    rows, tables = [], []
    try:
        for owl in (False, True):
            row, report = run_one(model, cfg.prune_config(method, sparsity, owl=owl), cfg)
            row["allocation"] = "OWL" if owl else "uniform"
            rows.append(row)
            t = report.layer_table()[["name", "side", "block", "component", "numel", "sparsity"]]
            tables.append(t.assign(allocation=row["allocation"]))
    finally:
        release()
    return pd.concat(tables, ignore_index=True), pd.DataFrame(rows)
