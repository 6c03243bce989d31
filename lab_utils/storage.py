"""Sparse checkpoints as real single files, and the arithmetic of their sizes.

"My pruned model file is not smaller": a pruned model saved as usual still
stores every zero. This module writes the same model in formats that skip the
zeros, as real files whose sizes are measured on disk, and computes what each
format should cost and the information-theoretic floor it is compared with.

A format name is ``layout[-precision][+zstd]``:

* layout ``dense`` (every weight, zeros included), ``csr`` (kept values, row
  pointers, column indices in the smallest unsigned dtype that fits),
  ``bitmask`` (one packed bit per weight, then the kept values) or ``nm``
  (for N:M-pruned weights: the kept values of each group of M and their
  positions inside the group, packed in ceil(log2 M) bits each);
* precision: none (the weights' own dtype: lossless), ``fp16`` (values rounded
  to half precision) or ``int8`` (per-row symmetric int8 with one fp32 scale
  per output row: sparsity and quantization composing);
* ``+zstd``: every stored tensor compressed with zstandard, one frame each, so
  the bytes of each part of the file stay measurable.

The precision and the layout apply to the prunable weights
(:func:`lab_utils.models.prunable_layers`, seen as out x in whether the module
is ``nn.Linear`` or GPT-2's ``Conv1D``). Every other tensor (embeddings, norms,
biases, the head) is stored the same way in every format, densely and
losslessly, in the same file: differences between formats are differences in
the prunable weights alone.

The container is safetensors (no pickle; the header lists every tensor with
its byte range). Its metadata holds the model class and config, so
:func:`load_sparse` rebuilds the model without a template, a description of
each prunable weight, and a sha256 of every stored byte: a truncated or
corrupted file fails with one :class:`StorageError`, never a silently wrong
model. The ``dense`` and ``dense-fp16`` files are ordinary safetensors
checkpoints (weights under their own names and layouts) that any tool reads.

Round trip: a lossless format gives back every weight bit for bit, except that
a pruned zero always reads back as +0.0 (a masked multiply leaves -0.0 behind
for negative weights; a sparse layout records where the nonzeros are, not the
sign of the zeros, and both zeros multiply the same), so the logits are
identical. ``fp16`` and ``int8`` are lossy by design: what comes back is
exactly :func:`quantized_weight` of the saved weight.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils import io
from lab_utils.models import _conv1d_type, prunable_layers
from lab_utils.sparsify import SparsityError, parse_pattern

FILE_VERSION = "1"
LAYOUTS = ("dense", "csr", "bitmask", "nm")
PRECISIONS = ("", "fp16", "int8")  # "" = the weights' own dtype (lossless)
ZSTD_LEVEL = 3  # zstd's default: fast; higher levels gain little on masks and float values
SCALE_DTYPE = torch.float32  # one int8 scale per output row
SIZES_VERSION = 3  # part of the size cache key: bump when the size table changes
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


def all_formats(pattern: str = "unstructured", zstd: bool = True,
                precisions: Iterable[str] = PRECISIONS) -> list[str]:
    """Every format that applies to a model pruned with ``pattern`` (``nm``
    needs an N:M pattern)."""
    prune_n, _ = parse_pattern(pattern)
    layouts = [lay for lay in LAYOUTS if lay != "nm" or prune_n]
    out = [Format(lay, p, z).name for z in ((False, True) if zstd else (False,))
           for p in precisions for lay in layouts]
    return out


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


def symbol_entropy(counts: np.ndarray) -> float:
    """Shannon entropy, in bits per symbol, of a histogram."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


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
    return symbol_entropy(counts) + mantissa


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
    if f.layout == "nm":  # the N:M pattern fixes the sparsity
        n, m = parse_pattern(pattern)
        s = n / m
        return s if _total(f, shapes, s, value_bits, pattern) < _total(ref, shapes, s, value_bits,
                                                                       pattern) else math.nan

    def wins(s: float) -> bool:
        return _total(f, shapes, s, value_bits, pattern) < _total(ref, shapes, s, value_bits, pattern)

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


