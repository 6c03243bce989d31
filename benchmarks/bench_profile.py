"""Where calibrated pruning spends its time: one table per method, stage by stage.

One Wanda and one SparseGPT pruning of the model (default SmolLM2-135M) under
the reference protocol (64 calibration windows of 512 tokens, 50%), run under
``torch.profiler``. The engine names its stages with ``record_function``
(``lab::capture``, ``lab::statistics_pass``, ``lab::statistics_update``,
``lab::prune_layer``, ``lab::sparsegpt_inverse``, ``lab::propagate``,
``lab::copies``); every top-level operator is put in one category by its name
and the stage it ran in:

=========================  ===============================================
linear layers              the prunable layers' matrix products (forward)
attention                  scaled dot-product attention (forward)
norms and elementwise      everything else the blocks compute (RMSNorm,
                           rotary embedding, SiLU, residual adds)
statistics                 squared input norms (Wanda) or X^T X (SparseGPT)
mask selection             scores, sort / top-k, scatter, masked fill
SparseGPT column loop      the optimal-brain-surgeon updates
SparseGPT inverse          Cholesky of the dampened Hessian and its inverse
copies between stages      dtype/device casts, clones, concatenations
                           outside the blocks' forward
Python and dispatch        time inside the stages that no operator covers
outside the stages         the rest of the wall time
=========================  ===============================================

Where a stage has a floor, the table prints it: its floating-point
operations over the best matrix-multiply rate measured at the model's layer
shapes in the same run (:func:`benchmarks.bench_sparsify.compute_floor`).
``cores idle`` is the share of ``threads x wall`` seconds during which the
process was not on a CPU (``1 - CPU seconds / (threads x wall)``).

    python -m benchmarks profile [-- --methods wanda --nsamples 16]

The profiler costs a few percent (it records every operator); the shares are
what to read, the absolute seconds hold for this run only.
"""

from __future__ import annotations

import argparse
import copy
import os

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_sparsify import compute_floor
from lab_utils.core import files
from lab_utils.core.models import load_model
from lab_utils.engine import config as engine_config
from lab_utils.engine.prune import prune_model

FORWARD = {"lab::capture", "lab::statistics_pass", "lab::propagate"}
MATMUL = {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm"}
ATTENTION = ("scaled_dot_product", "aten::softmax", "aten::_softmax", "aten::baddbmm")
COPIES = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
          "aten::index", "aten::stack", "aten::empty_like"}
