"""Sparsification: zeros in tensors that keep their shape.

:func:`compare` lays the dense model and the engine's pruned copy side by side
(parameters, zeros, files, memory, forward time, perplexity); :func:`mask_table`
compares the masks notebook 01 computes on one layer with :mod:`lab_utils.core.sparsify`.
"""

from __future__ import annotations

import pandas as pd
import torch

from lab_utils.core import memo
from lab_utils.core.evaluation.perplexity import perplexity
from lab_utils.engine import checkpoints
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments.concepts import costs
from lab_utils.experiments.concepts.decoder import Decoder, baseline


def compare(dense: torch.nn.Module, sparse: torch.nn.Module, windows: torch.Tensor,
            time_ids: torch.Tensor, dense_ppl: float | None = None, reps: int = 5,
            dense_file: int | None = None) -> pd.DataFrame:
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
            "bitmask_file_bytes": costs.sparse_file_bytes(model, "bitmask"),
            "memory_bytes": costs.model_bytes(model), **speed[name],
            "perplexity": dense_ppl if name == "dense" and dense_ppl is not None
            else perplexity(model, windows),
        })
    return pd.DataFrame(rows)


@memo.step("01-sparsification", timed_as="1 sparsification")
def demo(decoder: Decoder, sparsity_ratio: float, method: str) -> pd.DataFrame:
    """(:func:`compare`'s table, timing row) of the decoder and a copy pruned by
    the lab's engine (calibrated methods draw ``decoder``'s calibration settings)."""
    dense_ppl, dense_file = baseline(decoder)
    cfg = PruneConfig(method, sparsity_ratio, nsamples=decoder.nsamples, seqlen=decoder.seqlen, seed=decoder.seed)
    sparse_lm, _ = checkpoints.pruned_model(decoder.lm, cfg)
    return compare(decoder.lm.model, sparse_lm.model, decoder.windows, decoder.time_ids, dense_ppl,
                   reps=decoder.timing_reps, dense_file=dense_file)


def mask_table(masks: dict[str, torch.Tensor], reference: str = "magnitude") -> pd.DataFrame:
    """One row per mask (True = pruned) of the same weight: its sparsity, the
    sparsity of its emptiest and fullest output rows, and the fraction of the
    weights it prunes that ``reference`` prunes too (1: the same mask)."""
    ref = masks[reference]
    rows = []
    for name, W_mask in masks.items():
        per_row = W_mask.float().mean(dim=1)
        rows.append({"mask": name, "sparsity": float(W_mask.float().mean()),
                     "row_sparsity_min": float(per_row.min()), "row_sparsity_mean": float(per_row.mean()),
                     "row_sparsity_max": float(per_row.max()),
                     f"share_pruned_by_{reference}": float((W_mask & ref).sum() / W_mask.sum().clamp(min=1))})
    return pd.DataFrame(rows)
