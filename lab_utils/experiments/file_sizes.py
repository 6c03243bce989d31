"""The file-size experiment: a pruned model written in every sparse format, each file measured on disk.

A pruned model saved as usual still stores every zero. This module writes a pruned model in
formats that skip them (:mod:`lab_utils.core.sparse_file`), measures each file
(:func:`model_sizes`) next to the floors of :mod:`lab_utils.core.formats`, caches the table of
each setting (:func:`size_sweep`), condenses it (:func:`best_formats`,
:func:`break_even_table`, :func:`bits_table`) and checks that a file gives the model back
(:func:`round_trip`). Figures and sentences live in :mod:`lab_utils.presentation.file_sizes_view`.

A format name is ``layout[-precision][+zstd]``. Layouts: ``dense`` (zeros included), ``csr``
(kept values, row pointers, column indices in the smallest unsigned dtype that fits),
``bitmask`` (one packed bit per weight, then the kept values), ``nm`` (N:M-pruned weights: the
kept values of each group of M and their positions, ceil(log2 M) bits each). Precision: none
(lossless), ``fp16``, or ``int8`` (per-row symmetric, one fp32 scale per row). ``+zstd``:
each stored tensor compressed in its own frame, so each part's bytes stay measurable.
Layout and precision apply to the prunable weights only; every other tensor is stored densely
and losslessly in every format, so differences between formats are the prunable weights'.

The container is safetensors whose metadata holds the model class and config (:func:`load_sparse`
needs no template) and a sha256 of every stored byte, so a damaged file fails with one
:class:`StorageError`; ``dense`` and ``dense-fp16`` files are ordinary safetensors checkpoints
that any tool reads. A lossless format gives back every weight bit for bit, except that a
pruned zero reads back as +0.0 (both zeros multiply the same, so the logits are identical);
``fp16`` and ``int8`` give back exactly :func:`quantized_weight` of the saved weight.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lab_utils.core import files, memo
from lab_utils.core.data import forward_inputs
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
from lab_utils.core.models import count_parameters, prunable_layers
from lab_utils.core.progress import tqdm
from lab_utils.core.sparse_file import (
    _dtype,
    file_table,
    load_sparse,
    quantized_weight,
    read_header,
    save_sparse,
)
from lab_utils.engine import checkpoints
from lab_utils.engine.config import DEFAULT_NSAMPLES, ENGINE_VERSION, PruneConfig, key_settings
from lab_utils.experiments import executor as ex
from lab_utils.experiments import sweep

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
                pattern: str = "unstructured", zstd_level: int = ZSTD_LEVEL, keep_files: bool = False) -> pd.DataFrame:
    """Write ``model`` once per format, measure each file on disk
    (:func:`size_row`), then delete it unless ``keep_files``. One row per format,
    with the parameter counts (total, nonzero) and the seconds the write took."""
    formats = check_formats(formats, pattern)
    total = count_parameters(model)
    nonzero = sum(int(np.count_nonzero(p.detach().numpy())) for p in model.parameters())
    entropy_floor = value_entropy_floor_bytes(model)
    layers = prunable_layers(model)
    shapes = [tuple(pl.shape) for pl in layers]
    native_bits = torch.finfo(layers[0].weight.dtype).bits if layers else 32
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="sizes-", dir=files.cache_dir())) if own else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for fmt in tqdm(formats, desc="formats", leave=False):
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
            shutil.rmtree(folder, ignore_errors=True)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SizeConfig:
    """The settings of the size table: ``models`` x ``methods`` x ``sparsities``
    pruned (with ``pattern`` and the calibration ``nsamples``, ``seqlen`` and
    ``seed`` of the calibrated methods), each written in every one of
    ``formats`` with ``zstd_level``; ``keep_files`` keeps the files under
    ``cache_dir()/sizes/files/``. The formats are checked when the config is
    made."""

    models: tuple
    methods: tuple = ("magnitude",)
    sparsities: tuple = (0.5,)
    formats: tuple = SIZE_FORMATS
    pattern: str = "unstructured"
    zstd_level: int = ZSTD_LEVEL
    keep_files: bool = False
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("models", "methods", "sparsities"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "formats", tuple(check_formats(self.formats, self.pattern)))

    def prune_config(self, method: str, sparsity: float) -> PruneConfig:
        """The pruning as the engine sees it (settings that do not apply to a method drop out)."""
        return PruneConfig(method, sparsity, self.pattern, nsamples=self.nsamples, seqlen=self.seqlen,
                           seed=self.seed)


def size_sweep(cfg: SizeConfig, executor: str | ex.Executor = ex.LOCAL, workers: int | None = None,
               resources: dict[str, float] | None = None) -> pd.DataFrame:
    """Sizes (:func:`model_sizes`) for every model x method x sparsity of ``cfg``, cached as
    checksummed JSON per setting. The missing ones are jobs on ``executor``
    (:func:`lab_utils.experiments.executor.run_jobs`; by default ``workers`` processes of one
    thread each: writing a file is mostly one-core numpy and zstd work), so ``save_s`` is each
    write's own time with the other measurements running beside it."""
    paths, missing = [], []
    for model_name in cfg.models:
        for method in cfg.methods:
            for sparsity in cfg.sparsities:
                prune_cfg = cfg.prune_config(method, float(sparsity))
                path = files.cache_dir() / "sizes" / f"{sizes_key(model_name, prune_cfg, cfg)}.json"
                paths.append(path)
                if files.cached_json(path) is None:
                    missing.append({"model_name": model_name, "cfg": prune_cfg, "size": cfg, "path": str(path)})
    try:
        measured = ex.run_jobs(
            size_job, missing, executor, workers=workers, desc="sizes", resources=resources,
            describe=lambda j: f"measuring the sizes of {j['model_name']} ({j['cfg'].method}, {j['cfg'].sparsity:g})")
    except ex.JobError as e:
        raise StorageError(str(e)) from e
    finally:
        sweep.release()  # jobs run here (serial) leave their model behind
    returned = {job["path"]: table for job, table in zip(missing, measured, strict=True)}
    frames = []
    for path in paths:
        cached = returned.get(str(path)) or files.cached_json(path)
        if cached is None:
            raise StorageError(f"{path} was not written by the size measurement; run size_sweep again")
        frames.append(pd.DataFrame(cached["rows"])[cached["columns"]])
    return pd.concat(frames, ignore_index=True)


