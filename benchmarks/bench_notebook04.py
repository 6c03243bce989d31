"""Notebook 04 cold and cached, measured in one run and printed as a table.

Runs ``notebooks/04_benchmarks.ipynb`` through the report runner twice on the
same parameters:

1. *cold*: a fresh cache that shares only the converted models and the
   downloaded corpus (so pruning, speech synthesis, every evaluation, size
   and timing is computed);
2. *cached*: the same cache again (everything is read back).

Targets on 2 cores: cold < 12 minutes, cached < 1 minute. The CPU time of the
runner and its kernel is printed next to the wall time, with the load average:
on a shared machine the wall time says more about the neighbours than about
the notebook. Then the slowest cells of the cold run, and the evaluation
seconds per model and benchmark (from ``results/benchmarks.csv``).

    python -m benchmarks notebook04 [-- --params params/default.yaml --keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from lab_utils.core import files

COLD_TARGET_S = 12 * 60
CACHED_TARGET_S = 60


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LAB_THREADS", 2)))
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache and outputs")
    return ap.parse_args(argv)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(params: str, cache: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ, LAB_CACHE_DIR=str(cache), LAB_OUTPUT_DIR=str(out), LAB_THREADS=str(threads))
    cpu0, t0, load0 = _children_cpu(), time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-m", "lab_utils.report", "--params", params, "--only", "04",
                           "--no-progress", "--timeout", "7200"], cwd=files.REPO_ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return {"wall_s": wall, "cpu_s": _children_cpu() - cpu0, "load_avg": (load0 + os.getloadavg()[0]) / 2,
            "ok": proc.returncode == 0}


def slowest_cells(out: Path, n: int = 6) -> pd.DataFrame:
    nb = json.loads((out / "build" / "notebooks" / "04_benchmarks.ipynb").read_text())
    rows = [{"seconds": (c["metadata"].get("papermill") or {}).get("duration") or 0.0,
             "cell": " | ".join("".join(c["source"]).splitlines())[:70]}
            for c in nb["cells"] if c["cell_type"] == "code"]
    return pd.DataFrame(rows).sort_values("seconds", ascending=False).head(n)


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench04-"))
    cache, out = tmp / "cache", tmp / "out"
    cache.mkdir()
    real = files.cache_dir()
    for sub in ("data", "models"):  # converted models and the corpus belong to the setup
        (real / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(real / sub, target_is_directory=True)
    try:
        rows = []
        for run, target in (("cold", COLD_TARGET_S), ("cached", CACHED_TARGET_S)):
            r = run_once(args.params, cache, out, args.threads)
            rows.append({"run": run, **r, "target_s": target,
                         "wall/target": r["wall_s"] / target, "met": r["ok"] and r["wall_s"] < target})
            if run == "cold" and r["ok"]:
                cold_cells = slowest_cells(out)
        table = pd.DataFrame(rows)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        if rows[0]["ok"]:
            print("\nslowest cells of the cold run:")
            print(cold_cells.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
            df = pd.read_csv(out / "results" / "benchmarks.csv")
            per = (df.drop_duplicates(["model", "key", "benchmark"])
                   .groupby(["model", "benchmark"]).agg(settings=("key", "size"), eval_s=("seconds", "sum")))
            prune_s = df.drop_duplicates(["model", "key"]).groupby("model").prune_seconds.sum()
            print("\nevaluation seconds (cold run) and pruning seconds per model:")
            print(per.join(prune_s, on="model").to_string(float_format=lambda v: f"{v:.1f}"))
        return 0 if all(r["ok"] for r in rows) else 1
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
