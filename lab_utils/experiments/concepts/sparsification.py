"""Sparsification: zeros in tensors that keep their shape.

The pruned model comes from the lab's one way to get one
(:func:`lab_utils.engine.checkpoints.pruned_model`, given the loaded dense
model); this module only lays the dense and the sparsified model side by side:
the parameter count, the zeros, the dense file, a sparse-format file, the
memory, the forward time and the perplexity.
"""

from __future__ import annotations

import pandas as pd
import torch

from lab_utils.core.models import LoadedModel
from lab_utils.engine import checkpoints
from lab_utils.experiments.concepts import costs


def compare(dense: torch.nn.Module, sparse: torch.nn.Module, windows: torch.Tensor,
            time_ids: torch.Tensor, dense_ppl: float | None = None, sparse_format: str = "bitmask",
            reps: int = 5, dense_file: int | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per model: what sparsification changes and what it does not.

    ``dense_ppl`` and ``dense_file`` (the dense model's perplexity on the same
    windows and its checkpoint size) save measuring them again."""
    speed = costs.forward_seconds_each({"dense": dense, "sparsified": sparse}, time_ids, reps)
    rows = []
    for name, model in (("dense", dense), ("sparsified", sparse)):
        zeros = costs.count_zeros(model)
        rows.append({
            "model": name, "parameters": zeros["parameters"], "zeros": zeros["zeros"],
            "zero_fraction": zeros["zeros"] / zeros["parameters"],
            "prunable_zero_fraction": zeros["prunable_zeros"] / zeros["prunable"],
            "dense_file_bytes": dense_file if name == "dense" and dense_file is not None
            else costs.dense_file_bytes(model),
            f"{sparse_format}_file_bytes": costs.sparse_file_bytes(model, sparse_format),
            "memory_bytes": costs.model_bytes(model), **speed[name],
            "perplexity": dense_ppl if name == "dense" and dense_ppl is not None
            else costs.perplexity(model, windows, progress=progress),
        })
    return pd.DataFrame(rows)


def demo(lm: LoadedModel, sparsity_ratio: float, method: str, windows: torch.Tensor,
         time_ids: torch.Tensor, dense_ppl: float | None = None, dense_file: int | None = None,
         reps: int = 5, progress: bool = True, **prune_kw) -> pd.DataFrame:
    """Prune a copy of ``lm`` and return :func:`compare`'s table (the copy is
    freed). ``prune_kw``: the other settings of
    :func:`~lab_utils.engine.checkpoints.pruned_model` (nsamples, seqlen, seed
    for the calibrated methods)."""
    sparse_lm, _ = checkpoints.pruned_model(lm, method, sparsity_ratio, progress=progress, **prune_kw)
    return compare(lm.model, sparse_lm.model, windows, time_ids, dense_ppl, reps=reps,
                   dense_file=dense_file, progress=progress)
