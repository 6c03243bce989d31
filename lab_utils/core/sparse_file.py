"""Reading and writing sparse weight files: codecs per layout and precision, checksummed containers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils.core import files
from lab_utils.core.device import dtype_name
from lab_utils.core.formats import (
    FILE_VERSION,
    SCALE_DTYPE,
    SEP,
    ZSTD_LEVEL,
    Format,
    StorageError,
    index_dtype,
    nm_position_bits,
    parse_format,
)
from lab_utils.core.models import _conv1d_type, prunable_layers
from lab_utils.core.sparsify import SparsityError, parse_pattern


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
        # Row-major positions of the nonzeros, found once: numpy's 1-D flatnonzero is several
        # times faster than a 2-D boolean mask, and steadier than torch's threads on a busy CPU.
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
        W[_value_rows(parts, f, shape, pattern), parts["col_indices"].to(torch.int64)] = values
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
    """Row index of every stored value (its row's int8 scale; a CSR value's row)."""
    out_f, in_f = shape
    if f.layout == "csr":
        return torch.repeat_interleave(torch.arange(out_f), parts["crow_indices"].to(torch.int64).diff())
    if f.layout == "bitmask":
        keep = np.unpackbits(parts["mask"].numpy())[: out_f * in_f].reshape(out_f, in_f)
        return torch.repeat_interleave(torch.arange(out_f), torch.from_numpy(keep.sum(1).astype(np.int64)))
    prune_n, prune_m = parse_pattern(pattern)
    return torch.arange(out_f).repeat_interleave((in_f // prune_m) * (prune_m - prune_n))


# --------------------------------------------------------------------------- files
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
        h.update(f"{key}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
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
        entry.update(dtype=dtype_name(t.dtype), shape=list(t.shape), parts={})
        for comp, value in parts.items():
            key = f"{name}{SEP}{comp}" if comp else name
            entry["parts"][comp] = {"key": key, "dtype": dtype_name(value.dtype), "shape": list(value.shape)}
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
    with files.atomic_path(path) as tmp:
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
