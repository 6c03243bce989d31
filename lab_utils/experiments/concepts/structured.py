"""Structured pruning: remove whole MLP neurons, so that the tensors really shrink.

Neuron j of an MLP (``down(h)``, ``h = act(gate(x)) * up(x)`` in Llama,
``act(c_fc(x))`` in GPT-2 and BERT) owns row j of every input projection and
column j of ``down``, which sums h away: removing it changes nothing else. Its
score, mean |h_j| * ||down[:, j]||_2 on calibration text, is Wanda's "weight
times activation" lifted to a neuron. Every MLP loses as many neurons, so the
config's MLP width stays one number and the model reloads with ``from_pretrained``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from lab_utils.core import memo
from lab_utils.core.evaluation.perplexity import perplexity
from lab_utils.core.models import _conv1d_type, prunable_layers, weight_out_in
from lab_utils.core.progress import tqdm
from lab_utils.core.sparsify import SparsityError, check_sparsity_ratio
from lab_utils.experiments.concepts import costs
from lab_utils.experiments.concepts.decoder import Decoder, baseline

# config attributes that hold the MLP width, by architecture
_WIDTH_ATTRS = ("intermediate_size", "n_inner", "ffn_dim")


@dataclass
class MLP:
    """The layers of one transformer MLP, by role."""

    block: int
    side: str
    inputs: list[nn.Module]  # gate and up (Llama), c_fc (GPT-2), intermediate.dense (BERT)
    output: nn.Module  # down_proj, c_proj, output.dense

    @property
    def width(self) -> int:
        return weight_out_in(self.output).shape[1]


def mlps(model: nn.Module) -> list[MLP]:
    """Every MLP of the model's transformer blocks, in forward order."""
    by_block: dict[tuple[str, int], dict[str, list[nn.Module]]] = {}
    for pl in prunable_layers(model):
        if pl.component.startswith("mlp."):
            roles = by_block.setdefault((pl.side, pl.block), {"in": [], "out": []})
            roles["out" if pl.component == "mlp.down" else "in"].append(pl.module)
    out = []
    for (side, block), roles in by_block.items():
        if len(roles["out"]) != 1 or not roles["in"]:
            raise SparsityError(f"block {block} ({side}): cannot tell the MLP's input and output "
                                f"projections apart (found {len(roles['in'])} in, "
                                f"{len(roles['out'])} out)")
        out.append(MLP(block, side, roles["in"], roles["out"][0]))
    if not out:
        raise SparsityError(f"{type(model).__name__}: no MLP layers found (expected gate/up/down, "
                            f"c_fc/c_proj or intermediate/output dense layers)")
    return out


# --------------------------------------------------------------------------- scores
def neuron_scores(mean_abs_h: torch.Tensor, W_down: torch.Tensor) -> torch.Tensor:
    """score_j = mean |h_j| * ||W_down[:, j]||_2, with W_down as out x in (d_model x width)."""
    if mean_abs_h.shape[0] != W_down.shape[1]:
        raise SparsityError(f"{mean_abs_h.shape[0]} activation means for a down projection "
                            f"of width {W_down.shape[1]}")
    return mean_abs_h * W_down.detach().float().norm(dim=0)


@torch.no_grad()
def run_windows(model: nn.Module, windows: torch.Tensor, handles: list, desc: str) -> None:
    """Run ``model`` over ``windows``, 4 at a time, for its hooks; then remove ``handles``."""
    try:
        for s in tqdm(range(0, len(windows), 4), desc=desc, leave=False):
            model(input_ids=windows[s : s + 4])
    finally:
        for h in handles:
            h.remove()


