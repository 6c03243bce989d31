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
from torch import device as torch_device

from lab_utils.core import memo, sparsify
from lab_utils.core.device import resolved
from lab_utils.core.evaluation import perplexity
from lab_utils.core.models import DECODER_ONLY, resolve
from lab_utils.engine import checkpoints, prune
from lab_utils.experiments import executor as ex

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
            eval_windows: int = 8, eval_seqlen: int | None = None, device: str = "cpu",
            dtype: str = "float32", progress: bool = True) -> tuple[dict, prune.PruneReport]:
    """Prune (or load from the cache) and measure one configuration, on
    ``device`` (the engine moves one block at a time there; the perplexity is
    measured there too) with forward passes in ``dtype``."""
    lm, report = checkpoints.pruned_model(model_name, method, sparsity, pattern, nsamples=nsamples,
                                          seqlen=seqlen, seed=seed, owl=owl, device=device, dtype=dtype,
                                          progress=progress)
    ppl = math.nan
    if lm.family == DECODER_ONLY:
        if device != "cpu":
            lm.model.to(device)
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
                   executor: str | ex.Executor = ex.LOCAL, workers: int | None = None,
                   device: str = "auto", dtype: str = "auto") -> pd.DataFrame:
    """One row per (model, method, pattern, sparsity), plus one dense row per
    model; requested vs actual sparsity, seconds, peak memory, perplexity.

    The configurations are independent jobs on ``executor``
    (:func:`lab_utils.experiments.executor.run_jobs`: ``"local"`` runs them on
    ``workers`` processes of this machine, one thread each; ``workers=1`` or
    ``"serial"``: here, in turn; a scheduler address or file: on that cluster,
    where a job on an accelerator ``device`` asks a worker for ``{"GPU": 1}``). Part of
    pruning runs on one core whatever the thread count, so two side by side
    finish sooner; each row's ``seconds`` is then its own wall time with the
    other configuration running beside it, and ``threads`` says so. The rows come
    back from the jobs; the checkpoints they write stay in the cache.
    """
    device, dtype = resolved(device, dtype)
    grid = settings(methods, patterns, sparsities)  # the dense baseline first
    jobs = [(m, None, "-", 0.0) for m in models]
    jobs += [(m, meth, pat, s) for m in models for meth, pat, s in grid[1:]]
    rows = ex.run_jobs(
        sweep_job,
        [{"model_name": m, "method": meth or "magnitude", "sparsity": s, "pattern": pat if s else "unstructured",
          "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_windows": eval_windows,
          "eval_seqlen": eval_seqlen, "device": device, "dtype": dtype} for m, meth, pat, s in jobs],
        executor, workers=workers, progress=progress, desc="sweep",
        resources=ex.accelerator_resources(device),
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
                   eval_seqlen: int | None = 256, device: str = "auto", dtype: str = "auto",
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Uniform vs OWL allocation at the same mean sparsity.

    Returns (layers, summary): the actual sparsity of every prunable layer
    under both allocations (block, component, side), and one row per
    allocation with its perplexity (decoder-only) and actual sparsity.
    """
    device, dtype = resolved(device, dtype)
    rows, tables = [], []
    for owl in (False, True):
        row, report = run_one(model_name, method, sparsity, nsamples=nsamples, seqlen=seqlen,
                              seed=seed, owl=owl, eval_windows=eval_windows,
                              eval_seqlen=eval_seqlen, device=device, dtype=dtype, progress=progress)
        row["allocation"] = "OWL" if owl else "uniform"
        rows.append(row)
        t = report.layer_table()[["name", "side", "block", "component", "numel", "sparsity"]]
        tables.append(t.assign(allocation=row["allocation"]))
    return pd.concat(tables, ignore_index=True), pd.DataFrame(rows)


def cached_sweep(models, methods, patterns, sparsities, *, nsamples: int, seqlen: int | None, seed: int,
                 eval_windows: int, eval_seqlen: int | None, progress: bool = True,
                 executor: str = ex.LOCAL, device: str = "auto", dtype: str = "auto") -> pd.DataFrame:
    """:func:`sparsity_sweep` as a cached step (:func:`lab_utils.core.memo.cached`),
    keyed by every argument that changes the table (not ``executor``: where the
    jobs run does not change their results)."""
    key = {"models": models, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_windows": eval_windows,
           "eval_seqlen": eval_seqlen, "methods": methods, "patterns": patterns, "sparsities": sparsities,
           **_device_key(device, dtype)}
    return memo.cached("03-sweep", key, lambda: sparsity_sweep(
        models, methods, patterns, sparsities, nsamples=nsamples, seqlen=seqlen, seed=seed,
        eval_windows=eval_windows, eval_seqlen=eval_seqlen, progress=progress, executor=executor,
        device=device, dtype=dtype))


def _device_key(device: str, dtype: str) -> dict:
    """The device part of a step key: empty for the CPU in float32 (the keys
    of every CPU run stay what they were), else the device type and dtype."""
    device, dtype = resolved(device, dtype)
    if (device, dtype) == ("cpu", "float32"):
        return {}
    return {"device": torch_device(device).type, "dtype": dtype}


def cached_owl(models, method: str, sparsity: float, *, nsamples: int, seqlen: int | None, seed: int,
               eval_windows: int, eval_seqlen: int | None, progress: bool = True,
               device: str = "auto", dtype: str = "auto"):
    """:func:`owl_comparison` as a cached step on the first decoder-only model
    of ``models``: (layers, summary), or (None, None) without one."""
    model = next((m for m in models if resolve(m).family == DECODER_ONLY), None)
    if model is None:
        return None, None
    key = {"models": models, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_windows": eval_windows,
           "eval_seqlen": eval_seqlen, "model": model, "method": method, "sparsity": sparsity,
           **_device_key(device, dtype)}
    return memo.cached("03-owl", key, lambda: owl_comparison(
        model, method, sparsity, nsamples=nsamples, seqlen=seqlen, seed=seed, eval_windows=eval_windows,
        eval_seqlen=eval_seqlen, device=device, dtype=dtype, progress=progress))
