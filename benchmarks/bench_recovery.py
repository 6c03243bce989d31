"""Recovery's target, measured: the decoder recovered at notebook 04's recovery settings
(default: Wanda 50% and SparseGPT 2:4, kd) with its default steps, batch, learning rate,
schedule and hidden-state weight, in its default training dtype (bfloat16 on a CPU with
native bfloat16, float32 on one without), scored by the sweep protocol's perplexity: dense,
pruned, recovered, the share of the log-perplexity gap closed (target: at least 40%), the sparsity before and after, and the
seconds of training (target: all of notebook 04's recovery within 5 minutes of a cold
default report on 2 cores).

Checkpoints and evaluations come from the lab's cache when present, as in the report; only
the perplexity is evaluated (the report also scores zero-shot). The machine may be shared:
the load average is printed at the start and at the end.

    python -m benchmarks recovery [-- --model smollm2-135m --steps 16 --lr 3e-4 --schedule constant
                                      --hidden-weight 0 --dtype float32]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lab_utils.experiments import benchmarks, recovery
from lab_utils.presentation import recovery_view
from lab_utils.report import params

NOTEBOOK = "04_benchmarks"
TARGET = 0.40  # the share of the log-perplexity gap each setting should close
OVERRIDES = {"steps": int, "batch_size": int, "seqlen": int, "lr": float, "schedule": str, "hidden_weight": float,
             "dtype": str}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks recovery", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=int(os.environ.get("LAB_THREADS", os.cpu_count() or 1)))
    for name, kind in OVERRIDES.items():  # notebook 04's recovery_* parameters, overridden
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    values = params.defaults(params.declared(NOTEBOOK))
    values.update({f"recovery_{k}": getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    values["recovery_losses"] = values["recovery_losses"][:1]  # the target is the default loss's
    cfg, plan = params.benchmark_config(values), params.recovery_plan(values)
    print(f"threads {args.threads}, load average at start {os.getloadavg()[0]:.1f}; {plan}", flush=True)
    real = benchmarks.benchmarks_for
    benchmarks.benchmarks_for = lambda spec, config=None: real(spec, config)[:1]  # perplexity only
    t0 = time.perf_counter()
    table, _ = recovery.recovery_table([args.model], plan, cfg)
    print(recovery_view.display_table(table, "sweep").to_string(index=False))
    for r in table.itertuples():  # the target, said from the numbers
        verdict = "met" if r.gap_recovered >= TARGET else f"MISSED by {TARGET - r.gap_recovered:.0%}"
        print(f"{r.method} {r.pattern} {r.requested:g}: {r.gap_recovered:.0%} of the log-perplexity gap closed "
              f"in {r.seconds:.0f} s of training ({plan.config(r.loss).dtype}); target {TARGET:.0%}: {verdict}")
    print(f"wall {time.perf_counter() - t0:.0f} s (pruning and evaluation included), "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
