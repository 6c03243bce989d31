"""Quantization: fewer bits per weight, each weight within half a step of its grid.

* **int8 per channel** (weight-only): one fp32 scale per output row, the codec
  of the ``int8`` file formats (:func:`lab_utils.core.sparse_file.quantize_int8`);
* **4-bit round-to-nearest in groups** (weight-only): ``group_size`` weights of
  a row share an fp16 step and minimum, two codes per byte (llama.cpp's Q4_1
  layout, the format SmolLM2's embedded weights were stored in);
* **torch dynamic int8**: int8 weights and activations quantized on the fly,
  so the products run in int8 kernels on the CPU.

The weight-only schemes dequantize a layer's weight when it runs
(:class:`QuantLinear`): memory shrinks, but without a fused low-bit kernel the
CPU still multiplies in fp32.
"""

from __future__ import annotations

import copy
import warnings

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lab_utils.core import memo, sparse_file
from lab_utils.core.checks import whole_number
from lab_utils.core.evaluation.perplexity import perplexity
from lab_utils.core.models import _conv1d_type, prunable_layers, set_module, weight_out_in
from lab_utils.experiments import weights
from lab_utils.experiments.concepts import costs
from lab_utils.experiments.concepts.decoder import Decoder, baseline

SCHEMES = ("int8", "int4")
INT4_LEVELS = 15  # codes 0..15


class QuantError(ValueError):
    """Bad quantization input, in one line that names the fix."""


# --------------------------------------------------------------------------- 4-bit groups
def _check_groups(W: torch.Tensor, group_size: int) -> None:
    if whole_number("group_size", group_size, minimum=2, error=QuantError) % 2:
        raise QuantError(f"group_size {group_size!r} must be an even integer >= 2, e.g. 32 or 64")
    if W.shape[1] % group_size:
        raise QuantError(f"group_size {group_size} does not divide the {W.shape[1]} inputs of a "
                         f"weight of shape {tuple(W.shape)}; choose a divisor such as 32")


