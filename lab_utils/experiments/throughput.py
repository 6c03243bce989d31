"""Notebook 04's speed table: whole-forward throughput, dense vs sparse-aware.

Each prunable layer runs as CSR where the per-shape crossover measured by
:func:`lab_utils.experiments.speed.layer_speed` says it pays, dense elsewhere,
and the plan is kept only if it is faster end to end
(:func:`lab_utils.experiments.speed.forward_sweep`; medians after warm-up,
timed in turns). The weights come from magnitude pruning: a CSR matmul's time
depends on how many weights are kept, not on which, so one method stands for all.
"""

from __future__ import annotations

import pandas as pd

from lab_utils.core import memo
from lab_utils.experiments import speed, sweep

COLUMNS = ["model", "label", "sparsity", "tokens", "dense_tokens_per_s", "sparse_aware_tokens_per_s",
           "sparse_aware_speedup", "csr_layers", "layers", "checked_speedup", "fell_back",
           "flop_limit", "threads", "repeats", "load_avg"]


@memo.step("04-speed")
def _measured(model_name: str, sparsities: list[float], timing: speed.Timing, margin: float) -> pd.DataFrame:
    layers = speed.layer_speed(speed.model_shapes(model_name), sparsities, timing)
    fwd = speed.forward_sweep(model_name, "magnitude", sparsities, layers, timing, margin=margin, all_csr=False)
    fwd["dense_tokens_per_s"] = fwd.tokens / fwd.dense_s
    fwd["sparse_aware_tokens_per_s"] = fwd.tokens / fwd.sparse_aware_s
    return fwd[COLUMNS].reset_index(drop=True)


def speed_table(model_name: str, sparsities, timing: speed.Timing | None = None,
                margin: float = 0.1) -> pd.DataFrame:
    """Tokens/s of ``model_name`` dense and sparse-aware at each sparsity above 0
    (default timing: 256 tokens, one warm-up, medians of 3), measured once and
    then read from the cache (delete ``cache_dir()/steps/04-speed-*`` to time again)."""
    sparsities = sorted({float(s) for s in sparsities if s > 0})
    return _measured(model_name, sparsities, timing or speed.Timing(tokens=256, warmup=1, repeats=3), margin)


def speed_comparison(models, methods, patterns, sparsities, tokens: int = 256, repeats: int = 3) -> pd.DataFrame:
    """:func:`speed_table` of each of ``models`` at every sparsity the settings
    of ``methods`` x ``patterns`` x ``sparsities`` reach (dense excluded)."""
    reached = sorted({s for _, _, s in sweep.settings(methods, patterns, sparsities)} - {0.0})
    timing = speed.Timing(tokens=tokens, warmup=1, repeats=repeats)
    return pd.concat([speed_table(m, reached, timing) for m in models], ignore_index=True)
