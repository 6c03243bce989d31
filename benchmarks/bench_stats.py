"""Notebook 02's memory and time, measured in one run.

1. Per model (and per pruned model): resident memory of the process while the
   model is loaded, measured and let go, against the size of the model's own
   parameters (target: the increase stays below 2x; each model is loaded once
   beforehand so that the one-time import of its model code is not counted),
   and the seconds of the streaming statistics pass against loading the model.
2. The peak-memory probe itself: nested probes in a fresh process (the
   kernel's high-water mark is per process), each against the block it
   allocated: the inner probe must see its own block, the outer one the
   larger block freed before the inner probe reset the mark.
3. With ``--notebook``: the whole notebook under its default parameters,
   executed by papermill into a temporary output folder: wall time against
   the 3-minute target, and the worst memory ratio it recorded.

The machine may be shared: the load average is printed with every run, and
ratios measured within one run are the numbers to compare.

    python -m benchmarks stats [-- --models minilm-l6 --notebook]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from lab_utils.core import files
from lab_utils.core import measure as core_measure
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments import weight_stats, weights

NOTEBOOK_SECONDS = 180
MEMORY_RATIO = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "whisper-tiny-en", "minilm-l6"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--methods", nargs="*", default=["magnitude"],
                    help="pruned versions measured too (calibrated ones come from the cache if there)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LAB_THREADS", 2)))
    ap.add_argument("--notebook", action="store_true", help="also time the whole notebook 02")
    return ap.parse_args(argv)


def measure(name: str, sparsity: float, method: str | None, dense=None) -> dict:
    t0 = time.perf_counter()
    prune = PruneConfig(method, sparsity) if method else None
    ws = weights.model_stats(name, prune, cache=False, bins=dense.bins if dense else None, reuse=dense)
    total = time.perf_counter() - t0
    i = ws.info
    return {"ws": ws, "model": ws.label, "sparsity": sparsity, "method": method or "",
            "model MiB": i["model_bytes"] / 2 ** 20,
            "increase MiB": (i["rss_peak"] - i["rss_before"]) / 2 ** 20,
            "increase / model": (i["rss_peak"] - i["rss_before"]) / i["model_bytes"],
            "seconds (load+stats)": total}


def stats_seconds(ws: weight_stats.WeightStats, model) -> float:
    t0 = time.perf_counter()
    weight_stats.weight_stats(model, label=ws.label, bins=ws.bins)
    return time.perf_counter() - t0


NESTED_PROBES = """
import torch
from lab_utils.core.measure import PeakMemory
with PeakMemory() as outer:
    block = torch.ones(128 * 2**20 // 4)  # 128 MiB, touched, freed before the inner probe
    block += 1
    del block
    with PeakMemory() as inner:  # resets the kernel's mark: the outer one must keep its own
        small = torch.ones(48 * 2**20 // 4)  # mmap-sized: fresh pages, not reused heap
        small += 1
    del small
print(inner.peak - inner.start, outer.peak - outer.start)
"""


def nested_probes() -> pd.DataFrame:
    """The nested probes' increases against what each block allocated."""
    out = subprocess.run([sys.executable, "-c", NESTED_PROBES], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    inner, outer = (int(v) / 2 ** 20 for v in out)
    return pd.DataFrame([{"probe": "inner", "allocated MiB": 48, "increase MiB": inner,
                          "sees its block": 40 <= inner < 100},
                         {"probe": "outer", "allocated MiB": 128, "increase MiB": outer,
                          "sees its block": outer >= 100}])


def run_notebook(threads: int) -> dict:
    import papermill

    src = files.REPO_ROOT / "notebooks" / "02_visualization.ipynb"
    with tempfile.TemporaryDirectory() as tmp:
        env_before = {k: os.environ.get(k) for k in ("LAB_OUTPUT_DIR", "LAB_THREADS", "LAB_NOTEBOOK")}
        os.environ.update(LAB_OUTPUT_DIR=tmp, LAB_THREADS=str(threads), LAB_NOTEBOOK="bench")
        try:
            t0 = time.perf_counter()
            papermill.execute_notebook(str(src), str(Path(tmp) / "out.ipynb"), cwd=str(files.REPO_ROOT),
                                       progress_bar=False)
            seconds = time.perf_counter() - t0
            memory = pd.read_csv(Path(tmp) / "results" / "weight_stats_memory.csv")
        finally:
            for k, v in env_before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return {"seconds": seconds, "worst increase / model": float(memory["increase / model"].max()),
            "memory": memory}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average at start {os.getloadavg()[0]:.1f}")
    # one throw-away load per family first: the first load of a family also imports its
    # model code (~200 MB, once per process), which is not the model's memory
    from lab_utils.core.models import load_model

    for name in args.models:
        del_me = load_model(name)
        del del_me
    core_measure.release_freed_memory()
    rows = []
    for name in args.models:
        dense = measure(name, 0.0, None)
        rows.append(dense)
        for method in args.methods:
            rows.append(measure(name, args.sparsity, method, dense["ws"]))
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "ws"} for r in rows])
    table["memory target met"] = table["increase / model"] < MEMORY_RATIO
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    # the statistics pass alone against loading, on the dense models
    ratio_rows = []
    for name in args.models:
        t0 = time.perf_counter()
        lm = load_model(name)
        load = time.perf_counter() - t0
        ws = next(r["ws"] for r in rows if r["ws"].info["name"] == name and not r["method"])
        secs = stats_seconds(ws, lm.model)
        n = ws.n
        ratio_rows.append({"model": ws.label, "parameters": n, "load s": load, "stats s": secs,
                           "stats / load": secs / load, "ns per parameter": 1e9 * secs / n})
        del lm
    print(pd.DataFrame(ratio_rows).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    probes = nested_probes()
    print(probes.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    status = int(not table["memory target met"].all() or not probes["sees its block"].all())
    if args.notebook:
        nb = run_notebook(args.threads)
        print(nb["memory"].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        print(f"notebook 02: {nb['seconds']:.0f} s (target {NOTEBOOK_SECONDS} s: "
              f"{'met' if nb['seconds'] < NOTEBOOK_SECONDS else 'missed'}), worst memory increase "
              f"{nb['worst increase / model']:.2f}x the model (target {MEMORY_RATIO:g}x), "
              f"load average at end {os.getloadavg()[0]:.1f}")
        status |= int(nb["seconds"] >= NOTEBOOK_SECONDS or nb["worst increase / model"] >= MEMORY_RATIO)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
