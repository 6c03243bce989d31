"""Run every ``benchmarks/bench_*.py`` (``main()``), or the ones named.

    python -m benchmarks                 # all of them, in name order
    python -m benchmarks sparsify        # benchmarks/bench_sparsify.py
    python -m benchmarks sparsify -- --methods wanda   # arguments after -- go to it
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    names = [a.removeprefix("bench_").removesuffix(".py") for a in argv] or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"error: no benchmark {unknown[0]!r}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        print(f"=== benchmarks.bench_{name}", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        status |= int(module.main(rest if len(names) == 1 else []) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
