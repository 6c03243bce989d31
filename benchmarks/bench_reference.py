"""Fidelity: the lab's Wanda and SparseGPT against the authors' code.

The reference implementations cannot be a dependency of the lab (they are not
packages, and their drivers are written for CUDA and for the Llama layer
signature of older transformers releases), so this benchmark imports their
per-layer classes from a checkout you point it at:

    git clone https://github.com/locuslab/wanda /tmp/wanda
    python -m benchmarks reference -- --wanda /tmp/wanda

From ``<checkout>/lib`` it uses ``layerwrapper.WrappedGPT`` (Wanda's input
norms), ``sparsegpt.SparseGPT`` (the SparseGPT authors' ``fasterprune``, as
vendored by the Wanda repository) and the Wanda score and row-wise mask of
``prune.prune_wanda``, re-typed here in three lines because the repository has
them inline in its driver. The driver around them is the reference one:
calibration samples pushed one at a time through each decoder block, the
block's outputs recomputed after pruning and fed to the next block. Only the
way the first block's inputs are captured differs: transformers 5 passes the
rotary embeddings as ``position_embeddings``, which the reference ``Catcher``
does not record.

Both sides then see the same model, the same calibration windows (the lab's
protocol) and the same evaluation windows. Per method the table gives:

* the pruning seconds of each side, measured back to back in this run (the
  lab prunes a fresh copy: no checkpoint cache), and ``speedup``, reference
  seconds over the lab's (target: at least 1.3);
* the compute floor of the protocol (:func:`benchmarks.bench_sparsify.compute_floor`)
  and ``lab/floor`` (target: at most 1.5);
* before the table, one block's forward alone against its own floor
  (:func:`benchmarks.bench_sparsify.block_forward_floor`): what the model's
  code costs over the floor before either side adds anything;
* the reference code's seconds over the floor of its own work
  (``reference/its_floor``: its drivers run every block whole twice, and
  SparseGPT's form every layer's whole X^T X), and ``work_ratio``, that floor
  over the lab's: the speed-up that skipping work alone gives when both sides
  run the work they share equally fast;
* ``masks_differ``: the fraction of weights pruned by one side and kept by
  the other (the lab sums its statistics over batches of samples, the
  reference code one sample at a time, so the last bits of a score may
  differ);
* the two perplexities and their relative difference (target: within 2%).

Reported apart, where the CPU has native bfloat16 instructions (AMX or
AVX512-BF16, detected by :func:`lab_utils.core.device.cpu_bf16`): the lab
with its calibration forward passes in bfloat16 (statistics and mask math
stay in float32), its speed over float32 and its perplexity difference.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.bench_sparsify import block_forward_floor, compute_floor
from lab_utils.core import data, files
from lab_utils.core.device import cpu_bf16
from lab_utils.core.evaluation import perplexity, protocols
from lab_utils.core.models import load_model, prunable_layers, transformer_blocks
from lab_utils.engine import config
from lab_utils.engine.prune import prune_model

TOLERANCE = 0.02  # perplexity, lab against reference
SPEEDUP_TARGET = 1.3  # reference seconds over the lab's
FLOOR_TARGET = 1.5  # the lab's seconds over the compute floor

REFERENCE = protocols.get("reference")  # the evaluation the benchmarks report under


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wanda", default=os.environ.get("LAB_WANDA_REPO"),
                    help="a checkout of github.com/locuslab/wanda (or set LAB_WANDA_REPO)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=REFERENCE.eval_seqlen,
                    help="tokens per calibration sample and per evaluation window")
    ap.add_argument("--windows", type=int, default=REFERENCE.eval_windows,
                    help="evaluation windows K (the reference protocol's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LAB_THREADS", 2)))
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="leave out the bfloat16 rows (run only where the CPU has native bfloat16)")
    return ap.parse_args(argv)


def reference_modules(checkout: str):
    lib = Path(checkout) / "lib"
    if not (lib / "layerwrapper.py").is_file() or not (lib / "sparsegpt.py").is_file():
        raise SystemExit(f"{checkout}: not a checkout of locuslab/wanda (no lib/layerwrapper.py)")
    sys.path.insert(0, str(lib))
    if not torch.cuda.is_available():
        # fasterprune calls torch.cuda.synchronize() around its timing print; on a CPU it has nothing to wait for
        torch.cuda.synchronize = lambda *a, **k: None
    return importlib.import_module("layerwrapper"), importlib.import_module("sparsegpt")


def block_inputs(model, blocks, calibration: torch.Tensor):
    """The first block's input for every sample and the keyword arguments the
    model passes to its blocks (masks, positions, rotary embeddings)."""
    captured = {"inputs": [], "kwargs": None}

    class Stop(Exception):
        pass

    def hook(_module, args, kwargs):
        captured["inputs"].append(args[0] if args else kwargs["hidden_states"])
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for j in range(calibration.shape[0]):
            try:
                model(calibration[j:j + 1], use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    return captured["inputs"], captured["kwargs"]


@torch.no_grad()
def reference_prune(lm, method: str, sparsity: float, calibration: torch.Tensor, wrapper, sgpt) -> float:
    """Prune ``lm.model`` in place with the reference per-layer code; seconds spent."""
    t0 = time.perf_counter()
    model = lm.model
    blocks = transformer_blocks(model)["decoder"][1]
    inps, kwargs = block_inputs(model, blocks, calibration)
    for block in blocks:
        subset = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        stats = {n: (wrapper.WrappedGPT(m) if method == "wanda" else sgpt.SparseGPT(m)) for n, m in subset.items()}
        handles = [m.register_forward_hook(lambda _m, i, o, s=stats[n]: s.add_batch(i[0].data, o.data))
                   for n, m in subset.items()]
        for x in inps:
            block(x, **kwargs)
        for h in handles:
            h.remove()
        for n, m in subset.items():
            if method == "wanda":
                W = m.weight.data
                score = W.abs() * torch.sqrt(stats[n].scaler_row.reshape(1, -1))
                order = torch.sort(score, dim=-1, stable=True)[1]
                mask = torch.zeros_like(W, dtype=torch.bool)
                mask.scatter_(1, order[:, : int(W.shape[1] * sparsity)], True)
                W[mask] = 0
            else:
                stats[n].fasterprune(sparsity, prune_n=0, prune_m=0, percdamp=0.01, blocksize=128)
                stats[n].free()
        outs = [block(x, **kwargs) for x in inps]
        inps = [o[0] if isinstance(o, tuple) else o for o in outs]
    return time.perf_counter() - t0


def masks_of(model) -> dict[str, torch.Tensor]:
    return {pl.name: pl.weight == 0 for pl in prunable_layers(model)}


def mask_difference(a: dict, b: dict) -> float:
    """Fraction of the prunable weights whose pruned/kept state differs."""
    differ = sum(int((a[n] != b[n]).sum()) for n in a)
    return differ / sum(m.numel() for m in a.values())


def lab_prune(dense, method: str, args, dtype: str = "float32"):
    """The lab's engine on a fresh copy (no checkpoint cache: its seconds are this run's)."""
    lm = copy.copy(dense)
    lm.model = copy.deepcopy(dense.model)
    cfg = config.PruneConfig(method, args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                             seed=args.seed, dtype=dtype)
    report = prune_model(lm, cfg)
    return lm, report


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.wanda:
        print("bench_reference: skipped, it needs a checkout of the reference code: --wanda PATH "
              "(git clone https://github.com/locuslab/wanda) or LAB_WANDA_REPO")
        return 0
    torch.set_num_threads(args.threads)
    wrapper, sgpt = reference_modules(args.wanda)
    dense = load_model(args.model)
    calibration = data.calibration_windows(dense.tokenizer, args.nsamples, args.seqlen, args.seed,
                                           corpus=config.default_calibration(dense))
    print(f"bench_reference: {args.model}, {args.sparsity:.0%}, nsamples={args.nsamples}, seqlen={args.seqlen}, "
          f"K={args.windows}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    floor = compute_floor(dense, args.nsamples, args.seqlen, args.threads)
    print(f"compute floor: {floor['gflops_per_s']:.0f} GFLOP/s best measured GEMM rate; "
          + "; ".join(f"{m} {floor[m]:.1f} s" for m in args.methods), flush=True)
    alone = block_forward_floor(dense, args.seqlen, args.threads)
    print(f"one block's forward alone ({alone['tokens']} tokens, the model's own code, nothing of either "
          f"pruner around it): {alone['forward_s'] * 1e3:.1f} ms against its floor of "
          f"{alone['floor_s'] * 1e3:.1f} ms ({alone['gflops_per_s']:.0f} GFLOP/s): {alone['ratio']:.2f}x",
          flush=True)
    rows = []
    for method in args.methods:
        ref = copy.copy(dense)
        ref.model = copy.deepcopy(dense.model)
        ref_s = reference_prune(ref, method, args.sparsity, calibration, wrapper, sgpt)
        ref_masks = masks_of(ref.model)
        ref_ppl = perplexity.evaluate(ref, args.seqlen, args.windows)["perplexity"]
        del ref
        lab, report = lab_prune(dense, method, args)
        lab_ppl = perplexity.evaluate(lab, args.seqlen, args.windows)["perplexity"]
        rows.append({"method": method, "dtype": "float32", "reference_s": ref_s, "lab_s": report.seconds,
                     "speedup": ref_s / report.seconds, "floor_s": floor[method],
                     "lab/floor": report.seconds / floor[method],
                     "reference/its_floor": ref_s / floor[f"reference_{method}"],
                     "work_ratio": floor[f"reference_{method}"] / floor[method],
                     "masks_differ": mask_difference(masks_of(lab.model), ref_masks),
                     "reference_ppl": ref_ppl, "lab_ppl": lab_ppl, "relative_diff": lab_ppl / ref_ppl - 1,
                     "within_2%": abs(lab_ppl / ref_ppl - 1) <= TOLERANCE})
        del lab
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    table["speed_ok"] = table.speedup >= SPEEDUP_TARGET
    table["floor_ok"] = table["lab/floor"] <= FLOOR_TARGET
    pd.set_option("display.width", 200)
    print(f"\n== the lab against the reference code (targets: speedup >= {SPEEDUP_TARGET}, "
          f"lab/floor <= {FLOOR_TARGET}, perplexity within {TOLERANCE:.0%})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    bf16 = cpu_bf16()
    if args.bf16 and bf16 is None:
        print("\nbfloat16 forward: skipped, this CPU has no native bfloat16 instructions (neither AMX nor "
              "AVX512-BF16): torch would emulate them, slower than float32")
    elif args.bf16:
        extra = []
        for row in rows:
            lab, report = lab_prune(dense, row["method"], args, dtype="bfloat16")
            ppl = perplexity.evaluate(lab, args.seqlen, args.windows)["perplexity"]
            extra.append({"method": row["method"], "dtype": f"bfloat16 ({bf16})", "lab_s": report.seconds,
                          "speedup_over_float32": row["lab_s"] / report.seconds,
                          "speedup_over_reference": row["reference_s"] / report.seconds,
                          "lab_ppl": ppl, "ppl_vs_float32": ppl / row["lab_ppl"] - 1})
            del lab
        print("\n== reported apart: the calibration forward passes in bfloat16 (statistics and masks in float32)")
        print(pd.DataFrame(extra).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    out = files.results_dir() / "bench" / "reference.csv"
    with files.atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    print(f"\nwritten {out}")
    return 0 if table["within_2%"].dropna().all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
