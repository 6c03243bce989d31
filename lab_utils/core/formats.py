"""Sparse storage formats: their byte counts, and the information-theoretic floor they are measured against."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lab_utils.core.models import prunable_layers
from lab_utils.core.sparsify import parse_pattern

FILE_VERSION = "1"
LAYOUTS = ("dense", "csr", "bitmask", "nm")
PRECISIONS = ("", "fp16", "int8")  # "" = the weights' own dtype (lossless)
ZSTD_LEVEL = 3  # zstd's default: fast; higher levels gain little on masks and float values
SCALE_DTYPE = torch.float32  # one int8 scale per output row
SEP = "::"  # key of a stored part: "<state-dict name>::<component>"


class StorageError(ValueError):
    """A file that cannot be written or read back faithfully (one line, naming the fix)."""


# --------------------------------------------------------------------------- format names
@dataclass(frozen=True)
class Format:
    layout: str
    precision: str = ""
    zstd: bool = False

    @property
    def name(self) -> str:
        return self.layout + (f"-{self.precision}" if self.precision else "") + ("+zstd" if self.zstd else "")

    @property
    def lossless(self) -> bool:
        return self.precision == ""

    def value_bits(self, native_bits: int = 32) -> int:
        return {"": native_bits, "fp16": 16, "int8": 8}[self.precision]


def parse_format(name: str | Format) -> Format:
    """``"bitmask-int8+zstd"`` -> Format("bitmask", "int8", True)."""
    if isinstance(name, Format):
        return name
    text = str(name).strip()
    zstd = text.endswith("+zstd")
    base = text[: -len("+zstd")] if zstd else text
    layout, _, precision = base.partition("-")
    if layout not in LAYOUTS or precision not in PRECISIONS:
        raise StorageError(f"unknown format {name!r}; a format is layout[-precision][+zstd] with "
                           f"layout in {', '.join(LAYOUTS)} and precision in fp16, int8, "
                           f"e.g. 'csr', 'bitmask-int8+zstd', 'dense-fp16'")
    return Format(layout, precision, zstd)


# --------------------------------------------------------------------------- arithmetic
def index_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned dtype that holds 0..max_value."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def nm_position_bits(prune_m: int) -> int:
    """Bits for a position inside a group of M: ceil(log2 M)."""
    return max(1, math.ceil(math.log2(prune_m)))


def format_bytes(fmt: str | Format, shape: tuple[int, int], nnz: int, value_bits: int = 32,
                 pattern: str = "unstructured") -> dict[str, int]:
    """Bytes of each part that ``fmt`` stores for one out x in weight with
    ``nnz`` nonzeros (uncompressed formats: zstd's output is measured, not
    predicted). ``value_bits`` is the bit width of the weights' own dtype."""
    f = parse_format(fmt)
    if f.zstd:
        raise StorageError(f"{f.name}: the size of a zstd-compressed part is measured, not predicted; "
                           f"ask for the format without '+zstd'")
    out_f, in_f = shape
    numel = out_f * in_f
    vbytes = f.value_bits(value_bits) / 8
    parts: dict[str, int] = {}
    if f.layout == "dense":
        parts["values"] = int(numel * vbytes)
    elif f.layout == "csr":
        parts["values"] = int(nnz * vbytes)
        parts["crow_indices"] = (out_f + 1) * index_dtype(nnz).itemsize
        parts["col_indices"] = nnz * index_dtype(in_f - 1).itemsize
    elif f.layout == "bitmask":
        parts["mask"] = math.ceil(numel / 8)
        parts["values"] = int(nnz * vbytes)
    else:
        prune_n, prune_m = parse_pattern(pattern)
        if not prune_n:
            raise StorageError("format nm needs an N:M pattern, e.g. pattern='2:4'")
        kept = out_f * (in_f // prune_m) * (prune_m - prune_n)
        parts["values"] = int(kept * vbytes)
        parts["positions"] = math.ceil(kept * nm_position_bits(prune_m) / 8)
    if f.precision == "int8":
        parts["scale"] = out_f * SCALE_DTYPE.itemsize
    return parts


def binary_entropy(p: float) -> float:
    """H(p) in bits; H(0) = H(1) = 0."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy_floor_bits(density: float, value_bits: int = 32) -> float:
    """Fewest bits per weight of any lossless code for a weight matrix whose
    kept fraction is ``density``, when the kept values are ``value_bits``-bit
    numbers with no structure and the mask has no structure either:
    density * b for the values plus H(density) for where they are.
    (In terms of the sparsity s = 1 - density: (1-s)*b + H(s).)"""
    if not 0.0 <= density <= 1.0:
        raise StorageError(f"density {density!r} is outside [0, 1]")
    return density * value_bits + binary_entropy(density)


def nm_floor_bits(prune_n: int, prune_m: int, value_bits: int = 32) -> float:
    """Floor for an N:M-pruned weight (N zeros in every group of M): the kept
    values plus log2(C(M, N))/M bits of mask per weight (which of the C(M, N)
    patterns each group uses)."""
    if not 0 < prune_n < prune_m:
        raise StorageError(f"N:M needs 0 < N < M, got {prune_n}:{prune_m}")
    return (prune_m - prune_n) / prune_m * value_bits + math.log2(math.comb(prune_m, prune_n)) / prune_m


def value_entropy_bits(values: torch.Tensor) -> float:
    """Bits per kept value that an entropy coder cannot avoid if the mantissa
    bits are incompressible: the measured entropy of the sign + exponent field
    plus the mantissa width (23 bits for fp32, 10 for fp16, 7 for bf16).
    Trained weights use a handful of exponents, so this is well under the
    dtype's width: the reason zstd can beat :func:`entropy_floor_bits`."""
    if values.numel() == 0:
        return 0.0
    mantissa = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}.get(values.dtype)
    if mantissa is None:
        raise StorageError(f"value_entropy_bits needs float values, got {values.dtype}")
    width = torch.finfo(values.dtype).bits
    as_uint = {32: np.uint32, 16: np.uint16}[width]
    raw = values.detach().contiguous().reshape(-1).view(torch.uint8).numpy().view(as_uint)
    counts = np.bincount(raw >> mantissa, minlength=1 << (width - mantissa))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + mantissa