def sizes_key(model_name: str, cfg: PruneConfig, size: SizeConfig) -> str:
    """The cache key of one setting's size table: the pruning and what is written."""
    return files.key_hash("sizes", FILE_VERSION, SIZES_VERSION, ENGINE_VERSION, model_name, key_settings(cfg),
                          list(size.formats), size.zstd_level)


def size_job(model_name: str, cfg: PruneConfig, size: SizeConfig, path: str) -> dict:
    """Measure one row group of :func:`size_sweep` (the pruning ``cfg`` of
    ``model_name``, written as ``size`` says), store it at ``path`` and return
    it as stored."""
    lm, _ = checkpoints.pruned_model(sweep.dense_model(model_name), cfg)  # a worker measures one model's rows in turn
    key = Path(path).stem
    table = model_sizes(lm.model, size.formats, pattern=size.pattern, zstd_level=size.zstd_level,
                        folder=(files.cache_dir() / "sizes" / "files" / key) if size.keep_files else None,
                        keep_files=size.keep_files)
    table.insert(0, "label", lm.label)
    table.insert(0, "model", model_name)
    table.insert(2, "method", cfg.method)
    table.insert(3, "sparsity", cfg.sparsity)
    table.insert(4, "pattern", size.pattern)
    table["actual_sparsity"] = 1 - table.nnz / table.prunable_numel
    # store_json sorts the keys: the column order is kept aside
    files.store_json(Path(path), {"columns": list(table.columns), "rows": table.to_dict(orient="records")})
    return files.cached_json(Path(path))  # as stored (JSON types), the same as a later read


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


def round_trip_check(sizes: pd.DataFrame, method: str, sparsities, formats):
    """:func:`round_trip` of the smallest model of a :func:`size_sweep` table
    (the check is the same for every model) at 50% sparsity (else the highest
    measured), in its compressed formats and CSR (:func:`model_round_trip`, a
    cached step). Returns (table, model label, sparsity)."""
    sparsity = 0.5 if 0.5 in sparsities else max(sparsities)
    smallest = sizes.loc[sizes.params.idxmin()]
    fmts = [f for f in formats if f.endswith("+zstd") or f == "csr"]
    return model_round_trip(smallest.model, method, sparsity, fmts), smallest.label, sparsity


@memo.step("03-round-trip")
def model_round_trip(model_name: str, method: str, sparsity: float, formats: list[str]) -> pd.DataFrame:
    """:func:`round_trip` of ``model_name`` pruned with ``method`` at ``sparsity``."""
    return round_trip(checkpoints.pruned_model(model_name, PruneConfig(method, sparsity))[0], formats)
