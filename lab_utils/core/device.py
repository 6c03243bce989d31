"""Where the computation runs: the device, the forward dtype, the clock and the memory of a device.

The forward dtype defaults to float32 on the CPU and bfloat16 on an
accelerator, as the Wanda and SparseGPT reference code runs in half precision.
"""

from __future__ import annotations

import platform
import re
import warnings
from pathlib import Path

import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A device or dtype that cannot be used here (one line, naming the fix)."""


def available() -> list[str]:
    """The devices torch sees on this machine, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (cuda when torch sees one, else mps, else cpu), ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps`` as a ``torch.device``; a device torch does
    not see raises :class:`DeviceError` naming those it sees."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name.strip()):
        raise DeviceError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    name = name.strip()
    seen = ", ".join(available())
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: torch sees no CUDA device here (it sees: {seen}); "
                              f"use device 'auto' or 'cpu'")
        index = int(name.split(":")[1]) if ":" in name else None
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                              f"({seen}); use one of those")
    if name == "mps" and not _mps_available():
        raise DeviceError(f"device 'mps': torch sees no Apple GPU here (it sees: {seen}); "
                          f"use device 'auto' or 'cpu'")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype of the forward passes: ``auto`` (or None) is float32 on the
    CPU and bfloat16 on an accelerator; float16 is refused on the CPU (many
    CPU kernels lack it, and the ones that exist are slower than float32)."""
    device = torch.device(device)
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name is None or name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise DeviceError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise DeviceError("dtype 'float16' is not supported on the CPU; use 'float32' or 'bfloat16' "
                          "there, or float16 on a GPU")
    if name == "bfloat16" and device.type == "cpu" and cpu_bf16() is None:
        warnings.warn("dtype 'bfloat16' on a CPU without native bfloat16 instructions (AMX or AVX512-BF16): "
                      "torch emulates them, often many times slower than float32; use dtype 'float32' here",
                      stacklevel=2)
    return DTYPES[name]


def cpu_bf16() -> str | None:
    """The native bfloat16 instructions of this CPU (``"AMX"``, ``"AVX512-BF16"``), or None
    where it has none and a bfloat16 matmul would be emulated in float32 (slower than
    float32 itself). Asked of torch's own CPU probe, else of ``/proc/cpuinfo``: never
    assumed from the machine's kind, since machines of one kind differ."""
    probe = getattr(torch, "cpu", None)
    amx, avx = getattr(probe, "_is_amx_tile_supported", None), getattr(probe, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        has_amx, has_avx = bool(amx()), bool(avx())
    else:
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            return None
        has_amx, has_avx = "amx_bf16" in flags, "avx512_bf16" in flags
    return "AMX" if has_amx else "AVX512-BF16" if has_avx else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, where
    every op has finished when it returns)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device | str) -> str:
    """A human name: the GPU's (``torch.cuda.get_device_name``), or the CPU
    model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (mps)"
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> int | None:
    """Peak bytes the allocator held on ``device`` since the last reset
    (``torch.cuda.max_memory_allocated``); None on the CPU and mps, whose
    memory the process's resident size already measures."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def resolved(device: str | None = "auto", dtype: str | None = "auto") -> tuple[str, str]:
    """The names a job and a cache key carry: ``("cpu", "float32")`` for the
    defaults on this machine, ``("cuda", "bfloat16")`` on a GPU node."""
    dev = resolve_device(device)
    return str(dev), dtype_name(resolve_dtype(dtype, dev))


def engine_kwargs(device: str | None = "auto", dtype: str | None = "auto") -> dict:
    """``device=`` and ``dtype=`` for the pruning engine, or nothing on the
    CPU in float32: callers that key a cache by their keyword arguments keep
    the keys of every CPU run."""
    dev, dt = resolved(device, dtype)
    return {} if (dev, dt) == ("cpu", "float32") else {"device": dev, "dtype": dt}


def describe(device: str | None = "auto", dtype: str | None = "auto") -> dict:
    """The resolved device, dtype and device name as the report's parameters
    table shows them (raises :class:`DeviceError` as the resolvers do)."""
    dev, dt = resolved(device, dtype)
    return {"device": dev, "dtype": dt, "device_name": device_name(dev)}


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings' device when it has
    them (a model dispatched over devices by accelerate reads its inputs
    there), else its first parameter's (the CPU for a module without any)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")  # a parameterless stand-in