# --------------------------------------------------------------------------- value codecs
def quantize_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: scale = max|row| / 127, q = round(W / scale).
    A row of zeros gets scale 0 and stays zero."""
    A = W.detach().to(SCALE_DTYPE).numpy()
    scale = np.abs(A).max(axis=1) / np.float32(127.0)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(A / safe[:, None]), -127, 127).astype(np.int8)  # rint: half to even
    return torch.from_numpy(q), torch.from_numpy(scale)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(SCALE_DTYPE) * scale[:, None]).to(dtype)


def quantized_weight(W: torch.Tensor, precision: str) -> torch.Tensor:
    """What a lossy precision turns W (out x in) into: what load_sparse returns."""
    if precision == "":
        return W
    if precision == "fp16":
        return _to_fp16(W, "weight").to(W.dtype)
    q, scale = quantize_int8(W)
    return dequantize_int8(q, scale, W.dtype) * (W != 0)


def _to_fp16(W: torch.Tensor, name: str) -> torch.Tensor:
    finite = torch.finfo(torch.float16).max
    if W.abs().max() > finite:
        raise StorageError(f"{name}: values exceed fp16's range ({finite}); use the lossless "
                           f"format or int8 instead of fp16")
    return W.to(torch.float16)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack small unsigned integers (< 2**bits) into a uint8 bit stream."""
    values = np.ascontiguousarray(values, dtype=np.uint8).ravel()
    if bits == 8:
        return values
    planes = np.unpackbits(values[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.ravel())


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[:count].astype(np.int64)
    planes = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return planes.astype(np.int64) @ weights


# --------------------------------------------------------------------------- layouts
def encode_weight(W: torch.Tensor, fmt: str | Format, pattern: str = "unstructured",
                  name: str = "weight") -> dict[str, torch.Tensor]:
    """The parts that ``fmt`` stores for one out x in weight (before zstd)."""
    f = parse_format(fmt)
    W = W.detach().contiguous()
    out_f, in_f = W.shape
    if f.precision == "int8":
        q, scale = quantize_int8(W)
        V, extra = q, {"scale": scale}
    elif f.precision == "fp16":
        V, extra = _to_fp16(W, name), {}
    else:
        V, extra = W, {}
    if f.layout == "dense":
        parts = {"values": V}
    elif f.layout in ("csr", "bitmask"):
        # Row-major positions of the nonzeros, found once (numpy's 1-D flatnonzero
        # is several times faster than a 2-D boolean mask on a busy CPU).
        # Single-threaded numpy is also steadier than torch's thread pool on a shared machine.
        flat = np.flatnonzero(W.numpy())
        values = V.reshape(-1)[torch.from_numpy(flat)] if V.dtype == torch.bfloat16 \
            else torch.from_numpy(V.reshape(-1).numpy()[flat])  # numpy has no bfloat16
        if f.layout == "csr":
            crow = np.zeros(out_f + 1, dtype=np.int64)
            np.cumsum(np.count_nonzero(W.numpy(), axis=1), out=crow[1:])
            parts = {"values": values,
                     "crow_indices": torch.from_numpy(crow.astype(index_dtype(flat.size))),
                     "col_indices": torch.from_numpy((flat % in_f).astype(index_dtype(in_f - 1)))}
        else:
            keep = np.zeros(out_f * in_f, dtype=bool)
            keep[flat] = True
            parts = {"mask": torch.from_numpy(np.packbits(keep)), "values": values}
    else:
        parts = _encode_nm(W != 0, V, pattern, name)
    parts.update(extra)
    return {k: v.contiguous() for k, v in parts.items()}


def _encode_nm(keep: torch.Tensor, V: torch.Tensor, pattern: str, name: str) -> dict:
    prune_n, prune_m = parse_pattern(pattern)
    if not prune_n:
        raise StorageError(f"{name}: format nm needs an N:M pattern, e.g. pattern='2:4'")
    out_f, in_f = keep.shape
    if in_f % prune_m:
        raise StorageError(f"{name}: {in_f} inputs are not a multiple of M={prune_m}; use csr or bitmask")
    kept = prune_m - prune_n
    groups = keep.reshape(out_f, in_f // prune_m, prune_m)
    if int(groups.sum(-1).max()) > kept:
        raise StorageError(f"{name}: not {prune_n}:{prune_m} sparse (a group of {prune_m} keeps more "
                           f"than {kept}); prune with pattern {pattern!r} first, or use csr or bitmask")
    # K positions per group: its nonzeros first, then (if a kept weight happens to
    # be exactly zero) the first zero positions, so every group stores exactly K.
    order = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :kept]
    positions = order.sort(dim=-1).values
    values = V.reshape(out_f, in_f // prune_m, prune_m).gather(-1, positions)
    bits = nm_position_bits(prune_m)
    return {"values": values.reshape(-1),
            "positions": torch.from_numpy(pack_bits(positions.numpy().ravel(), bits))}


def decode_weight(parts: dict[str, torch.Tensor], fmt: str | Format, shape: tuple[int, int],
                  dtype: torch.dtype, pattern: str = "unstructured") -> torch.Tensor:
    """Inverse of :func:`encode_weight`: the out x in weight in ``dtype``."""
    f = parse_format(fmt)
    out_f, in_f = shape
    values = parts["values"]
    if f.precision == "int8":
        scale = parts["scale"]
    if f.layout == "dense":
        W = values.reshape(out_f, in_f)
        return dequantize_int8(W, scale, dtype) if f.precision == "int8" else W.to(dtype)
    if f.precision == "int8":
        rows = _value_rows(parts, f, shape, pattern)
        values = (values.to(SCALE_DTYPE) * scale[rows]).to(dtype)
    else:
        values = values.to(dtype)
    W = torch.zeros(out_f, in_f, dtype=dtype)
    if f.layout == "csr":
        crow = parts["crow_indices"].to(torch.int64)
        col = parts["col_indices"].to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(out_f), crow.diff())
        W[rows, col] = values
    elif f.layout == "bitmask":
        keep = np.unpackbits(parts["mask"].numpy())[: out_f * in_f].astype(bool).reshape(out_f, in_f)
        W[torch.from_numpy(keep)] = values
    else:
        prune_n, prune_m = parse_pattern(pattern)
        kept = prune_m - prune_n
        n_groups = out_f * (in_f // prune_m)
        pos = unpack_bits(parts["positions"].numpy(), nm_position_bits(prune_m), n_groups * kept)
        pos = torch.from_numpy(pos).reshape(out_f, in_f // prune_m, kept)
        W = W.reshape(out_f, in_f // prune_m, prune_m)
        W.scatter_(-1, pos, values.reshape(out_f, in_f // prune_m, kept))
        W = W.reshape(out_f, in_f)
    return W


def _value_rows(parts, f: Format, shape, pattern) -> torch.Tensor:
    """Row index of every stored value (to apply its row's int8 scale)."""
    out_f, in_f = shape
    if f.layout == "csr":
        return torch.repeat_interleave(torch.arange(out_f), parts["crow_indices"].to(torch.int64).diff())
    if f.layout == "bitmask":
        keep = np.unpackbits(parts["mask"].numpy())[: out_f * in_f].reshape(out_f, in_f)
        return torch.repeat_interleave(torch.arange(out_f), torch.from_numpy(keep.sum(1).astype(np.int64)))
    prune_n, prune_m = parse_pattern(pattern)
    return torch.arange(out_f).repeat_interleave((in_f // prune_m) * (prune_m - prune_n))


# --------------------------------------------------------------------------- files
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise StorageError(f"unknown dtype {name!r} in the file header: the file is corrupted")
    return dt


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # A uint8 view of the raw memory: works for every dtype, fp16 and uint16 included.
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _checksum(stored: dict[str, torch.Tensor], metadata: dict) -> str:
    """sha256 of the header's metadata (all but this checksum) and of every
    stored tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for key in sorted(stored):
        t = stored[key]
        h.update(f"{key}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


_ZSTD_MEMO: dict[tuple[str, int], torch.Tensor] = {}  # (sha256 of the bytes, level) -> frame
_ZSTD_MEMO_BYTES = 256 << 20  # budget of remembered frames


def _zstd(t: torch.Tensor, level: int, memo: bool = False) -> torch.Tensor:
    """One zstd frame (with its own checksum) of the tensor's bytes. With
    ``memo`` the frame is remembered by the sha256 of the bytes: a sweep writes
    the same embeddings and norms into every file, and hashing is ~10x
    cheaper than compressing."""
    import zstandard

    raw = _tensor_bytes(t)
    key = (hashlib.sha256(raw).hexdigest(), level) if memo else None
    if key is not None and key in _ZSTD_MEMO:
        return _ZSTD_MEMO[key].clone()  # a copy: safetensors refuses tensors that share memory
    frame = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw)
    out = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
    if key is not None:
        while _ZSTD_MEMO and sum(v.numel() for v in _ZSTD_MEMO.values()) + out.numel() > _ZSTD_MEMO_BYTES:
            _ZSTD_MEMO.pop(next(iter(_ZSTD_MEMO)))  # oldest first
        _ZSTD_MEMO[key] = out
    return out


def _unzstd(t: torch.Tensor, dtype: torch.dtype, shape: list[int], key: str) -> torch.Tensor:
    import zstandard

    try:
        raw = zstandard.ZstdDecompressor().decompress(t.numpy().tobytes())
    except zstandard.ZstdError as e:
        raise StorageError(f"part {key} does not decompress ({e}): the file is corrupted; save it again") from None
    out = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if out.numel() != math.prod(shape) * torch.empty(0, dtype=dtype).element_size():
        raise StorageError(f"part {key} decompresses to the wrong size: the file is corrupted; save it again")
    return out.view(dtype).reshape(shape)


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once: (tensors, aliases)."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            if key is not None:
                seen[key] = name
            tensors[name] = t.detach()
    return tensors, aliases


def save_sparse(model: nn.Module, path: str | os.PathLike, format: str = "bitmask",
                pattern: str = "unstructured", zstd_level: int = ZSTD_LEVEL) -> Path:
    """Write ``model`` to one file in ``format`` (atomically: a temporary file,
    then a rename). ``pattern`` is the N:M pattern that format ``nm`` relies on.
    Returns the path."""
    from safetensors.torch import save_file

    f = parse_format(format)
    try:
        parse_pattern(pattern)
    except SparsityError as e:
        raise StorageError(str(e)) from None
    tensors, aliases = _unique_state(model)
    layers = {f"{pl.name}.weight": pl for pl in prunable_layers(model)}
    conv1d = _conv1d_type()
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, t in tensors.items():
        pl = layers.get(name)
        if pl is None:
            parts, entry = {"": t}, {"kind": "other", "layout": "raw"}
        else:
            W = pl.weight
            entry = {"kind": "prunable", "layout": f.layout, "out_in": list(W.shape),
                     "transposed": isinstance(pl.module, conv1d), "nnz": int(np.count_nonzero(W.numpy()))}
            if f.layout == "dense" and f.precision != "int8":
                # Under its own name and layout: the dense files are ordinary checkpoints.
                parts = {"": _to_fp16(t, name) if f.precision == "fp16" else t}
                entry["layout"] = "raw"
            else:
                parts = encode_weight(W, f, pattern, name)
        entry.update(dtype=_dtype_name(t.dtype), shape=list(t.shape), parts={})
        for comp, value in parts.items():
            key = f"{name}{SEP}{comp}" if comp else name
            entry["parts"][comp] = {"key": key, "dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
            stored[key] = (_zstd(value, zstd_level, memo=entry["kind"] == "other") if f.zstd
                           else value.contiguous())
        entries[name] = entry
    metadata = {
        "lab_format_version": FILE_VERSION, "format": f.name, "pattern": str(pattern),
        "model_class": type(model).__name__, "config_class": type(model.config).__name__,
        "config": json.dumps(model.config.to_dict(), sort_keys=True, default=str),
        "tensors": json.dumps(entries, sort_keys=True), "aliases": json.dumps(aliases, sort_keys=True),
    }
    metadata["checksum"] = _checksum(stored, metadata)
    path = Path(path)
    with io.atomic_path(path) as tmp:
        save_file(stored, str(tmp), metadata=metadata)
    return path


@dataclass
class FileInfo:
    """What a file's header says (read without loading any tensor)."""

    path: Path
    file_bytes: int
    header_bytes: int  # 8-byte length + JSON header (padded)
    metadata: dict
    entries: dict  # state-dict name -> description
    ranges: dict  # stored key -> (dtype, shape, start, end) in the data section

    @property
    def format(self) -> Format:
        return parse_format(self.metadata["format"])


def read_header(path: str | os.PathLike) -> FileInfo:
    """Parse and check the header; raise :class:`StorageError` if the file is
    cut short, has trailing bytes, or its header is damaged."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path} does not exist; write it with save_sparse(model, path, format=...)")
    size = path.stat().st_size
    bad = f"{path} is truncated or corrupted"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise StorageError(f"{bad} ({size} bytes, no header); save it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise StorageError(f"{bad} (the header says {n} bytes, the file has {size}); save it again")
        try:
            header = json.loads(fh.read(n))
            metadata = header.pop("__metadata__")
            entries = json.loads(metadata["tensors"])
            ranges = {k: (v["dtype"], v["shape"], *v["data_offsets"]) for k, v in header.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{bad} (unreadable header: {e}); save it again") from None
    if metadata.get("lab_format_version") != FILE_VERSION:
        raise StorageError(f"{path} is not a lab sparse file of version {FILE_VERSION} "
                           f"(found {metadata.get('lab_format_version')!r}); save it again")
    end = max((r[3] for r in ranges.values()), default=0)
    if 8 + n + end != size:
        raise StorageError(f"{bad} ({size} bytes on disk, the header accounts for {8 + n + end}); save it again")
    return FileInfo(path, size, 8 + n, metadata, entries, ranges)


def file_table(path: str | os.PathLike):
    """One row per stored part, with its bytes as they lie in the file on
    disk: name, kind (prunable/other), component, dtype, bytes."""
    info = read_header(path)
    key_to = {p["key"]: (name, e["kind"], comp) for name, e in info.entries.items()
              for comp, p in e["parts"].items()}
    rows = []
    for key, (dtype, _shape, start, end) in sorted(info.ranges.items()):
        name, kind, comp = key_to.get(key, (key, "?", ""))
        rows.append({"key": key, "name": name, "kind": kind, "component": comp or "values",
                     "stored_dtype": dtype, "bytes": end - start})
    return pd.DataFrame(rows)


def _load_parts(path: Path, info: FileInfo) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StorageError(f"{path} is truncated or corrupted ({e}); save it again") from None
    if _checksum(stored, info.metadata) != info.metadata.get("checksum"):
        raise StorageError(f"{path} is corrupted: its bytes do not match the checksum in its header; "
                           f"save it again")
    return stored


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (weights decoded, aliases restored)."""
    path = Path(path)
    info = read_header(path)
    stored = _load_parts(path, info)  # checksum first: nothing below reads unchecked bytes
    f = info.format
    pattern = info.metadata.get("pattern", "unstructured")
    state = {}
    for name, e in info.entries.items():
        parts = {}
        for comp, p in e["parts"].items():
            t = stored[p["key"]]
            parts[comp] = _unzstd(t, _dtype(p["dtype"]), p["shape"], p["key"]) if f.zstd else t
        dtype = _dtype(e["dtype"])
        if e["layout"] == "raw":
            state[name] = parts[""].to(dtype)  # fp16 prunable weights come back in their dtype
            continue
        W = decode_weight(parts, f, tuple(e["out_in"]), dtype, pattern)
        state[name] = (W.t() if e["transposed"] else W).contiguous()
    for alias, target in json.loads(info.metadata["aliases"]).items():
        state[alias] = state[target]
    return state


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Read a file written by :func:`save_sparse` back into a model.

    Without ``model`` the architecture is rebuilt from the class and config in
    the header (transformers classes only, never remote code); with ``model``
    the weights are loaded into it (it must be of the same class). Either way
    every tensor is checked against the header's checksum first.
    """
    import transformers
    from transformers.initialization import no_init_weights

    path = Path(path)
    info = read_header(path)
    state = load_state(path)
    cls_name = info.metadata["model_class"]
    if model is None:
        cls = getattr(transformers, cls_name, None)
        cfg_cls = getattr(transformers, info.metadata["config_class"], None)
        if cls is None or cfg_cls is None:
            raise StorageError(f"{path}: {cls_name} is not a transformers class; pass a model of "
                               f"that architecture: load_sparse(path, model=...)")
        config = cfg_cls.from_dict(json.loads(info.metadata["config"]))
        with no_init_weights():  # every weight is overwritten below
            model = cls(config)
    elif type(model).__name__ != cls_name:
        raise StorageError(f"{path} holds a {cls_name}, not a {type(model).__name__}; pass a model of "
                           f"the same architecture (or none, to rebuild it from the file)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise StorageError(f"{path} does not fit this model ({str(e).splitlines()[0]})") from None
    return model.eval()


# --------------------------------------------------------------------------- sizes
def prunable_summary(model: nn.Module) -> list[tuple[tuple[int, int], int]]:
    """((out, in), nnz) of every prunable weight."""
    return [(tuple(pl.shape), int((pl.weight != 0).sum())) for pl in prunable_layers(model)]


def size_row(path: str | os.PathLike, value_bits: int | None = None) -> dict:
    """Sizes of one file, measured on disk and split into prunable weights,
    other tensors and header, next to the floor for its prunable weights."""
    info = read_header(path)
    table = file_table(path)
    f = info.format
    pattern = info.metadata.get("pattern", "unstructured")
    prunable = [e for e in info.entries.values() if e["kind"] == "prunable"]
    native = value_bits or (torch.finfo(_dtype(prunable[0]["dtype"])).bits if prunable else 32)
    shapes_nnz = [(tuple(e["out_in"]), e["nnz"]) for e in prunable]
    numel = sum(s[0] * s[1] for s, _ in shapes_nnz)
    prunable_bytes = int(table.loc[table.kind == "prunable", "bytes"].sum())
    row = {"format": f.name, "layout": f.layout, "precision": f.precision or "native",
           "zstd": f.zstd, "file_bytes": info.file_bytes, "header_bytes": info.header_bytes,
           "prunable_bytes": prunable_bytes,
           "other_bytes": int(table.loc[table.kind == "other", "bytes"].sum()),
           "prunable_numel": numel, "value_bits": f.value_bits(native),
           "bits_per_weight": 8 * prunable_bytes / numel if numel else math.nan}
    row["nnz"] = sum(nnz for _, nnz in shapes_nnz)
    row["floor_bytes"] = floor_bytes(shapes_nnz, f.value_bits(native), pattern)
    row["floor_ratio"] = prunable_bytes / row["floor_bytes"] if row["floor_bytes"] else math.nan
    return row


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


def model_sizes(model: nn.Module, formats: Iterable[str] = SIZE_FORMATS, folder: str | os.PathLike | None = None,
                pattern: str = "unstructured", zstd_level: int = ZSTD_LEVEL, keep_files: bool = False,
                progress: bool = True) -> pd.DataFrame:
    """Write ``model`` once per format, measure each file on disk
    (:func:`size_row`), then delete it unless ``keep_files``. One row per format,
    with the parameter counts (total, nonzero) and the seconds the write took."""
    import tempfile
    import time

    from tqdm.auto import tqdm

    from lab_utils.models import count_parameters

    formats = check_formats(formats, pattern)
    total = count_parameters(model)
    nonzero = sum(int(np.count_nonzero(p.detach().numpy())) for p in model.parameters())
    entropy_floor = value_entropy_floor_bytes(model)
    shapes = [tuple(pl.shape) for pl in prunable_layers(model)]
    native_bits = torch.finfo(prunable_layers(model)[0].weight.dtype).bits if shapes else 32
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="sizes-", dir=io.cache_dir())) if own else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for fmt in tqdm(formats, desc="formats", disable=not progress, leave=False):
            path = folder / f"{fmt.replace('+', '_')}.lab"
            t0 = time.perf_counter()
            save_sparse(model, path, fmt, pattern=pattern, zstd_level=zstd_level)
            row = size_row(path)
            row.update(save_s=time.perf_counter() - t0, params=total, nonzero_params=nonzero)
            f = parse_format(fmt)
            lossless = f.lossless
            predictable = not f.zstd and f.layout != "nm"
            row["predicted_break_even"] = (break_even_sparsity(f, shapes, native_bits)
                                           if predictable else math.nan)
            row["predicted_break_even_vs_dense"] = (break_even_sparsity(f, shapes, native_bits, against="dense")
                                                    if predictable else math.nan)
            row["value_entropy_floor_bytes"] = entropy_floor if lossless else math.nan
            row["value_entropy_floor_ratio"] = row["prunable_bytes"] / entropy_floor if lossless else math.nan
            rows.append(row)
            if not keep_files:
                path.unlink()
    finally:
        if own and not keep_files:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return pd.DataFrame(rows)


def pruned(model_name: str, method: str, sparsity: float, pattern: str = "unstructured",
           progress: bool = True, dense: dict | None = None, **prune_kw):
    """A pruned model to measure (a LoadedModel). Calibrated methods (Wanda,
    SparseGPT) come from :func:`lab_utils.prune.pruned_model` and its
    checkpoint cache (minutes to compute, shared with the pruning sweep);
    magnitude and random pruning take seconds, so they are redone in memory
    by :func:`lab_utils.prune.prune_model` instead of leaving a full checkpoint
    per sparsity in the cache. ``dense`` (a dict) keeps the loaded dense
    model between calls: each call prunes a copy instead of reloading it."""
    import copy
    import dataclasses

    from lab_utils import prune
    from lab_utils.models import load_model
    from lab_utils.sparsify import CALIBRATED

    if method in CALIBRATED:
        return prune.pruned_model(model_name, method, sparsity, pattern, progress=progress, **prune_kw)[0]
    if dense is None:
        lm = load_model(model_name)
    else:
        if model_name not in dense:
            dense.clear()  # one dense model held at a time
            dense[model_name] = load_model(model_name)
        lm = dataclasses.replace(dense[model_name], model=copy.deepcopy(dense[model_name].model))
    prune.prune_model(lm, method, sparsity, pattern, progress=progress, **prune_kw)
    return lm


CONFIG_ARGS = ("scope", "nsamples", "seqlen", "seed", "owl", "calibration")  # of prune.make_config


def size_sweep(models: Iterable[str], methods: Iterable[str], sparsities: Iterable[float],
               formats: Iterable[str] = SIZE_FORMATS, pattern: str = "unstructured",
               zstd_level: int = ZSTD_LEVEL, keep_files: bool = False, progress: bool = True,
               workers: int | None = None, **prune_kw) -> pd.DataFrame:
    """Sizes for every model x method x sparsity: the pruned model comes from
    :func:`pruned`, each format is written and measured by :func:`model_sizes`.
    Results are cached (checksummed JSON) per setting, so a re-run reads them
    instead of rewriting the files. The missing ones are measured two at a time
    in worker processes on one thread each (:mod:`lab_utils.workers`: writing
    a file is mostly one-core numpy and zstd work), so ``save_s`` is each
    write's own time with the other measurement running beside it."""
    import dataclasses

    from lab_utils import prune
    from lab_utils import workers as side_by_side

    formats = check_formats(formats, pattern)
    settings = [(m, meth, float(s)) for m in models for meth in methods for s in sparsities]
    paths, missing = [], []
    for model_name, method, sparsity in settings:
        # The pruning as the engine sees it (arguments that do not apply to a method drop out).
        cfg_kw = {k: prune_kw[k] for k in CONFIG_ARGS if k in prune_kw}
        other_kw = sorted((k, v) for k, v in prune_kw.items() if k not in CONFIG_ARGS)
        cfg = dataclasses.asdict(prune.make_config(method, sparsity, pattern, **cfg_kw))
        key = io.key_hash("sizes", FILE_VERSION, SIZES_VERSION, prune.ENGINE_VERSION, model_name, cfg,
                          formats, zstd_level, other_kw)
        path = io.cache_dir() / "sizes" / f"{key}.json"
        paths.append(path)
        if io.cached_json(path) is None:
            missing.append({"model_name": model_name, "method": method, "sparsity": sparsity, "pattern": pattern,
                            "formats": list(formats), "zstd_level": zstd_level, "keep_files": keep_files,
                            "prune_kw": prune_kw, "path": str(path)})
    try:
        side_by_side.run_side_by_side(
            "lab_utils.storage:size_job", missing, workers=side_by_side.WORKERS if workers is None else workers,
            progress=progress, desc="sizes",
            describe=lambda j: f"measuring the sizes of {j['model_name']} ({j['method']}, {j['sparsity']:g})")
    except side_by_side.WorkerError as e:
        raise StorageError(str(e)) from e
    finally:
        _DENSE.clear()
    frames = []
    for path in paths:
        cached = io.cached_json(path)
        if cached is None:
            raise StorageError(f"{path} was not written by the size measurement; run size_sweep again")
        frames.append(pd.DataFrame(cached["rows"])[cached["columns"]])
    return pd.concat(frames, ignore_index=True)


_DENSE: dict = {}  # the dense model of the last size_job (a worker measures one model's rows in turn)


def size_job(model_name: str, method: str, sparsity: float, pattern: str, formats: list[str], zstd_level: int,
             keep_files: bool, prune_kw: dict, path: str) -> None:
    """Measure one row group of :func:`size_sweep` and store it at ``path``."""
    lm = pruned(model_name, method, sparsity, pattern, progress=False, dense=_DENSE, **prune_kw)
    key = Path(path).stem
    table = model_sizes(lm.model, formats, pattern=pattern, zstd_level=zstd_level,
                        folder=(io.cache_dir() / "sizes" / "files" / key) if keep_files else None,
                        keep_files=keep_files, progress=False)
    table.insert(0, "label", lm.label)
    table.insert(0, "model", model_name)
    table.insert(2, "method", method)
    table.insert(3, "sparsity", sparsity)
    table.insert(4, "pattern", pattern)
    table["actual_sparsity"] = 1 - table.nnz / table.prunable_numel
    # store_json sorts the keys: the column order is kept aside
    io.store_json(Path(path), {"columns": list(table.columns), "rows": table.to_dict(orient="records")})


def best_formats(sizes: pd.DataFrame, lossless: bool = True) -> pd.DataFrame:
    """Per model, method and sparsity: the format whose prunable weights take
    the fewest bytes (lossless formats only, unless ``lossless=False``), with
    its bits per weight, the floor and their ratio."""
    t = sizes[sizes.precision == "native"] if lossless else sizes
    idx = t.groupby(["model", "method", "sparsity"])["prunable_bytes"].idxmin()
    cols = ["model", "label", "method", "sparsity", "format", "prunable_bytes", "bits_per_weight",
            "floor_bytes", "floor_ratio", "value_entropy_floor_bytes", "value_entropy_floor_ratio"]
    out = t.loc[idx, cols].reset_index(drop=True)
    out["floor_bits_per_weight"] = 8 * out.floor_bytes / t.loc[idx, "prunable_numel"].to_numpy()
    return out


def break_even_table(sizes: pd.DataFrame) -> pd.DataFrame:
    """Per model, method and format: the lowest measured sparsity at which its
    file is smaller than the dense fp32 file of the same checkpoint, next to
    the break-even the arithmetic predicts for the model's prunable shapes
    (uncompressed formats; against dense of the same precision and against
    dense fp32)."""
    rows = []
    for (name, method, fmt), t in sizes.groupby(["label", "method", "format"], sort=False):
        dense = sizes[(sizes.label == name) & (sizes.method == method) & (sizes.format == "dense")]
        dense = dense.set_index("sparsity").file_bytes
        t = t.set_index("sparsity").sort_index()
        wins = t.file_bytes < dense.reindex(t.index)
        rows.append({"model": name, "method": method, "format": fmt,
                     "measured_break_even": min((s for s, w in wins.items() if w), default=math.nan),
                     "predicted_vs_same_precision": t.predicted_break_even.iloc[0],
                     "predicted_vs_dense_fp32": t.predicted_break_even_vs_dense.iloc[0]})
    return pd.DataFrame(rows)


def bits_table(sizes: pd.DataFrame) -> pd.DataFrame:
    """Bits per prunable weight: one row per model, method and sparsity, one
    column per format, and the floors for fp32 (and int8) values."""
    keys = ["label", "method", "sparsity"]
    table = sizes.pivot_table(index=keys, columns="format", values="bits_per_weight", sort=False)
    table = table[list(dict.fromkeys(sizes.format))]
    for precision, name in (("native", "floor fp32"), ("int8", "floor int8")):
        t = sizes[sizes.precision == precision]
        if len(t):
            first = t.groupby(keys, sort=False).first()
            table[name] = 8 * first.floor_bytes / first.prunable_numel
    return table


def round_trip(lm, formats: Iterable[str], folder: str | os.PathLike | None = None,
               pattern: str = "unstructured", tokens: int = 32) -> pd.DataFrame:
    """Save ``lm.model`` in each format, load it back from the file alone and
    compare: weights (bit for bit for lossless formats, with zeros read as
    +0.0; equal to :func:`quantized_weight` for fp16/int8) and the outputs on
    ``tokens`` tokens of real text."""
    import tempfile

    from lab_utils.speed import forward_inputs

    inputs = forward_inputs(lm, tokens)

    def outputs(model):
        with torch.inference_mode():
            out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    ref = outputs(lm.model)
    prunable = {pl.name: pl.weight for pl in prunable_layers(lm.model)}
    state = lm.model.state_dict()
    rows = []
    with tempfile.TemporaryDirectory(dir=folder or io.cache_dir()) as tmp:
        for fmt in check_formats(formats, pattern):
            f = parse_format(fmt)
            path = save_sparse(lm.model, Path(tmp) / "model.lab", fmt, pattern=pattern)
            back = load_sparse(path)
            got = back.state_dict()
            same = True
            for pl in prunable_layers(back):
                want = quantized_weight(prunable[pl.name], f.precision)
                same &= torch.equal(pl.weight + 0.0, want + 0.0)  # +0.0: -0.0 -> +0.0
            names = set(state) - {f"{n}.weight" for n in prunable}
            same &= all(torch.equal(got[n], state[n]) for n in names)
            diff = (outputs(back) - ref).abs().max().item()
            rows.append({"format": fmt, "file_bytes": path.stat().st_size, "weights_as_expected": bool(same),
                         "outputs_identical": diff == 0.0, "max_abs_output_diff": diff})
    return pd.DataFrame(rows)


def write_csv(table: pd.DataFrame, name: str) -> Path:
    """A table under results/ (atomically), for the write-up."""
    return io.write_csv(table, io.results_dir() / name)


# --------------------------------------------------------------------------- figures
def save_figure(fig, name: str) -> Path:
    """Save under figs/ atomically, with no timestamp: same data, same bytes."""
    return io.save_figure(fig, io.figs_dir() / name)


def size_figure(sizes: pd.DataFrame, label: str, method: str):
    """Two panels for one model and method: file size vs sparsity per format
    (the floor drawn for the whole file: floor of the prunable weights plus
    the rest as stored), and bits per prunable weight vs sparsity."""
    import matplotlib.pyplot as plt

    t = sizes[(sizes.label == label) & (sizes.method == method)].sort_values("sparsity")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for fmt, g in t.groupby("format", sort=False):
        style = "--" if "zstd" in fmt else "-"
        ax1.plot(g.sparsity, g.file_bytes / 2**20, style, marker=".", label=fmt)
        ax2.plot(g.sparsity, g.bits_per_weight, style, marker=".", label=fmt)
    native = t[t.format == "dense"]
    floor_file = native.floor_bytes + native.other_bytes + native.header_bytes
    ax1.plot(native.sparsity, floor_file / 2**20, "k:", lw=2.5, label="floor (fp32 values)")
    ax2.plot(native.sparsity, 8 * native.floor_bytes / native.prunable_numel, "k:", lw=2.5,
             label="floor (fp32 values)")
    int8 = t[t.precision == "int8"]
    int8 = int8[int8.format == int8.format.iloc[0]] if len(int8) else int8
    if len(int8):
        ax2.plot(int8.sparsity, 8 * int8.floor_bytes / int8.prunable_numel, color="grey", ls=":", lw=2,
                 label="floor (int8 values)")
    ax1.set(xlabel="sparsity", ylabel="file size (MiB)", title=f"{label}: file size on disk ({method})")
    ax2.set(xlabel="sparsity", ylabel="bits per prunable weight", yscale="log",
            title="bits per prunable weight")
    ax2.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- conclusions
def _ranges(points: list[tuple[float, str]]) -> list[tuple[str, float, float]]:
    """Consecutive runs of the same label: [(label, first x, last x)]."""
    runs: list[list] = []
    for x, label in points:
        if runs and runs[-1][0] == label:
            runs[-1][2] = x
        else:
            runs.append([label, x, x])
    return [tuple(r) for r in runs]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def size_conclusions(sizes: pd.DataFrame, low: float = 0.5, high: float = 0.95,
                     target: float = 1.05) -> str:
    """Generated prose for the size table: which lossless format wins where,
    how much smaller than dense it is at the highest sparsities, and how close
    the best one comes to the floor between ``low`` and ``high`` sparsity."""
    out = []
    best = best_formats(sizes)
    plain = best_formats(sizes[~sizes.zstd]) if (~sizes.zstd).any() else None
    for (label, method), b in best.groupby(["label", "method"], sort=False):
        b = b.sort_values("sparsity")
        runs = ", ".join(f"**{f}** from {_pct(a)} to {_pct(z)}" if a != z else f"**{f}** at {_pct(a)}"
                         for f, a, z in _ranges(list(zip(b.sparsity, b.format, strict=True))))
        text = [f"**{label}** ({method}): the smallest lossless file is {runs}."]
        t = sizes[(sizes.label == label) & (sizes.method == method)]
        top = b.sparsity.max()
        at = t[t.sparsity == top].set_index("format")
        if "dense" in at.index:
            winner = b[b.sparsity == top].format.item()
            smallest = at.file_bytes.idxmin()
            text.append(f"At {_pct(top)} sparsity the dense fp32 file still takes "
                        f"{at.loc['dense', 'file_bytes'] / 2**20:.1f} MiB (every zero is stored); "
                        f"{winner} takes {at.loc[winner, 'file_bytes'] / 2**20:.1f} MiB "
                        f"({at.loc['dense', 'file_bytes'] / at.loc[winner, 'file_bytes']:.1f}x smaller)"
                        + (f", and {smallest}, composing sparsity with int8, "
                           f"{at.loc[smallest, 'file_bytes'] / 2**20:.1f} MiB "
                           f"({at.loc['dense', 'file_bytes'] / at.loc[smallest, 'file_bytes']:.1f}x)"
                           if smallest != winner else "") + ".")
        mid = b[(b.sparsity >= low) & (b.sparsity <= high)]
        if len(mid):
            lo, hi = mid.floor_ratio.min(), mid.floor_ratio.max()
            verdict = (f"at most {target:.2f}x the floor at every one of them" if hi <= target
                       else f"above {target:.2f}x the floor at "
                            + ", ".join(_pct(s) for s in mid[mid.floor_ratio > target].sparsity))
            text.append(f"Between {_pct(low)} and {_pct(high)} sparsity its prunable weights take "
                        f"{lo:.2f}x to {hi:.2f}x the floor of (1-s)*32 + H(s) bits per weight: {verdict}.")
            if lo < 1:
                ve = mid.value_entropy_floor_ratio
                text.append("Going below that floor is no paradox: it counts 32 bits per kept value, "
                            "while trained weights use few distinct exponents. Against a floor that "
                            "uses the measured entropy of the sign and exponent bits (mantissas counted "
                            f"as incompressible) the best format is at {ve.min():.2f}x to {ve.max():.2f}x"
                            + ("; below even that, so the mantissa bits are not random either (weights "
                               "that came from a lower precision, such as fp16 or 4-bit blocks, keep some "
                               "of them constant)." if ve.min() < 1 else "."))
        if plain is not None:
            p = plain[(plain.label == label) & (plain.method == method)]
            p = p[(p.sparsity >= low) & (p.sparsity <= high)]
            if len(p):
                text.append(f"Without entropy coding the best is "
                            f"{' / '.join(dict.fromkeys(p.format))}, at {p.floor_ratio.min():.2f}x to "
                            f"{p.floor_ratio.max():.2f}x the floor: a fixed bit per weight of mask costs "
                            f"more than H(s) once s moves away from 50%.")
        out.append(" ".join(text))
    return "\n\n".join(out)


def round_trip_conclusion(rt: pd.DataFrame, label: str, sparsity: float) -> str:
    """One generated sentence on a :func:`round_trip` table."""
    lossless = rt[rt.format.map(lambda f: parse_format(f).lossless)]
    lossy = rt[~rt.index.isin(lossless.index)]
    ok = lossless[lossless.weights_as_expected & lossless.outputs_identical]
    text = (f"Round trip ({label}, {sparsity:.0%} sparsity): {len(ok)} of {len(lossless)} lossless formats "
            f"({', '.join(lossless.format)}) gave back bit-identical weights and identical outputs")
    bad = lossless[~lossless.index.isin(ok.index)]
    if len(bad):
        text += f"; {', '.join(bad.format)} did not (largest output difference {bad.max_abs_output_diff.max():.3g})"
    if len(lossy):
        text += (f". The lossy ones ({', '.join(lossy.format)}) gave back exactly the rounded weights "
                 if lossy.weights_as_expected.all() else
                 f". The lossy ones ({', '.join(lossy.format)}) did not all give back the rounded weights ")
        text += f"and outputs within {lossy.max_abs_output_diff.max():.3g} of the original"
    return text + "."
