"""What every concept demo measures: zeros, bytes in memory and on disk, seconds.

Sizes come from the tensors a model really holds and from files really
written; times are medians of interleaved calls after a warm-up, so that one
slow repetition on a shared machine does not decide a ratio.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from lab_utils.core import files, sparse_file
from lab_utils.core.measure import median_seconds, time_calls
from lab_utils.core.models import prunable_layers


def _quantized_nbytes(t: torch.Tensor) -> int:
    """A quantized tensor's integer values plus its scales and zero points."""
    n = t.int_repr().nbytes
    if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        n += t.q_per_channel_scales().nbytes + t.q_per_channel_zero_points().nbytes
    else:
        n += 8 + 8  # one float64 scale, one int64 zero point
    return n


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and packed (dynamic-quantized) weight,
    counting a tensor shared by two modules (tied embeddings) once."""
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        t = t.data
        n = _quantized_nbytes(t) if t.is_quantized else t.nbytes
        key = t.untyped_storage().data_ptr()
        seen[key] = max(seen.get(key, 0), n)
    packed = 0
    for m in model.modules():
        if isinstance(m, LinearPackedParams):  # int8 weights packed for the kernel: never shared
            weight, bias = m._weight_bias()
            packed += _quantized_nbytes(weight) + (bias.nbytes if bias is not None else 0)
    return sum(seen.values()) + packed


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> int:
    """Write ``tensors`` as one safetensors file (atomically); return its size on disk."""
    from safetensors.torch import save_file

    path = Path(path)
    with files.atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return path.stat().st_size


def count_zeros(model: nn.Module) -> dict[str, int]:
    """Parameters and exact zeros, over all parameters and over the prunable weights."""
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p.data == 0).sum()) for p in model.parameters())
    layers = prunable_layers(model)
    prunable = sum(pl.numel for pl in layers)
    prunable_zeros = sum(int((pl.weight == 0).sum()) for pl in layers)
    return {"parameters": total, "zeros": zeros, "prunable": prunable,
            "prunable_zeros": prunable_zeros}


def seconds_each(calls: dict, reps: int = 5) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each zero-argument call after one warm-up,
    timed interleaved (:func:`lab_utils.core.measure.time_calls`), as ``{name:
    {"forward_s", "forward_cpu_s"}}``. CPU time does not count the time other
    processes hold the cores, so it is the steadier of the two on a busy machine."""
    times = time_calls(calls, warmup=1, repeats=reps)
    wall, cpu = median_seconds(times), median_seconds(times, "cpu_seconds")
    return {k: {"forward_s": float(wall[k]), "forward_cpu_s": float(cpu[k])} for k in calls}


def forward_seconds_each(models: dict[str, nn.Module], input_ids: torch.Tensor,
                         reps: int = 5) -> dict[str, dict[str, float]]:
    """:func:`seconds_each` of one forward pass of every model over ``input_ids``."""
    return seconds_each({k: (lambda m=m: m(input_ids=input_ids)) for k, m in models.items()}, reps)


def file_bytes(write) -> int:
    """Size on disk of the safetensors files ``write(folder)`` writes, in a
    scratch folder of the cache removed afterwards (model files are hundreds of MB)."""
    folder = Path(tempfile.mkdtemp(prefix="concepts-", dir=files.cache_dir()))
    try:
        write(folder)
        return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def dense_file_bytes(model: nn.Module) -> int:
    """Bytes of the weights file that ``save_pretrained`` writes: the ordinary
    dense safetensors checkpoint everyone ships (zeros stored like any value)."""
    return file_bytes(lambda folder: model.save_pretrained(folder))


def sparse_file_bytes(model: nn.Module, format: str = "bitmask") -> int:
    """Bytes of the model in one of :mod:`lab_utils.core.sparse_file`'s formats."""
    return file_bytes(lambda folder: sparse_file.save_sparse(model, folder / "model.safetensors", format))


def timing_table(rows: list[dict]):
    """The demos' Stopwatch rows as a table, with CPU time / threads (the idle-machine estimate)."""
    t = pd.DataFrame(rows)
    t["cpu_s_per_thread"] = t.cpu_s / t.threads
    return t