def value_entropy_floor_bytes(model: nn.Module) -> float:
    """A tighter floor for the prunable weights in their own dtype: per layer,
    nnz x :func:`value_entropy_bits` of its kept values + numel x H(density)."""
    total = 0.0
    for pl in prunable_layers(model):
        W = pl.weight.contiguous()
        kept = torch.from_numpy(W.numpy().ravel()[np.flatnonzero(W.numpy())])
        total += (kept.numel() * value_entropy_bits(kept) + W.numel() * binary_entropy(kept.numel() / W.numel())) / 8
    return total


def floor_bytes(shapes_nnz: Iterable[tuple[tuple[int, int], int]], value_bits: int = 32,
                pattern: str = "unstructured") -> float:
    """The floor, in bytes, summed over weights given as ((out, in), nnz)."""
    prune_n, prune_m = parse_pattern(pattern)
    total = 0.0
    for (out_f, in_f), nnz in shapes_nnz:
        numel = out_f * in_f
        bits = (nm_floor_bits(prune_n, prune_m, value_bits) if prune_n
                else entropy_floor_bits(nnz / numel, value_bits))
        total += numel * bits / 8
    return total


def break_even_sparsity(fmt: str | Format, shapes: Iterable[tuple[int, int]], value_bits: int = 32,
                        against: str | None = None, pattern: str = "unstructured") -> float:
    """The lowest sparsity at which ``fmt`` takes fewer bytes than the dense
    layout of the same precision (or the format ``against``), summed over the
    weight ``shapes``. Found by bisection on the sparsity (bytes fall as
    sparsity rises); ``nan`` when it never breaks even below 100%."""
    f = parse_format(fmt)
    ref = parse_format(against) if against else Format("dense", f.precision)
    shapes = list(shapes)

    def wins(s: float) -> bool:
        return _total(f, shapes, s, value_bits, pattern) < _total(ref, shapes, s, value_bits, pattern)

    if f.layout == "nm":  # the N:M pattern fixes the sparsity
        n, m = parse_pattern(pattern)
        return n / m if wins(n / m) else math.nan
    if wins(0.0):
        return 0.0
    if not wins(1.0):
        return math.nan
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


def _total(f: Format, shapes, sparsity: float, value_bits: int, pattern: str) -> int:
    return sum(sum(format_bytes(f, s, round((1 - sparsity) * s[0] * s[1]), value_bits, pattern).values())
               for s in shapes)


# --------------------------------------------------------------------------- one generated token
def token_bytes(fmt: str | Format, layers: Iterable[tuple[tuple[int, int], int]], other_bytes: int,
                value_bits: int = 32, pattern: str = "unstructured") -> int:
    """Bytes of weights one generated token reads when every prunable weight, given as
    ((out, in), nnz), is held in ``fmt`` and the rest (``other_bytes``) stays dense: at one
    token a layer reads each of its stored bytes once, so this bounds a memory-bound step."""
    return other_bytes + sum(sum(format_bytes(fmt, shape, nnz, value_bits, pattern).values())
                             for shape, nnz in layers)


def token_reads(model: nn.Module) -> tuple[list[tuple[tuple[int, int], int]], int, int]:
    """What one generated token reads of ``model``'s weights: its prunable layers as
    ((out, in), nnz), the bytes of every other parameter, and the weights' bit width. A
    parameter counts once (a tied head and embedding are one table, which the head reads
    whole); an embedding table no linear layer reads is read one row per token."""
    prunable = prunable_layers(model)
    skip = {id(pl.module.weight) for pl in prunable}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    rows = {id(m.weight): m.weight[0] for m in model.modules() if isinstance(m, nn.Embedding)}
    other = sum((rows[id(p)] if id(p) in rows and id(p) not in linear else p).nbytes
                for p in model.parameters() if id(p) not in skip)
    layers = [(tuple(pl.shape), int((pl.weight != 0).sum())) for pl in prunable]
    value_bits = prunable[0].weight.element_size() * 8 if prunable else 32
    return layers, int(other), value_bits


# --------------------------------------------------------------------------- sweeps
# What notebook 03 writes by default: the plain and compressed sparse layouts
# next to the two usual dense baselines, and int8 to show the two composing.
SIZE_FORMATS = ("dense", "dense-fp16", "dense-int8", "csr", "bitmask", "dense+zstd", "bitmask+zstd",
                "bitmask-int8+zstd")


def check_formats(formats: Iterable[str], pattern: str = "unstructured") -> list[str]:
    """Parse every format name (one clear error for a bad one) and refuse
    ``nm`` for an unstructured pattern."""
    names = [parse_format(f).name for f in formats]
    if not parse_pattern(pattern)[0] and any(parse_format(f).layout == "nm" for f in names):
        raise StorageError("format nm stores N:M-pruned weights: use it with a pattern such as '2:4'")
    return names