SELECTION = {"aten::sort", "aten::topk", "aten::kthvalue", "aten::scatter_", "aten::scatter"}
CATEGORIES = ["linear layers", "attention", "norms and elementwise", "statistics", "mask selection",
              "SparseGPT column loop", "SparseGPT inverse", "copies between stages",
              "Python and dispatch", "outside the stages"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LAB_THREADS", 2)))
    ap.add_argument("--dtype", default="float32", help="of the calibration forward passes (float32 | bfloat16)")
    return ap.parse_args(argv)


def category(name: str, scopes: tuple[str, ...], method: str) -> str:
    """The category of a top-level operator ``name`` run inside the stage
    scopes ``scopes`` (outermost first) while pruning with ``method``."""
    inner = scopes[-1] if scopes else ""
    if "lab::statistics_update" in scopes:
        return "copies between stages" if name in COPIES else "statistics"
    if "lab::sparsegpt_inverse" in scopes:
        return "SparseGPT inverse"
    if "lab::prune_layer" in scopes:
        if name in SELECTION:
            return "mask selection"
        if method == "sparsegpt":
            return "copies between stages" if name in COPIES else "SparseGPT column loop"
        return "mask selection"
    if inner in FORWARD:
        if name in MATMUL:
            return "linear layers"
        if any(a in name for a in ATTENTION):
            return "attention"
        return "norms and elementwise"
    if name in COPIES:
        return "copies between stages"
    return "outside the stages"


def _scopes(event) -> tuple[str, ...]:
    out, e = [], event.cpu_parent
    while e is not None:
        if e.name.startswith("lab::"):
            out.append(e.name)
        e = e.cpu_parent
    return tuple(reversed(out))


def _is_top_level(event) -> bool:
    """An operator not called by another operator (its parents are stage scopes or nothing)."""
    e = event.cpu_parent
    while e is not None:
        if not e.name.startswith("lab::"):
            return False
        e = e.cpu_parent
    return True


def breakdown(events, wall_s: float, method: str) -> tuple[dict[str, float], list]:
    """Seconds per category from the profiler's events of one pruning run
    (``wall_s``: the engine's own clock), and the operators that took longest
    (category, name) -> seconds."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    by_op: dict[tuple[str, str], float] = {}
    covered: dict[int, float] = {}  # per stage scope: microseconds its operators and sub-scopes take
    scopes = []
    for ev in events:
        if ev.name.startswith("lab::"):
            scopes.append(ev)
            parent = ev.cpu_parent
            while parent is not None and not parent.name.startswith("lab::"):
                parent = parent.cpu_parent
            if parent is not None:
                covered[id(parent)] = covered.get(id(parent), 0.0) + ev.time_range.elapsed_us()
            continue
        if not _is_top_level(ev):
            continue
        sc = _scopes(ev)
        if "lab::prune" not in sc:  # before or after the engine's clock (the report's own counts)
            continue
        dur = ev.time_range.elapsed_us()
        cat = category(ev.name, sc, method)
        seconds[cat] += dur / 1e6
        by_op[(cat, ev.name)] = by_op.get((cat, ev.name), 0.0) + dur / 1e6
        if ev.cpu_parent is not None:
            covered[id(ev.cpu_parent)] = covered.get(id(ev.cpu_parent), 0.0) + dur
    root = [s for s in scopes if s.name == "lab::prune"]
    for s in scopes:
        gap = s.time_range.elapsed_us() - covered.get(id(s), 0.0)
        seconds["Python and dispatch"] += max(0.0, gap) / 1e6
    inside = sum(s.time_range.elapsed_us() for s in root) / 1e6
    seconds["outside the stages"] += max(0.0, wall_s - inside)
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return seconds, top


def floors(lm, nsamples: int, seqlen: int, threads: int) -> dict:
    """Floor seconds of the stages that have one, per method: the linear layers,
    attention and the statistics, from :func:`benchmarks.bench_sparsify.compute_floor`."""
    floor = compute_floor(lm, nsamples, seqlen, threads)
    out: dict = {"gflops_per_s": floor["gflops_per_s"]}
    for m in ("wanda", "sparsegpt"):
        out[m] = {"linear layers": floor["linear"], "attention": floor["attention"],
                  "statistics": floor[m] - floor["wanda"], "total": floor[m]}
    return out


def profile_one(dense, method: str, args) -> tuple[pd.DataFrame, dict]:
    lm = copy.copy(dense)
    lm.model = copy.deepcopy(dense.model)
    cfg = engine_config.PruneConfig(method, args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                                    seed=args.seed, dtype=args.dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        report = prune_model(lm, cfg)  # its clock: the stages, not the report after them
    seconds, top = breakdown(prof.events(), report.seconds, method)
    table = pd.DataFrame({"seconds": pd.Series(seconds)})
    table["share"] = table.seconds / report.seconds
    meta = {"wall_s": report.seconds, "cpu_s": report.cpu_seconds, "top": top,
            "cores_idle": 1 - report.cpu_seconds / (report.seconds * torch.get_num_threads())}
    return table, meta


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 160)
    dense = load_model(args.model)
    print(f"bench_profile: {args.model}, {args.sparsity:.0%}, nsamples={args.nsamples}, seqlen={args.seqlen}, "
          f"{args.threads} threads, dtype {args.dtype}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    fl = floors(dense, args.nsamples, args.seqlen, args.threads)
    print(f"best GEMM rate at the model's shapes: {fl['gflops_per_s']:.0f} GFLOP/s", flush=True)
    tables = []
    for method in args.methods:
        table, meta = profile_one(dense, method, args)
        table["floor_s"] = pd.Series(fl[method])
        table["over_floor"] = table.seconds / table.floor_s.where(table.floor_s > 0)
        print(f"\n== {method}: {meta['wall_s']:.1f} s wall under the profiler, {meta['cpu_s']:.1f} CPU s, "
              f"cores idle {meta['cores_idle']:.0%}; floor {fl[method]['total']:.1f} s "
              f"(linear layers + statistics)", flush=True)
        print(table.to_string(float_format=lambda v: f"{v:.3g}"), flush=True)
        print("longest operators: " + "; ".join(f"{name} ({cat}) {s:.2f} s" for (cat, name), s in meta["top"]),
              flush=True)
        tables.append(table.assign(method=method, wall_s=meta["wall_s"], cpu_s=meta["cpu_s"],
                                   cores_idle=meta["cores_idle"]).rename_axis("stage").reset_index())
    out = files.results_dir() / "bench" / "profile.csv"
    with files.atomic_path(out) as tmp:
        pd.concat(tables).to_csv(tmp, index=False)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
