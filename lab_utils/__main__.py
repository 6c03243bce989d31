"""Command line for scripting and checking; each command prints one JSON object.

    python -m lab_utils prune --model smollm2-135m --method wanda --sparsity 0.5 \\
        [--pattern 2:4] [--scope row] [--nsamples 64 --seqlen 512 --seed 0] [--owl] [--out DIR]
    python -m lab_utils perplexity --model PRESET_OR_DIR [--seqlen 512 --windows 64] [--corpus nyt]
    python -m lab_utils sweep --models smollm2-135m --methods wanda sparsegpt --sparsities 0.5 0.7 \\
        [--patterns unstructured 2:4] [--executor local|serial|tcp://HOST:PORT|FILE] [--workers N]
    python -m lab_utils recover --model smollm2-135m --method wanda --sparsity 0.5 [--pattern 2:4] \\
        [--loss kd|next-token|lora] [--steps N --batch-size B --seqlen T --lr LR] [--temperature T] \\
        [--hidden-weight W] [--lora-rank R] [--out DIR]

``prune`` reuses the checkpoint cache (``from_cache`` says so) and, with
``--out``, also writes a complete model folder that ``perplexity --model DIR``
(or ``load_model(DIR)``) reads. ``recover`` prunes the same way, then fine-tunes
the pruned model with its mask kept on its family's training data (distilling
the dense model by default), cached and resumable like a pruned checkpoint; it
prints the run (training loss per step, tokens, seconds, sparsity before and
after). A bad argument prints one line to stderr and exits with status 2.
Progress bars go to stderr; ``TQDM_DISABLE=1`` switches them off (tqdm reads
it itself).

The commands import torch and the engine only once the arguments parse: a
typo is answered at once, not after seconds of imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# plain data, no torch: a typo is still answered at once
from lab_utils.core.evaluation.protocols import PROTOCOLS

REFERENCE = PROTOCOLS["reference"]  # the CLI's perplexity: the lab's reference protocol


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, like every other bad input here
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lab_utils", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("prune", help="prune a model, print the measured sparsity, time and memory")
    pr.add_argument("--model", required=True, help="preset, hub id or folder")
    pr.add_argument("--method", required=True, help="random | magnitude | wanda | sparsegpt")
    pr.add_argument("--sparsity", required=True, type=float, help="fraction of weights zeroed, in [0, 1)")
    pr.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    pr.add_argument("--scope", default=None, help="row | layer | global (magnitude, random), row | layer (wanda)")
    pr.add_argument("--nsamples", type=int, default=64, help="calibration samples")
    pr.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sample")
    pr.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    pr.add_argument("--owl", action="store_true", help="outlier-weighted sparsity per block (OWL)")
    pr.add_argument("--out", default=None, help="also write the pruned model folder here")
    _device_arguments(pr)

    pp = sub.add_parser("perplexity", help="decoder perplexity under the lab's reference protocol "
                        f"({REFERENCE.size()})")
    pp.add_argument("--model", required=True, help="preset, hub id or folder (decoder-only)")
    pp.add_argument("--seqlen", type=int, default=None, help=f"tokens per window (default {REFERENCE.eval_seqlen}, "
                    "the context for hub models)")
    pp.add_argument("--windows", type=int, default=REFERENCE.eval_windows, help="first K non-overlapping windows")
    pp.add_argument("--corpus", default=None, help="nyt (default) or wikitext2 (hub models)")
    _device_arguments(pp)

    sw = sub.add_parser("sweep", help="notebook 03's sparsity sweep (a row per setting) on a Dask executor")
    sw.add_argument("--models", nargs="+", required=True, help="presets, hub ids or folders")
    sw.add_argument("--methods", nargs="+", required=True, help="magnitude | wanda | sparsegpt ...")
    sw.add_argument("--sparsities", nargs="+", type=float, default=[0.5], help="unstructured sparsities")
    sw.add_argument("--patterns", nargs="+", default=["unstructured"], help="unstructured and/or N:M")
    sw.add_argument("--nsamples", type=int, default=16, help="calibration samples")
    sw.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sample")
    sw.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    sw.add_argument("--eval-windows", type=int, default=8, help="perplexity windows (decoders)")
    sw.add_argument("--eval-seqlen", type=int, default=256, help="tokens per perplexity window")
    sw.add_argument("--executor", default="local", help="local | serial | tcp://HOST:PORT | scheduler file")
    sw.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")


    rc = sub.add_parser("recover", help="prune a model (cached), then fine-tune it with its mask kept; "
                        "print the run")
    rc.add_argument("--model", required=True, help="preset, hub id or folder")
    rc.add_argument("--method", required=True, help="random | magnitude | wanda | sparsegpt")
    rc.add_argument("--sparsity", required=True, type=float, help="fraction of weights zeroed, in (0, 1)")
    rc.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    rc.add_argument("--nsamples", type=int, default=64, help="calibration samples of the pruning")
    # unset recovery settings take RecoveryConfig's defaults (one place for them)
    rc.add_argument("--loss", default=None, help="kd (distil the dense model, default) | next-token | lora")
    rc.add_argument("--steps", type=int, default=None, help="optimizer steps")
    rc.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    rc.add_argument("--seqlen", type=int, default=None, help="tokens per training sequence")
    rc.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    rc.add_argument("--temperature", type=float, default=None, help="softmax temperature of the kd loss")
    rc.add_argument("--hidden-weight", type=float, default=None, help="weight of per-block hidden-state "
                    "matching added to kd (0: off)")
    rc.add_argument("--lora-rank", type=int, default=None, help="rank of the LoRA adapters (loss lora)")
    rc.add_argument("--seed", type=int, default=0, help="seed of the calibration draw, the data and the adapters")
    rc.add_argument("--out", default=None, help="also write the recovered model folder here")
    _device_arguments(rc)
    return p


def _device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (auto: a GPU when "
                   "torch sees one)")
    p.add_argument("--dtype", default="auto", help="forward dtype: auto | float32 | bfloat16 | float16 "
                   "(auto: float32 on the CPU, bfloat16 on a GPU)")


def cmd_prune(a) -> dict:
    from lab_utils.engine import checkpoints  # deferred: see the module docstring
    from lab_utils.engine.config import PruneConfig

    if a.out:
        checkpoints.check_output_dir(a.out)  # before minutes of pruning, not after
    cfg = PruneConfig(a.method, a.sparsity, a.pattern, a.scope, a.nsamples, a.seqlen, a.seed, a.owl,
                      device=a.device, dtype=a.dtype)
    lm, report = checkpoints.pruned_model(a.model, cfg, save=True)
    out = report.summary()
    out["output"] = report.checkpoint
    if a.out:
        out["output"] = str(checkpoints.save_pretrained(lm, a.out).resolve())
    return out


def cmd_perplexity(a) -> dict:
    from lab_utils.core.evaluation import perplexity  # deferred: see the module docstring
    from lab_utils.core.models import load_model

    if a.windows is not None and a.windows <= 0:
        raise ValueError(f"--windows must be positive, got {a.windows}")
    if a.seqlen is not None and a.seqlen <= 1:
        raise ValueError(f"--seqlen must be > 1, got {a.seqlen}")
    # the model on the device when it is not the CPU (the default load otherwise, byte for byte)
    lm = load_model(a.model, **({} if a.device == "cpu" and a.dtype in ("auto", "float32") else
                                {"device": a.device, "dtype": a.dtype}))
    return perplexity.evaluate(lm, a.seqlen, a.windows, a.corpus)


def cmd_sweep(a) -> dict:
    from lab_utils.experiments import executor, sweep  # deferred: see the module docstring

    name = executor.check_executor(a.executor)  # a typo fails before the models load
    cfg = sweep.SweepConfig(a.models, a.methods, a.patterns, a.sparsities, a.nsamples, a.seqlen, a.seed,
                            a.eval_windows, a.eval_seqlen)
    # computed afresh (not the notebook's cached step); the checkpoints are cached
    df = sweep.sparsity_sweep.compute(cfg, executor=name, workers=a.workers)
    return {"executor": name, "rows": json.loads(df.to_json(orient="records"))}  # NaN -> null


def cmd_recover(a) -> dict:
    from lab_utils.engine import checkpoints, recover  # deferred: see the module docstring
    from lab_utils.engine.config import PruneConfig
    from lab_utils.experiments import recovery

    if a.out:
        checkpoints.check_output_dir(a.out)  # before minutes of training, not after
    given = {"loss": a.loss, "steps": a.steps, "batch_size": a.batch_size, "seqlen": a.seqlen, "lr": a.lr,
             "temperature": a.temperature, "hidden_weight": a.hidden_weight, "lora_rank": a.lora_rank}
    cfg = recover.RecoveryConfig(**{k: v for k, v in given.items() if v is not None}, seed=a.seed,
                                 device=a.device, dtype=a.dtype)
    prune_cfg = PruneConfig(a.method, a.sparsity, a.pattern, nsamples=a.nsamples, seed=a.seed,
                            device=a.device, dtype=a.dtype)
    task = recovery.task_for(a.model, seed=a.seed)
    if task is None:
        raise ValueError(f"{a.model}: the lab has no recovery task for this model's family (a text "
                         f"encoder-decoder); recover a decoder, an encoder or Whisper")
    if not recovery.supports(task, cfg.loss):
        raise ValueError(f"{a.model}: an encoder predicts no next token; use --loss kd or lora")
    lm, run = recover.recovered_model(a.model, prune_cfg, cfg, task)
    out = dataclasses.asdict(run)
    out["output"] = run.checkpoint
    if a.out:
        out["output"] = str(checkpoints.save_pretrained(lm, a.out).resolve())
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch  # deferred: see the module docstring

    from lab_utils.core.data import DataError
    from lab_utils.core.models import ModelError
    from lab_utils.core.sparsify import SparsityError
    from lab_utils.experiments.executor import ExecutorError, JobError

    torch.set_num_threads(max(1, int(os.environ.get("LAB_THREADS", os.cpu_count() or 1))))
    try:
        if hasattr(args, "device"):  # a device torch does not see: one line, before any work
            from lab_utils.core import device

            found = device.describe(args.device, args.dtype)
            args.device, args.dtype = found["device"], found["dtype"]
        commands = {"prune": cmd_prune, "perplexity": cmd_perplexity, "sweep": cmd_sweep, "recover": cmd_recover}
        result = commands[args.command](args)
    except (SparsityError, ModelError, DataError, ValueError, ExecutorError, JobError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
