"""Pruned checkpoints: :func:`pruned_model` is the one way to get a pruned model (from the
checkpoint cache, else from the engine); :func:`save_pretrained` writes a complete model folder.

A checkpoint stores the prunable weights as a packed bit mask plus the kept values, written
atomically with a checksum manifest and named by :func:`~lab_utils.engine.config.checkpoint_key`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lab_utils.core import files
from lab_utils.core.models import LoadedModel, load_model, prunable_layers, resolve
from lab_utils.core.sparsify import SparsityError
from lab_utils.engine.config import PruneConfig, checkpoint_key, resolve_config
from lab_utils.engine.prune import PruneReport, fill_coverage, fill_report, prune_model


def checkpoint_dir(model_slug: str, cfg: PruneConfig, key: str) -> Path:
    pat = cfg.pattern.replace(":", "of")
    name = f"{model_slug}-{cfg.method}-{pat}-{cfg.sparsity:g}{'-owl' if cfg.owl else ''}-{key}"
    return files.cache_dir() / "pruned" / name


WEIGHTS_FILE = "pruned.safetensors"
REPORT_FILE = "report.json"


def save_checkpoint(model: nn.Module, folder: Path) -> None:
    """The prunable layers' weights in a compact exact form: a packed bit mask
    of the nonzeros and their values (everything else is the base model)."""
    tensors = {}
    for pl in prunable_layers(model):
        W = pl.weight.detach().contiguous()
        nz = (W != 0).flatten()
        tensors[f"{pl.name}.mask"] = torch.from_numpy(np.packbits(nz.numpy()))
        tensors[f"{pl.name}.values"] = W.flatten()[nz].clone()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "mask+values"})


@torch.no_grad()
def load_checkpoint(model: nn.Module, folder: Path) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for pl in prunable_layers(model):
        W = pl.weight
        bits = tensors[f"{pl.name}.mask"].numpy()
        nz = torch.from_numpy(np.unpackbits(bits, count=W.numel()).astype(bool))
        flat = torch.zeros(W.numel(), dtype=W.dtype)
        flat[nz] = tensors[f"{pl.name}.values"]
        pl.set_weight(flat.view(W.shape))


def pruned_model(model: str | LoadedModel, cfg: PruneConfig, *, save: bool | None = None,
                 rebuild: bool = False, separate_process: bool = False) -> tuple[LoadedModel, PruneReport]:
    """Load a model and prune it as ``cfg`` says, or load the cached checkpoint of the same
    pruning (under ``cache_dir()/pruned/``). Sparsity 0 returns the dense model.

    ``model``: a name (preset, hub id or folder), or the dense model of such a name already
    loaded, which is left untouched (a copy is pruned; at sparsity 0 it is returned itself).
    ``save``: None (default) checkpoints the calibrated methods only, because random and
    magnitude pruning take less time than reading a checkpoint back. ``rebuild=True`` prunes
    again and replaces the checkpoint (and the seconds it records).
    ``separate_process=True`` builds a missing calibrated checkpoint in a child process and
    loads it, so pruning's activations, Hessians and allocator caches never enter this process
    (notebook 02 keeps its memory near the model's size that way).
    """
    if isinstance(model, LoadedModel):
        spec = model.spec
        lm = model if cfg.sparsity == 0 else dataclasses.replace(model, model=copy.deepcopy(model.model))
    else:
        spec = resolve(model)
        lm = load_model(spec)
    cfg = resolve_config(spec, cfg, lm.model.config)
    save = cfg.calibrated if save is None else save
    key = checkpoint_key(spec, cfg, lm.model.config)
    if cfg.sparsity == 0:
        report = PruneReport.of(spec.name, spec.family, cfg)
        fill_report(report, lm.model)
        report.key = key
        return lm, report
    folder = checkpoint_dir(spec.slug, cfg, key)
    if not rebuild and files.verify_dir(folder):
        load_checkpoint(lm.model, folder)
        report = PruneReport.from_json((folder / REPORT_FILE).read_text())
        report.from_cache = True
        fill_coverage(report, lm.model)  # a report from before coverage lacks it; and the warning
        return lm, report
    if separate_process and cfg.calibrated and save:
        _build_in_child(spec.name, cfg, rebuild)
        if not files.verify_dir(folder):
            raise SparsityError(f"the child process that pruned {spec.name} left no valid checkpoint "
                                f"in {folder}; run checkpoints.pruned_model(...) in this process to see why")
        load_checkpoint(lm.model, folder)
        return lm, PruneReport.from_json((folder / REPORT_FILE).read_text())
    report = prune_model(lm, cfg)
    report.key = key
    if not save:
        return lm, report
    report.checkpoint = str(folder)
    with files.atomic_dir(folder) as tmp:
        save_checkpoint(lm.model, tmp)
        (tmp / REPORT_FILE).write_text(report.to_json())
    return lm, report


def _build_in_child(model_name: str, cfg: PruneConfig, rebuild: bool = False) -> None:
    """Run :func:`pruned_model` for ``cfg`` in a fresh Python process
    (same environment, cache and thread count), which writes the checkpoint."""
    payload = json.dumps({"model": model_name, "cfg": dataclasses.asdict(cfg), "rebuild": rebuild,
                          "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", "lab_utils.engine.checkpoints", payload], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SparsityError(f"pruning {model_name} ({cfg.method}, {cfg.pattern}, {cfg.sparsity:g}) in a "
                            f"separate process failed: {tail[0]}")


def _child_main(payload: str) -> None:
    args = json.loads(payload)
    torch.set_num_threads(int(args["threads"]))
    pruned_model(args["model"], PruneConfig(**args["cfg"]), save=True, rebuild=args["rebuild"])


def check_output_dir(out: str | Path) -> Path:
    """A folder that may be (re)written: absent, empty, or one written here
    before (it has our manifest). Anything else would be replaced: refuse."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / files.MANIFEST).is_file())):
        raise SparsityError(f"{out} exists and is not a model folder written here; "
                            f"choose a new --out folder (it would be replaced)")
    return out


def save_pretrained(lm: LoadedModel, out: str | Path) -> Path:
    """A complete model folder (safetensors, tokenizer, feature extractor) that
    loads like any other: ``load_model(out)``."""
    out = check_output_dir(out)
    with files.atomic_dir(out) as tmp:
        lm.model.save_pretrained(tmp)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        if lm.feature_extractor is not None:
            lm.feature_extractor.save_pretrained(tmp)
    return out


if __name__ == "__main__":  # the child of pruned_model(separate_process=True)
    _child_main(sys.argv[1])
