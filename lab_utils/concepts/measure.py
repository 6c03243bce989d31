"""What every concept demo measures: zeros, bytes in memory and on disk, seconds.

Sizes are counted from the tensors a model really holds (quantized weights
included) and from files really written; times are medians after a warm-up,
so that one slow repetition on a shared machine does not decide a ratio.
Perplexity is :func:`lab_utils.evaluation.perplexity.perplexity`; dense
checkpoints are what ``save_pretrained`` writes, sparse-format files come from
:mod:`lab_utils.storage`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lab_utils import io
from lab_utils.models import prunable_layers


def _tensor_nbytes(t) -> tuple[int, int]:
    """(storage key, bytes) of a tensor; a quantized tensor counts its integer
    values plus its scales and zero points (what it really keeps)."""
    if t.is_quantized:
        n = t.int_repr().nbytes
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            n += t.q_per_channel_scales().nbytes + t.q_per_channel_zero_points().nbytes
        else:
            n += 8 + 8  # one float64 scale, one int64 zero point
        return id(t), n
    return t.untyped_storage().data_ptr(), t.nbytes


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and packed (dynamic-quantized) weight,
    counting a tensor shared by two modules (tied embeddings) once."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        key, n = _tensor_nbytes(t.data)
        seen[key] = max(seen.get(key, 0), n)
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            for t in (weight, bias):
                if t is not None:
                    key, n = _tensor_nbytes(t)
                    seen[key] = n
    return sum(seen.values())


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> int:
    """Write ``tensors`` as one safetensors file (atomically); return its size on disk."""
    from safetensors.torch import save_file

    path = Path(path)
    with io.atomic_path(path) as tmp:
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


@torch.no_grad()
def forward_seconds(model: nn.Module, input_ids: torch.Tensor, reps: int = 5, warmup: int = 1,
                    device: str = "cpu") -> float:
    """Median wall time of one forward pass over ``input_ids`` (batch x seqlen)."""
    input_ids = input_ids.to(device)
    for _ in range(warmup):
        model(input_ids=input_ids)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(input_ids=input_ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_seconds_each(models: dict[str, nn.Module], input_ids: torch.Tensor, reps: int = 5,
                         warmup: int = 1, device: str = "cpu") -> dict[str, float]:
    """Median forward time of each model, the repetitions interleaved (A B C A B C ...)
    so that a burst of load on a shared machine hits every model alike."""
    input_ids = input_ids.to(device)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(input_ids=input_ids)
        for _ in range(reps):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(input_ids=input_ids)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def file_bytes(write) -> int:
    """Size on disk of what ``write(folder)`` writes (every file in it), measured
    in a scratch folder of the cache that is removed afterwards (model files
    are hundreds of MB)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="concepts-", dir=io.cache_dir()))
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
    """Bytes of the model in one of :mod:`lab_utils.storage`'s sparse formats."""
    from lab_utils import storage

    return file_bytes(lambda folder: storage.save_sparse(model, folder / "model.safetensors", format))


def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> float:
    """The lab's perplexity protocol (:mod:`lab_utils.evaluation.perplexity`)."""
    from lab_utils.evaluation.perplexity import perplexity as ppl

    return ppl(model, windows, progress=progress)