def _fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, stepping down where nearest rounding went up, so the
    stored minimum never lies above the true one (codes stay >= -0.5 away)."""
    h = x.half()
    up = h.float() > x
    down = (x - x.abs() * 2.0**-10).half()  # one fp16 step below x, at most
    return torch.where(up, down, h)


def int4_groups(W: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 in [0, 15] out x in, step fp16 out x groups, minimum fp16 out x groups).

    W ~= codes * step + minimum group by group, with |error| <= step / 2.
    """
    _check_groups(W, group_size)
    out_f, in_f = W.shape
    G = W.float().reshape(out_f, in_f // group_size, group_size)
    minimum = _fp16_at_most(G.amin(dim=2))
    step = ((G.amax(dim=2) - minimum.float()) / INT4_LEVELS).half()
    step = torch.where(step.float() > 0, step, torch.ones_like(step))  # a constant group
    codes = torch.round((G - minimum.float()[..., None]) / step.float()[..., None])
    codes = torch.clamp(codes, 0, INT4_LEVELS).to(torch.uint8).reshape(out_f, in_f)
    return codes, step, minimum


def dequant_int4(codes: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    out_f, in_f = codes.shape
    groups = step.shape[1]
    G = codes.reshape(out_f, groups, in_f // groups).float()
    return (G * step.float()[..., None] + minimum.float()[..., None]).reshape(out_f, in_f)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (low nibble first): out x in -> out x in/2 uint8."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)


# --------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """A linear layer that keeps int8 or packed 4-bit weights and dequantizes them
    to fp32 when it runs. Replaces ``nn.Linear`` and GPT-2's ``Conv1D`` alike
    (the weight is kept out x in)."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                 group_size: int = 32):
        super().__init__()
        if scheme not in SCHEMES:
            raise QuantError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        self.scheme, self.group_size = scheme, group_size
        self.in_features, self.out_features = W.shape[1], W.shape[0]
        if scheme == "int8":
            q, scale = sparse_file.quantize_int8(W)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        else:
            codes, step, minimum = int4_groups(W, group_size)
            self.register_buffer("qweight", pack4(codes))
            self.register_buffer("scale", step)
            self.register_buffer("minimum", minimum)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        if self.scheme == "int8":
            return sparse_file.dequantize_int8(self.qweight, self.scale)
        return dequant_int4(unpack4(self.qweight), self.scale, self.minimum)

    def half_step(self) -> torch.Tensor:
        """The analytical error bound per weight: half a quantization step."""
        if self.scheme == "int8":
            return (self.scale[:, None] / 2).expand(self.out_features, self.in_features)
        g = self.in_features // self.scale.shape[1]
        return (self.scale.float() / 2).repeat_interleave(g, dim=1)

    def forward(self, x):
        return F.linear(x, self.dequantized(), self.bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{g}"


def _error_row(W: torch.Tensor, err: torch.Tensor, bound: torch.Tensor) -> dict:
    """A layer's squared error and weight sums, its largest error, and the largest
    error over its ``bound`` (a zero bound, an all-zero row, needs a zero error)."""
    ratio = torch.where(bound > 0, err / bound.clamp(min=1e-30), torch.where(err > 0, torch.inf, 0.0))
    return {"numel": W.numel(), "sq_err": float((err.double() ** 2).sum()),
            "sq_w": float((W.double() ** 2).sum()), "max_abs_err": float(err.max()),
            "max_err_over_bound": float(ratio.max())}


def quantize_weights(model: nn.Module, scheme: str, group_size: int = 32):
    """A copy of ``model`` whose prunable linear layers are :class:`QuantLinear`.

    Embeddings, norms and the (tied) output head stay fp32, as in the
    sparsification demos. Returns (model, per-layer error table).
    """
    model = copy.deepcopy(model)
    rows = []
    for pl in prunable_layers(model):
        W = pl.weight.float()
        q = QuantLinear(W, pl.module.bias, scheme, group_size)
        err = (q.dequantized() - W).abs()
        rows.append({"layer": pl.name, "component": pl.component,
                     **_error_row(W, err, q.half_step())})
        set_module(model, pl.name, q)
    return model, pd.DataFrame(rows)


def _conv1d_as_linear(module: nn.Module) -> nn.Linear:
    W = weight_out_in(module)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=module.bias is not None)
    lin.weight.data.copy_(W)
    if module.bias is not None:
        lin.bias.data.copy_(module.bias.data)
    return lin


def dynamic_int8(model: nn.Module):
    """A copy of ``model`` whose prunable linear layers run torch's dynamic int8
    kernels (int8 weights per output channel). GPT-2's ``Conv1D`` layers are
    first turned into equivalent ``nn.Linear`` (``quantize_dynamic`` only knows
    ``nn.Linear``). Returns (model, per-layer error table of the weights)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model)
    names = []
    for pl in prunable_layers(model):
        if isinstance(pl.module, _conv1d_type()):
            set_module(model, pl.name, _conv1d_as_linear(pl.module))
        names.append(pl.name)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    with warnings.catch_warnings():
        # torch 2.13 deprecates quantized tensors in favour of torchao; the
        # kernels still ship and are what this demo measures
        warnings.simplefilter("ignore")
        qmodel = quantize_dynamic(model, qconfig_spec=dict.fromkeys(names, per_channel_dynamic_qconfig),
                                  dtype=torch.qint8, inplace=True)
        rows = []
        for n in names:
            qw = qmodel.get_submodule(n).weight()
            W = originals[n]
            err = (qw.dequantize() - W).abs()
            bound = (qw.q_per_channel_scales().float() / 2)[:, None]
            rows.append({"layer": n, **_error_row(W, err, bound.expand_as(err))})
    return qmodel, pd.DataFrame(rows)


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors to save a quantized model: integer weights as int8/uint8 and
    their scales, everything else as it is; a tied tensor once. Dynamic
    quantized layers are written as their int8 values, scales and zero points."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if isinstance(t, tuple):  # dynamic linear: (qweight, bias)
            qw, bias = t
            base = name.rsplit("._packed_params", 2)[0]
            out[f"{base}.qweight"] = qw.int_repr()
            out[f"{base}.scale"] = qw.q_per_channel_scales().float()
            out[f"{base}.zero_point"] = qw.q_per_channel_zero_points().to(torch.int8)
            if bias is not None:
                out[f"{base}.bias"] = bias
            continue
        if not isinstance(t, torch.Tensor) or t.is_quantized:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def error_summary(table) -> dict:
    """Relative Frobenius error over all layers, the largest error, and the
    largest error as a fraction of its analytical bound (<= 1 when the bound holds)."""
    return {"rel_error": (table.sq_err.sum() / table.sq_w.sum()) ** 0.5,
            "max_abs_err": table.max_abs_err.max(),
            "max_err_over_bound": table.max_err_over_bound.max()}


# --------------------------------------------------------------------------- the demo
@memo.step("01-levels")
def baseline_levels(decoder: Decoder, block: int = 32) -> dict:
    """:func:`lab_utils.experiments.weights.levels_per_block` of the dense decoder (is
    it already on a 4-bit grid?), as a step: it sorts every block of every layer,
    seconds that a rerun reads back instead."""
    return weights.levels_per_block(decoder.lm.model, block)


def quantized_layer_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, weights) of the quantized layers' integer weights and scales."""
    nbytes = numel = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nbytes += sum(b.nbytes for b in m.buffers())
            numel += m.in_features * m.out_features
        elif hasattr(m, "_packed_params") and hasattr(m, "weight") and callable(m.weight):
            qw = m.weight()
            nbytes += qw.int_repr().nbytes + qw.q_per_channel_scales().float().nbytes \
                + qw.q_per_channel_zero_points().to(torch.int8).nbytes
            numel += qw.numel()
    return nbytes, numel


@memo.step("01-quantization", timed_as="3 quantization")
def demo(decoder: Decoder, group_sizes=(32, 64)) -> pd.DataFrame:
    """(table, timing row): fp32, int8 per channel, torch dynamic int8 and 4-bit
    in groups of each size, side by side.

    One row per scheme: bits per quantized weight, memory, file, relative
    weight error, the largest error over its analytical bound, forward time
    and perplexity. Embeddings, norms and the tied head stay fp32 throughout.
    """
    model = decoder.lm.model
    dense_ppl, dense_file = baseline(decoder)
    variants, errors = {"fp32": model}, {}
    variants["int8 per channel"], errors["int8 per channel"] = quantize_weights(model, "int8")
    variants["dynamic int8 (torch)"], errors["dynamic int8 (torch)"] = dynamic_int8(model)
    for g in group_sizes:
        name = f"4-bit RTN g{g}"
        variants[name], errors[name] = quantize_weights(model, "int4", group_size=g)
    speed = costs.forward_seconds_each(variants, decoder.time_ids, decoder.timing_reps)
    n_weights = sum(pl.numel for pl in prunable_layers(model))
    rows = []
    for name, m in variants.items():
        if name == "fp32":
            qbytes, err = 4 * n_weights, {"rel_error": 0.0, "max_abs_err": 0.0,
                                          "max_err_over_bound": float("nan")}
            file = dense_file
        else:
            qbytes, numel = quantized_layer_bytes(m)
            assert numel == n_weights, f"{name}: {numel} quantized weights, expected {n_weights}"
            err = error_summary(errors[name])
            tensors = quantized_tensors(m)
            file = costs.file_bytes(
                lambda folder, t=tensors: costs.save_tensors(t, folder / "model.safetensors"))
        rows.append({"scheme": name, "bits_per_weight": 8 * qbytes / n_weights,
                     "layer_bytes": qbytes, "memory_bytes": costs.model_bytes(m),
                     "file_bytes": file, **err, **speed[name],
                     "perplexity": dense_ppl if name == "fp32" else perplexity(m, decoder.windows)})
    return pd.DataFrame(rows)
