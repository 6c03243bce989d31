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

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils.core import files
from lab_utils.core.formats import (
    FILE_VERSION,
    SIZE_FORMATS,
    ZSTD_LEVEL,
    StorageError,
    break_even_sparsity,
    check_formats,
    floor_bytes,
    parse_format,
    value_entropy_floor_bytes,
)
from lab_utils.core.models import prunable_layers
from lab_utils.core.sparse_file import (
    _dtype,
    file_table,
    load_sparse,
    quantized_weight,
    read_header,
    save_sparse,
)

SIZES_VERSION = 3  # part of the size cache key: bump when the size table changes


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


def model_sizes(model: nn.Module, formats: Iterable[str] = SIZE_FORMATS, folder: str | os.PathLike | None = None,
                pattern: str = "unstructured", zstd_level: int = ZSTD_LEVEL, keep_files: bool = False,
                progress: bool = True) -> pd.DataFrame:
    """Write ``model`` once per format, measure each file on disk
    (:func:`size_row`), then delete it unless ``keep_files``. One row per format,
    with the parameter counts (total, nonzero) and the seconds the write took."""
    import tempfile
    import time

    from tqdm.auto import tqdm

    from lab_utils.core.models import count_parameters

    formats = check_formats(formats, pattern)
    total = count_parameters(model)
    nonzero = sum(int(np.count_nonzero(p.detach().numpy())) for p in model.parameters())
    entropy_floor = value_entropy_floor_bytes(model)
    shapes = [tuple(pl.shape) for pl in prunable_layers(model)]
    native_bits = torch.finfo(prunable_layers(model)[0].weight.dtype).bits if shapes else 32
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="sizes-", dir=files.cache_dir())) if own else Path(folder)
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

    from lab_utils.core.models import load_model
    from lab_utils.core.sparsify import CALIBRATED
    from lab_utils.engine import checkpoints, prune

    if method in CALIBRATED:
        return checkpoints.pruned_model(model_name, method, sparsity, pattern, progress=progress, **prune_kw)[0]
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

    from lab_utils.engine import config
    from lab_utils.experiments import jobs as side_by_side

    formats = check_formats(formats, pattern)
    settings = [(m, meth, float(s)) for m in models for meth in methods for s in sparsities]
    paths, missing = [], []
    for model_name, method, sparsity in settings:
        # The pruning as the engine sees it (arguments that do not apply to a method drop out).
        cfg_kw = {k: prune_kw[k] for k in CONFIG_ARGS if k in prune_kw}
        other_kw = sorted((k, v) for k, v in prune_kw.items() if k not in CONFIG_ARGS)
        cfg = dataclasses.asdict(config.make_config(method, sparsity, pattern, **cfg_kw))
        key = files.key_hash("sizes", FILE_VERSION, SIZES_VERSION, config.ENGINE_VERSION, model_name, cfg,
                          formats, zstd_level, other_kw)
        path = files.cache_dir() / "sizes" / f"{key}.json"
        paths.append(path)
        if files.cached_json(path) is None:
            missing.append({"model_name": model_name, "method": method, "sparsity": sparsity, "pattern": pattern,
                            "formats": list(formats), "zstd_level": zstd_level, "keep_files": keep_files,
                            "prune_kw": prune_kw, "path": str(path)})
    try:
        side_by_side.run_side_by_side(
            "lab_utils.experiments.file_sizes:size_job", missing, workers=side_by_side.WORKERS if workers is None else workers,
            progress=progress, desc="sizes",
            describe=lambda j: f"measuring the sizes of {j['model_name']} ({j['method']}, {j['sparsity']:g})")
    except side_by_side.WorkerError as e:
        raise StorageError(str(e)) from e
    finally:
        _DENSE.clear()
    frames = []
    for path in paths:
        cached = files.cached_json(path)
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
                        folder=(files.cache_dir() / "sizes" / "files" / key) if keep_files else None,
                        keep_files=keep_files, progress=False)
    table.insert(0, "label", lm.label)
    table.insert(0, "model", model_name)
    table.insert(2, "method", method)
    table.insert(3, "sparsity", sparsity)
    table.insert(4, "pattern", pattern)
    table["actual_sparsity"] = 1 - table.nnz / table.prunable_numel
    # store_json sorts the keys: the column order is kept aside
    files.store_json(Path(path), {"columns": list(table.columns), "rows": table.to_dict(orient="records")})


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

    from lab_utils.experiments.speed import forward_inputs

    inputs = forward_inputs(lm, tokens)

    def outputs(model):
        with torch.inference_mode():
            out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    ref = outputs(lm.model)
    prunable = {pl.name: pl.weight for pl in prunable_layers(lm.model)}
    state = lm.model.state_dict()
    rows = []
    with tempfile.TemporaryDirectory(dir=folder or files.cache_dir()) as tmp:
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
    return files.write_csv(table, files.results_dir() / name)