def hidden_abs_means(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Mean |h_j| of every MLP neuron over the calibration tokens, one tensor per
    MLP (read where h enters the output projection, in every architecture)."""
    layers = mlps(model)
    sums = [torch.zeros(m.width, dtype=torch.float64) for m in layers]
    count = [0]

    def hook(i):
        def fn(_module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[i] += h.abs().sum(0, dtype=torch.float64).cpu()
            if i == 0:
                count[0] += h.shape[0]
        return fn

    handles = [m.output.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    run_windows(model, windows, handles, "calibration")
    return [(x / max(count[0], 1)).float() for x in sums]


def calibrated_scores(model: nn.Module, calibration: torch.Tensor) -> list[torch.Tensor]:
    """The score of every neuron of every MLP, from activations on ``calibration``."""
    acts = hidden_abs_means(model, calibration)
    return [neuron_scores(a, weight_out_in(m.output)) for a, m in zip(acts, mlps(model), strict=True)]


def keep_indices(scores: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """Indices of the neurons to keep (the highest-scored), in their original order."""
    n = scores.numel()
    n_drop = int(round(check_sparsity_ratio(sparsity_ratio) * n))
    if n_drop >= n:
        raise SparsityError(f"sparsity {sparsity_ratio} would remove all {n} neurons")
    keep = torch.topk(scores, n - n_drop, largest=True, sorted=False).indices
    return keep.sort().values


# --------------------------------------------------------------------------- surgery
def _slice_output_dim(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only output features ``keep`` of a Linear / Conv1D (rows of the out x in view)."""
    if isinstance(module, _conv1d_type()):  # weight is in x out
        module.weight = nn.Parameter(module.weight.data[:, keep].clone())
        module.nf = len(keep)
    else:
        module.weight = nn.Parameter(module.weight.data[keep].clone())
        module.out_features = len(keep)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[keep].clone())


def _slice_input_dim(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only input features ``keep`` (columns of the out x in view); the bias stays."""
    if isinstance(module, _conv1d_type()):
        module.weight = nn.Parameter(module.weight.data[keep, :].clone())
    else:
        module.weight = nn.Parameter(module.weight.data[:, keep].clone())
        module.in_features = len(keep)


def remove_neurons_(mlp: MLP, keep: torch.Tensor) -> int:
    """Shrink one MLP to the neurons ``keep``; return the number of parameters removed."""
    before = sum(p.numel() for m in mlp.inputs + [mlp.output] for p in m.parameters())
    for m in mlp.inputs:
        _slice_output_dim(m, keep)
    _slice_input_dim(mlp.output, keep)
    after = sum(p.numel() for m in mlp.inputs + [mlp.output] for p in m.parameters())
    return before - after


def prune_neurons_(model: nn.Module, scores: list[torch.Tensor], sparsity_ratio: float) -> dict:
    """Remove the lowest-scored ``sparsity_ratio`` of the neurons of every MLP,
    in place, and set the config's MLP width to match. Returns {"removed":
    parameters removed, "width": new MLP width}."""
    layers = mlps(model)
    if len(scores) != len(layers):
        raise SparsityError(f"{len(scores)} score vectors for {len(layers)} MLPs")
    removed, widths = 0, set()
    for mlp, s in zip(layers, scores, strict=True):
        keep = keep_indices(s, sparsity_ratio)
        removed += remove_neurons_(mlp, keep)
        widths.add(len(keep))
    (width,) = widths  # same ratio of the same width: one number for the config
    config = getattr(model, "config", None)
    if config is not None:
        for attr in _WIDTH_ATTRS:
            if getattr(config, attr, None) is not None or attr == "n_inner" and hasattr(config, "n_embd"):
                setattr(config, attr, width)
                break
        for attr in ("encoder_ffn_dim", "decoder_ffn_dim"):
            if getattr(config, attr, None) is not None:
                setattr(config, attr, width)
    return {"removed": removed, "width": width}


# --------------------------------------------------------------------------- the demo
@memo.step("01-structured", timed_as="2 structured pruning")
def demo(decoder: Decoder, sparsities) -> pd.DataFrame:
    """(table, timing row): copies of the decoder with each fraction of the MLP
    neurons removed; one row per model (the dense one first): parameters, MLP
    width, file, memory, forward time, perplexity."""
    model = decoder.lm.model
    dense_ppl, dense_file = baseline(decoder)
    scores = calibrated_scores(model, decoder.calibration)
    variants = {"dense": (0.0, model, 0)}
    for s in sparsities:
        pruned = copy.deepcopy(model)
        rep = prune_neurons_(pruned, scores, s)
        variants[f"{s:g}"] = (s, pruned, rep["removed"])
    speed = costs.forward_seconds_each({k: v[1] for k, v in variants.items()}, decoder.time_ids,
                                       decoder.timing_reps)
    return pd.DataFrame([{
        "neurons_removed": s, "mlp_width": mlps(m)[0].width,
        "parameters": sum(p.numel() for p in m.parameters()), "removed": removed,
        "file_bytes": dense_file if s == 0 else costs.dense_file_bytes(m),
        "memory_bytes": costs.model_bytes(m), **speed[name],
        "perplexity": dense_ppl if s == 0 else perplexity(m, decoder.windows),
    } for name, (s, m, removed) in variants.items()])
