"""Sparse file sizes against their floor, and CSR speed on CPU, measured in one run as tables of ratios.

1. Size: the best lossless format's bytes for the prunable weights over the
   information-theoretic floor, (1-s)*32 + H(s) bits per weight, at every
   sparsity from 50% to 95% (target: <= 1.05). Files are written and measured
   on disk. The floor counts 32 bits per kept value; values with less entropy
   than that (the exponent bits of trained weights, or weights dequantized from
   4-bit blocks as SmolLM2's are) let an entropy coder such as zstd go below it,
   so the best format *without* entropy coding is reported too, and the best
   format against a tighter floor that uses the measured entropy of the kept
   values' sign + exponent bits (mantissas counted as incompressible).
2. Speed: dense vs CSR per layer shape (medians, interleaved), the crossover
   sparsity; whole forward passes of the pruned model, the sparse-aware model
   (CSR only where the measured table says it pays) and the all-CSR model
   (target: sparse-aware / dense >= 0.97 at every sparsity and >= 1.2 at 90%),
   next to the speed-up that counting multiply-adds allows.

    python -m benchmarks.bench_storage [--sparsities 0.5 0.9] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import torch

from lab_utils.core import files
from lab_utils.core.models import load_model
from lab_utils.experiments import file_sizes, speed

LOSSLESS = ["dense", "csr", "bitmask", "dense+zstd", "csr+zstd", "bitmask+zstd"]
FLOOR_TARGET = 1.05
NEVER_SLOWER = 0.97
SPEEDUP_TARGET = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"],
                    help="models for the size target (the speed target uses --speed-model)")
    ap.add_argument("--speed-model", default="smollm2-135m")
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LAB_THREADS", 2)))
    ap.add_argument("--tokens", type=int, default=512, help="tokens per forward / rows of x")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (medians)")
    ap.add_argument("--forward-repeats", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.1, help="CSR only if predicted speed-up >= 1+margin")
    ap.add_argument("--skip-sizes", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    return ap.parse_args(argv)


def size_targets(args) -> pd.DataFrame:
    sizes = file_sizes.size_sweep(file_sizes.SizeConfig(args.models, [args.method], args.sparsities, LOSSLESS))
    best = file_sizes.best_formats(sizes)
    plain = file_sizes.best_formats(sizes[~sizes.zstd])
    table = pd.DataFrame({
        "model": best.label, "sparsity": best.sparsity, "best_format": best.format,
        "bits_per_weight": best.bits_per_weight, "floor_bits": best.floor_bits_per_weight,
        "best/floor": best.floor_ratio, "target<=1.05": best.floor_ratio <= FLOOR_TARGET,
        "best_plain": plain.format, "plain/floor": plain.floor_ratio,
        "best/value_entropy_floor": best.value_entropy_floor_ratio})
    return table


def speed_targets(args) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    shapes = speed.prunable_shapes(load_model(args.speed_model).model)
    layers = speed.layer_speed(shapes, args.sparsities, speed.Timing(args.tokens, 2, args.repeats, args.threads))
    cross = speed.crossover(layers)
    fwd = speed.forward_sweep(args.speed_model, args.method, args.sparsities, layers,
                              speed.Timing(args.tokens, 1, args.forward_repeats, args.threads), margin=args.margin)
    fwd["target"] = [(r.sparse_aware_speedup >= NEVER_SLOWER)
                     and (r.sparsity != 0.9 or r.sparse_aware_speedup >= SPEEDUP_TARGET)
                     for r in fwd.itertuples()]
    return layers, cross, fwd


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 200)
    pd.set_option("display.precision", 3)
    load = os.getloadavg()
    t0 = time.perf_counter()
    print(f"bench_storage: {args.threads} threads, {args.tokens} tokens, load average at start "
          f"{load[0]:.1f} on {os.cpu_count()} cores (a busy machine inflates and scatters timings)")
    out = files.results_dir() / "bench"
    ok = True
    if not args.skip_sizes:
        sizes = size_targets(args)
        print(f"\n== best lossless format / floor ((1-s)*32 + H(s) bits per weight), target <= {FLOOR_TARGET}")
        print(sizes.to_string(index=False))
        with files.atomic_path(out / "storage_floor.csv") as tmp:
            sizes.to_csv(tmp, index=False)
        ok &= bool(sizes["target<=1.05"].all())
    if not args.skip_speed:
        layers, cross, fwd = speed_targets(args)
        print(f"\n== CSR over dense per layer shape ({args.tokens} x in inputs), medians of {args.repeats}")
        print(layers.pivot_table(index="shape", columns="sparsity", values="speedup").to_string())
        print("\n   the same with both transposes (one CSR layer alone in a dense model)")
        print(layers.pivot_table(index="shape", columns="sparsity", values="drop_in_speedup").to_string())
        print("\n== crossover sparsity (CSR faster above it)")
        print(cross[["shape", "crossover_sparsity"]].to_string(index=False))
        print(f"\n== whole forward, {args.speed_model}, speed-up over dense (target: >= {NEVER_SLOWER} "
              f"everywhere, >= {SPEEDUP_TARGET} at 0.9)")
        cols = ["sparsity", "dense_s", "sparse_aware_speedup", "csr_layers", "layers", "checked_speedup",
                "fell_back", "all_csr_speedup", "flop_limit", "unprunable_share", "target"]
        print(fwd[cols].to_string(index=False))
        for name, t in (("speed_layers", layers), ("speed_crossover", cross), ("speed_forward", fwd)):
            with files.atomic_path(out / f"{name}.csv") as tmp:
                t.to_csv(tmp, index=False)
        ok &= bool(fwd.target.all())
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.1f}; {time.perf_counter() - t0:.0f} s; "
          f"targets {'met' if ok else 'NOT all met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
