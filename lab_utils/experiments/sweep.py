"""The sparsification sweep of notebook 03: prune every model with every method,
pattern and sparsity; measure what was asked against what came out, the time it
took and, for decoder-only models, the perplexity it cost.

Everything is cached (pruned checkpoints by :func:`lab_utils.engine.checkpoints.pruned_model`,
perplexities by :func:`lab_utils.core.evaluation.perplexity.evaluate`), so a rerun of
the report takes seconds. :func:`settings` expands methods x patterns x
sparsities into the settings an experiment runs (the benchmarks too).
Functions return tables; figures are drawn by :mod:`lab_utils.presentation.sweep_view`.
"""

from __future__ import annotations

import math

import pandas as pd

from lab_utils.core import sparsify
from lab_utils.core.evaluation import perplexity
from lab_utils.core.models import DECODER_ONLY
from lab_utils.engine import checkpoints, prune
from lab_utils.experiments import jobs as side_by_side

DENSE = "dense"  # the method of the baseline setting


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


def run_one(model_name: str, method: str, sparsity: float, pattern: str = "unstructured", *,
            nsamples: int, seqlen: int | None, seed: int = 0, owl: bool = False,
            eval_windows: int = 8, eval_seqlen: int | None = None,
            progress: bool = True) -> tuple[dict, prune.PruneReport]:
    """Prune (or load from the cache) and measure one configuration."""
    lm, report = checkpoints.pruned_model(model_name, method, sparsity, pattern, nsamples=nsamples,
                                    seqlen=seqlen, seed=seed, owl=owl, progress=progress)
    ppl = math.nan
    if lm.family == DECODER_ONLY:
        ppl = perplexity.evaluate(lm, eval_seqlen, eval_windows, cache_key=report.key,
                                  progress=progress)["perplexity"]
    row = {"model": lm.label, "family": lm.family, "method": method if sparsity > 0 else "dense",
           "pattern": pattern if sparsity > 0 else "-", "owl": owl, "requested": sparsity,
           "actual": report.actual_sparsity, "actual_total": report.actual_sparsity_total,
           "nm_ok": report.nm_verified, "seconds": report.seconds, "cpu_seconds": report.cpu_seconds,
           "threads": report.threads,
           "peak_memory_gib": report.peak_memory_bytes / 2**30, "perplexity": ppl,
           "cached": report.from_cache}
    return row, report


def sparsity_sweep(models, methods, patterns, sparsities, *, nsamples: int = 16,
                   seqlen: int | None = 256, seed: int = 0, eval_windows: int = 8,
                   eval_seqlen: int | None = 256, progress: bool = True,
                   workers: int | None = None) -> pd.DataFrame:
    """One row per (model, method, pattern, sparsity), plus one dense row per
    model; requested vs actual sparsity, seconds, peak memory, perplexity.

    The configurations run two at a time in worker processes on one thread
    each (:mod:`lab_utils.experiments.jobs`; ``workers=1``: here, in turn): part of
    pruning runs on one core whatever the thread count, so two side by side
    finish sooner. Each row's ``seconds`` is then its own wall time with the
    other configuration running beside it, and ``threads`` says so.
    """
    grid = settings(methods, patterns, sparsities)  # the dense baseline first
    jobs = [(m, None, "-", 0.0) for m in models]
    jobs += [(m, meth, pat, s) for m in models for meth, pat, s in grid[1:]]
    rows = side_by_side.run_side_by_side(
        "lab_utils.experiments.sweep:sweep_job",
        [{"model_name": m, "method": meth or "magnitude", "sparsity": s, "pattern": pat if s else "unstructured",
          "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_windows": eval_windows,
          "eval_seqlen": eval_seqlen} for m, meth, pat, s in jobs],
        workers=side_by_side.WORKERS if workers is None else workers, progress=progress, desc="sweep",
        describe=lambda j: f"pruning {j['model_name']} ({j['method']}, {j['pattern']}, {j['sparsity']:g})")
    df = pd.DataFrame(rows)
    dense = df[df.method == "dense"].set_index("model").perplexity
    df["ppl_vs_dense"] = df.perplexity / df.model.map(dense)
    return df


def sweep_job(model_name: str, method: str, sparsity: float, pattern: str, **kw) -> dict:
    """One row of :func:`sparsity_sweep` (what a worker runs)."""
    return run_one(model_name, method, sparsity, pattern, progress=False, **kw)[0]


def owl_comparison(model_name: str, method: str, sparsity: float, *, nsamples: int = 16,
                   seqlen: int | None = 256, seed: int = 0, eval_windows: int = 8,
                   eval_seqlen: int | None = 256,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Uniform vs OWL allocation at the same mean sparsity.

    Returns (layers, summary): the actual sparsity of every prunable layer
    under both allocations (block, component, side), and one row per
    allocation with its perplexity (decoder-only) and actual sparsity.
    """
    rows, tables = [], []
    for owl in (False, True):
        row, report = run_one(model_name, method, sparsity, nsamples=nsamples, seqlen=seqlen,
                              seed=seed, owl=owl, eval_windows=eval_windows,
                              eval_seqlen=eval_seqlen, progress=progress)
        row["allocation"] = "OWL" if owl else "uniform"
        rows.append(row)
        t = report.layer_table()[["name", "side", "block", "component", "numel", "sparsity"]]
        tables.append(t.assign(allocation=row["allocation"]))
    return pd.concat(tables, ignore_index=True), pd.DataFrame(rows)


def cached_sweep(models, methods, patterns, sparsities, *, nsamples: int, seqlen: int | None, seed: int,
                 eval_windows: int, eval_seqlen: int | None, progress: bool = True) -> pd.DataFrame:
    """:func:`sparsity_sweep` as a cached step (:func:`lab_utils.core.memo.cached`),
    keyed by every argument that changes the table."""
    from lab_utils.core import memo

    key = {"models": models, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_windows": eval_windows,
           "eval_seqlen": eval_seqlen, "methods": methods, "patterns": patterns, "sparsities": sparsities}
    return memo.cached("03-sweep", key, lambda: sparsity_sweep(
        models, methods, patterns, sparsities, nsamples=nsamples, seqlen=seqlen, seed=seed,
        eval_windows=eval_windows, eval_seqlen=eval_seqlen, progress=progress))


def cached_owl(models, method: str, sparsity: float, *, nsamples: int, seqlen: int | None, seed: int,
               eval_windows: int, eval_seqlen: int | None, progress: bool = True):
    """:func:`owl_comparison` as a cached step on the first decoder-only model
    of ``models``: (layers, summary), or (None, None) without one."""
    from lab_utils.core import memo
    from lab_utils.core.models import resolve

    model = next((m for m in models if resolve(m).family == DECODER_ONLY), None)
    if model is None:
        return None, None
    key = {"models": models, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_windows": eval_windows,
           "eval_seqlen": eval_seqlen, "model": model, "method": method, "sparsity": sparsity}
    return memo.cached("03-owl", key, lambda: owl_comparison(
        model, method, sparsity, nsamples=nsamples, seqlen=seqlen, seed=seed, eval_windows=eval_windows,
        eval_seqlen=eval_seqlen, progress=progress))
