"""The sparsification sweep of notebook 03: prune every model with every method,
pattern and sparsity; measure what was asked against what came out, the time it
took and, for decoder-only models, the perplexity it cost.

Everything is cached (pruned checkpoints by :func:`lab_utils.prune.pruned_model`,
perplexities by :func:`lab_utils.evaluation.perplexity.evaluate`), so a rerun of
the report takes seconds. Functions return tables; figures are written to
``figs/`` with deterministic names and bytes.
"""

from __future__ import annotations

import math

import pandas as pd

from lab_utils.core import sparsify
from lab_utils.core.models import DECODER_ONLY
from lab_utils.engine import checkpoints, prune


def _configs(patterns, sparsities) -> list[tuple[str, float]]:
    """(pattern, requested sparsity): every sparsity for unstructured, N/M for N:M."""
    out = []
    for p in patterns:
        n, m = sparsify.parse_pattern(p)
        if n:
            out.append((sparsify.pattern_name(n, m), n / m))
        else:
            out += [(sparsify.UNSTRUCTURED, float(s)) for s in sorted(set(sparsities)) if s > 0]
    return out


def run_one(model_name: str, method: str, sparsity: float, pattern: str = "unstructured", *,
            nsamples: int, seqlen: int | None, seed: int = 0, owl: bool = False,
            eval_windows: int = 8, eval_seqlen: int | None = None,
            progress: bool = True) -> tuple[dict, prune.PruneReport]:
    """Prune (or load from the cache) and measure one configuration."""
    from lab_utils.core.evaluation import perplexity

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
    each (:mod:`lab_utils.workers`; ``workers=1``: here, in turn): part of
    pruning runs on one core whatever the thread count, so two side by side
    finish sooner. Each row's ``seconds`` is then its own wall time with the
    other configuration running beside it, and ``threads`` says so.
    """
    from lab_utils.experiments import jobs as side_by_side

    jobs = [(m, None, "-", 0.0) for m in models]
    jobs += [(m, meth, pat, s) for m in models for pat, s in _configs(patterns, sparsities)
             for meth in methods]
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
