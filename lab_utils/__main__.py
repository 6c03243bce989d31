"""Command line for scripting and checking; each command prints one JSON object.

    python -m lab_utils prune --model smollm2-135m --method wanda --sparsity 0.5 \\
        [--pattern 2:4] [--scope row] [--nsamples 64 --seqlen 512 --seed 0] [--owl] [--out DIR]
    python -m lab_utils perplexity --model PRESET_OR_DIR [--seqlen 512 --windows 64] [--corpus nyt]

``prune`` reuses the checkpoint cache (``from_cache`` says so) and, with
``--out``, also writes a complete model folder that ``perplexity --model DIR``
(or ``load_model(DIR)``) reads. A bad argument prints one line to stderr and
exits with status 2.

The commands import torch and the engine only once the arguments parse: a
typo is answered at once, not after seconds of imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


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
    pr.add_argument("--no-progress", action="store_true")

    pp = sub.add_parser("perplexity", help="decoder perplexity under the lab's protocol")
    pp.add_argument("--model", required=True, help="preset, hub id or folder (decoder-only)")
    pp.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512, "
                    "the context for hub models)")
    pp.add_argument("--windows", type=int, default=64, help="first K non-overlapping windows")
    pp.add_argument("--corpus", default=None, help="nyt (default) or wikitext2 (hub models)")
    pp.add_argument("--no-progress", action="store_true")
    return p


def cmd_prune(a) -> dict:
    from lab_utils.engine import checkpoints  # deferred: see the module docstring

    if a.out:
        checkpoints.check_output_dir(a.out)  # before minutes of pruning, not after
    lm, report = checkpoints.pruned_model(a.model, a.method, a.sparsity, a.pattern, a.scope,
                                          a.nsamples, a.seqlen, a.seed, a.owl, progress=not a.no_progress,
                                          save=True)
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
    lm = load_model(a.model)
    return perplexity.evaluate(lm, a.seqlen, a.windows, a.corpus, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch  # deferred: see the module docstring

    from lab_utils.core.data import DataError
    from lab_utils.core.models import ModelError
    from lab_utils.core.sparsify import SparsityError

    torch.set_num_threads(max(1, int(os.environ.get("LAB_THREADS", os.cpu_count() or 1))))
    try:
        result = cmd_prune(args) if args.command == "prune" else cmd_perplexity(args)
    except (SparsityError, ModelError, DataError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
