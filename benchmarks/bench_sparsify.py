"""Quality and pruning cost of every method, in one table, against the targets.

On smollm2-135m under the lab's perplexity protocol (calibration: nsamples
movie-review windows of seqlen tokens; evaluation: the first K windows of the
NYT editorials), for each method x {50%, 70%, 2:4, 4:8}: perplexity, actual
sparsity, pruning seconds (wall and CPU; model load and evaluation excluded)
and peak resident memory while pruning.

Targets: Wanda under 1 minute and SparseGPT under 2 minutes at 50% on 2
cores; both several times below magnitude pruning in perplexity.

Next to each time the table puts a *compute floor*: the multiply-adds that the
two passes per block of the reference protocol cannot avoid (statistics from
the dense block, then the pruned block's outputs; SparseGPT adds the upper triangle of one X^T X per
distinct layer input), counted with hooks on the model's own layers, plus
attention's two products (Q K^T and A V over the causal lower triangle), over
the best matrix-multiply rate measured on this machine at the model's layer
shapes in the same run. Norms, the softmax, other elementwise work and the mask
math are left out, so the floor is a lower bound: no fp32 implementation of
that protocol runs faster here. Pruned
checkpoints and perplexities are cached (``--fresh`` prunes again), so a rerun
prints the table in seconds; the ``cached`` column says which rows were
measured earlier.

    python -m benchmarks sparsify [-- --methods wanda sparsegpt --configs 0.5 2:4 --fresh]
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import torch

from lab_utils.core import files, measure
from lab_utils.core.evaluation import perplexity, protocols
from lab_utils.core.models import find_layers, transformer_blocks, weight_out_in
from lab_utils.engine import checkpoints
from lab_utils.engine import config as engine_config
from lab_utils.engine.calibration import capture_inputs, slices

WANDA_SECONDS = 60
SPARSEGPT_SECONDS = 120
TIME_TARGETS = {"wanda": WANDA_SECONDS, "sparsegpt": SPARSEGPT_SECONDS}

REFERENCE = protocols.get("reference")  # the evaluation the benchmarks report under


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["random", "magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--configs", nargs="+", default=["0.5", "0.7", "2:4", "4:8"],
                    help="unstructured sparsities and/or N:M patterns")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=REFERENCE.eval_seqlen,
                    help="tokens per calibration sample and per evaluation window")
    ap.add_argument("--windows", type=int, default=REFERENCE.eval_windows,
                    help="evaluation windows K (the reference protocol's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LAB_THREADS", 2)))
    ap.add_argument("--fresh", action="store_true", help="prune again (replacing the cached checkpoint and its seconds)")
    return ap.parse_args(argv)


def config(spec: str) -> tuple[float, str]:
    """'0.5' -> (0.5, unstructured); '2:4' -> (0.5, '2:4')."""
    if ":" in spec:
        n, m = (int(x) for x in spec.split(":"))
        return n / m, spec
    return float(spec), "unstructured"


def block_linears(lm, seqlen: int = 16) -> list[dict]:
    """The linear layers of the first transformer block, in call order, each
    with its shape and the id of the input it reads (q/k/v share one): found by
    running the model once on ``seqlen`` tokens with pre-hooks (the shapes do
    not depend on which tokens)."""
    (_, blocks), *_ = transformer_blocks(lm.model).values()
    calls, keep = [], []

    def hook(name):
        def fn(module, args):
            out_f, in_f = weight_out_in(module).shape  # GPT-2's Conv1D stores in x out
            keep.append(args[0])  # holding the input keeps its id unique
            calls.append({"name": name, "in": int(in_f), "out": int(out_f), "input": id(args[0])})
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in find_layers(blocks[0]).items()]
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.arange(seqlen).remainder(lm.model.config.vocab_size)[None])
    finally:
        for h in handles:
            h.remove()
    return calls


def attention_width(config) -> int:
    """Width of the queries (heads x head size): what Q K^T and A V multiply over."""
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if heads and head_dim:
        return int(heads * head_dim)
    return int(config.hidden_size)


def linear_flops_per_token(linears: list[dict]) -> int:
    """Operations of one token through every layer of ``linears`` (2 per multiply-add)."""
    return sum(2 * c["in"] * c["out"] for c in linears)


def attention_flops_per_token(seqlen: int, attention_width: int) -> int:
    """Q K^T and A V of one causal self-attention, per token of a ``seqlen`` window on
    average: token t meets t + 1 keys and as many values, so a window needs
    2 * width * L (L + 1) operations."""
    return 2 * attention_width * (seqlen + 1)


def calibration_flops(linears: list[dict], n_blocks: int, tokens: int, seqlen: int = 0,
                      attention_width: int = 0) -> dict:
    """Floating-point operations the reference protocol needs for ``tokens``
    calibration tokens (windows of ``seqlen``) through ``n_blocks`` blocks of ``linears``:
    ``linear``: every block's statistics pass (it may stop before the block's
    last layer) plus the outputs pass of all but the last block;
    ``attention``: Q K^T and A V of one causal self-attention of ``attention_width``
    in each of those passes (a lower bound where attention sees the whole window, or
    a second sequence);
    ``wanda``: the two; ``sparsegpt``: the same plus X^T X per distinct input, of which
    symmetry leaves tokens * d * (d + 1) operations (the upper triangle);
    ``reference_wanda`` and ``reference_sparsegpt``: the work of the reference drivers,
    which run every block whole twice (the last layer in the statistics pass and the
    last block's outputs included) and, for SparseGPT, form the whole X^T X of every
    layer, so ``reference_wanda / wanda`` is the most that the lab's skipping can save
    at equal speed on the work both do."""
    per_token = linear_flops_per_token(linears)
    last = linear_flops_per_token(linears[-1:])
    # X^T X is symmetric: the multiply-adds of its upper triangle, d (d + 1) / 2 dot products
    hessian = sum(d * (d + 1) for d in {c["input"]: c["in"] for c in linears}.values())
    attention_per_token = attention_flops_per_token(seqlen, attention_width)
    linear = tokens * (n_blocks * (per_token - last) + (n_blocks - 1) * per_token)
    attention = tokens * (2 * n_blocks - 1) * attention_per_token
    wanda = linear + attention
    reference = tokens * 2 * n_blocks * (per_token + attention_per_token)
    every_hessian = sum(2 * c["in"] * c["in"] for c in linears)
    return {"linear": linear, "attention": attention, "wanda": wanda,
            "sparsegpt": wanda + tokens * n_blocks * hessian, "reference_wanda": reference,
            "reference_sparsegpt": reference + tokens * n_blocks * every_hessian}


def gemm_rate(shapes: list[tuple[int, int]], tokens: int, threads: int, repeats: int = 9) -> float:
    """The best rate (FLOP/s) of ``x @ W.T`` measured over the layer shapes,
    x holding ``tokens`` rows (the driver's chunk): the fastest of ``repeats``
    calls after a warm-up. The fastest, not the median: a floor is what the
    machine can do, and on a shared machine a neighbour only ever slows a
    call down."""
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for out_f, in_f in sorted(set(shapes)):
        x, W = torch.randn(tokens, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
        times = measure.time_calls({"mm": lambda x=x, W=W: torch.nn.functional.linear(x, W)},
                                   warmup=1, repeats=repeats, threads=threads)
        best = max(best, 2 * tokens * in_f * out_f / float(times.seconds.min()))
    return best


def compute_floor(lm, nsamples: int, seqlen: int, threads: int) -> dict:
    """Seconds below which neither calibrated method can prune ``lm`` here, and
    the parts of Wanda's: ``linear`` (the layers' products) and ``attention``."""
    linears = block_linears(lm)
    n_blocks = sum(len(blocks) for _, blocks in transformer_blocks(lm.model).values())
    chunk = max(1, engine_config.BATCH_TOKENS // seqlen) * seqlen
    rate = gemm_rate([(c["out"], c["in"]) for c in linears], min(chunk, nsamples * seqlen), threads)
    flops = calibration_flops(linears, n_blocks, nsamples * seqlen, seqlen, attention_width(lm.model.config))
    return {"gflops_per_s": rate / 1e9, **{f"{m}_tflop": f / 1e12 for m, f in flops.items()},
            **{m: f / rate for m, f in flops.items()}}


def block_forward_floor(lm, seqlen: int, threads: int, repeats: int = 9) -> dict:
    """One transformer block's forward alone, on the inputs the engine gives it on a CPU
    (one slice of :data:`~lab_utils.engine.config.CPU_FORWARD_TOKENS` tokens, windows of
    ``seqlen`` random tokens), against that call's floor: its linear layers and causal
    attention at the best matrix-multiply rate measured at the block's shapes and rows,
    in the same run. Nothing of the engine runs around it, so ``ratio`` is what the
    model's own forward costs over the floor, before any pruning work."""
    model = lm.model
    side, (_, blocks) = next(iter(transformer_blocks(model).items()))  # the side block_linears reads
    windows = max(1, engine_config.CPU_FORWARD_TOKENS // seqlen)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (windows, seqlen), generator=g)
    chunk = slices(capture_inputs(model, blocks[0], [{"inputs": {"input_ids": ids}, "masks": {}}], side)[0])[0]
    block = blocks[len(blocks) // 2]
    times = measure.time_calls({"block": lambda: block(chunk.hidden, *chunk.args, **chunk.kwargs)},
                               warmup=2, repeats=repeats, threads=threads)
    linears = block_linears(lm)
    tokens = windows * seqlen
    rate = gemm_rate([(c["out"], c["in"]) for c in linears], tokens, threads)
    flops = tokens * (linear_flops_per_token(linears)
                      + attention_flops_per_token(seqlen, attention_width(model.config)))
    forward_s = float(times.seconds.min())
    return {"tokens": tokens, "forward_s": forward_s, "floor_s": flops / rate,
            "gflops_per_s": rate / 1e9, "ratio": forward_s / (flops / rate)}


def run_one(args, method: str, sparsity: float, pattern: str) -> dict:
    cfg = engine_config.PruneConfig(method, sparsity, pattern, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    lm, report = checkpoints.pruned_model(args.model, cfg, rebuild=args.fresh)
    ev = perplexity.evaluate(lm, args.seqlen, args.windows, cache_key=report.key)
    return {"method": method, "pattern": pattern, "sparsity": sparsity,
            "actual_sparsity": report.actual_sparsity, "actual_total": report.actual_sparsity_total,
            "nm_ok": report.nm_verified, "perplexity": ev["perplexity"],
            "prune_s": report.seconds, "prune_cpu_s": report.cpu_seconds,
            "peak_rss_gib": report.peak_memory_bytes / 2**30,
            "extra_rss_gib": (report.peak_memory_bytes - report.start_memory_bytes) / 2**30,
            "eval_s": ev["seconds"], "cached": report.from_cache}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 200)
    pd.set_option("display.precision", 3)
    load = os.getloadavg()
    t0 = time.perf_counter()
    print(f"bench_sparsify: {args.model}, nsamples={args.nsamples}, seqlen={args.seqlen}, "
          f"K={args.windows}, {args.threads} threads; load average at start {load[0]:.1f} on "
          f"{os.cpu_count()} cores (a busy machine inflates wall-clock seconds; CPU seconds less)",
          flush=True)
    dense_lm, dense = checkpoints.pruned_model(args.model, engine_config.PruneConfig("magnitude", 0.0))
    dense_ev = perplexity.evaluate(dense_lm, args.seqlen, args.windows, cache_key=dense.key)
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "actual_sparsity": dense.actual_sparsity,
             "actual_total": dense.actual_sparsity_total, "nm_ok": None,
             "perplexity": dense_ev["perplexity"], "prune_s": 0.0, "prune_cpu_s": 0.0,
             "peak_rss_gib": float("nan"), "extra_rss_gib": float("nan"),
             "eval_s": dense_ev["seconds"], "cached": False}]
    print(f"dense perplexity {dense_ev['perplexity']:.2f}", flush=True)
    floor = compute_floor(dense_lm, args.nsamples, args.seqlen, args.threads)
    del dense_lm
    print(f"compute floor: best measured GEMM rate {floor['gflops_per_s']:.0f} GFLOP/s; "
          + "; ".join(f"{m} {floor[m + '_tflop']:.1f} TFLOP -> {floor[m]:.0f} s (target {TIME_TARGETS[m]} s)"
                      for m in TIME_TARGETS), flush=True)
    for spec in args.configs:
        sparsity, pattern = config(spec)
        for method in args.methods:
            row = run_one(args, method, sparsity, pattern)
            rows.append(row)
            print(f"  {method:9s} {spec:>4s}: ppl {row['perplexity']:.2f}, actual "
                  f"{row['actual_sparsity']:.4f}, {row['prune_s']:.1f} s "
                  f"({row['prune_cpu_s']:.1f} CPU s){' cached' if row['cached'] else ''}", flush=True)
    table = pd.DataFrame(rows)
    table["ppl/dense"] = table.perplexity / dense_ev["perplexity"]
    table["target_s"] = table.method.map(TIME_TARGETS)
    table["floor_s"] = table.method.map({m: floor[m] for m in TIME_TARGETS})
    table["prune/floor"] = table.prune_s / table.floor_s
    table["time_ok"] = [None if pd.isna(t) else bool(s < t) for s, t in zip(table.prune_s, table.target_s, strict=True)]
    print("\n== perplexity, actual sparsity, pruning time and peak memory")
    print(table.drop(columns=["target_s"]).to_string(index=False))
    fifty = table[(table.pattern == "unstructured") & (table.sparsity == 0.5)].set_index("method")
    if {"magnitude", "wanda", "sparsegpt"} <= set(fifty.index):
        mag = fifty.loc["magnitude", "perplexity"]
        print("\n== at 50% unstructured: magnitude perplexity over each method's "
              "(target: 'several times below magnitude')")
        for m in ("wanda", "sparsegpt"):
            print(f"  magnitude / {m} = {mag / fifty.loc[m, 'perplexity']:.2f}; "
                  f"prune {fifty.loc[m, 'prune_s']:.1f} s wall, {fifty.loc[m, 'prune_cpu_s']:.1f} CPU s "
                  f"(target < {TIME_TARGETS[m]} s wall; compute floor {floor[m]:.0f} s: the target is "
                  f"{'above' if TIME_TARGETS[m] > floor[m] else 'below'} it)")
    out = files.results_dir() / "bench" / "sparsify.csv"
    with files.atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    load = os.getloadavg()
    print(f"\nwritten {out}; load average at end {load[0]:.1f}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
