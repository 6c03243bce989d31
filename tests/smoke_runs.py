"""The smoke report's runs for the tests, in a process of their own (tests/conftest.py starts it
at the start of a session that reads the report, before the test process lowers its own
priority: the report is the session's longest chain, the other tests fill the cores around it).

    python tests/smoke_runs.py ROOT [--kill] [--rerun]

* The first run: every notebook under params/smoke.yaml, outputs in ROOT/out, a cold cache of
  its own in ROOT/cache. With ``--kill`` it is killed (runner, kernel and Dask workers at once)
  in notebook 03's sweep once KILL_AFTER checkpoints are finished while others are being
  pruned; what it left is recorded in ROOT/killed.json (files that are not whole, the finished
  checkpoints) and its tables and figures copied to ROOT/killed/; the same command resumes it.
* With ``--rerun``, notebooks 03 and 04 run again on the first run's cache, outputs in
  ROOT/again (01 and 02 already ran twice when the first run was resumed).

Each run's stdout and stderr go to ``<outputs>.log`` / ``.err``; ROOT/first.json and
ROOT/second.json say how each ended ({"returncode": N}) once it has; ROOT/code_version.txt holds
the hash of the sources that enters every cache key, as the runs started.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE_PARAMS = "params/smoke.yaml"
BACKGROUND = "LAB_TEST_BACKGROUND"  # in the environment of the smoke report's processes
SWEEP_NOTEBOOK = "03_sparsification_and_sizes"
RERUN = ("03", "04")
KILL_AFTER = 2  # checkpoints of notebook 03's sweep finished when the first run is killed
PNG_END = b"IEND\xaeB`\x82"
TIMEOUT_S = 1500  # a run this long is a hung run


def report_command(params: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lab_utils.report", "--params", params, "--no-progress", *extra]


def outputs(root: Path) -> dict[str, bytes]:
    """The result tables and figures under an output root, by their path in it."""
    found = [*(root / "results").rglob("*.csv"), *(root / "figs").glob("*.png")]
    return {str(p.relative_to(root)): p.read_bytes() for p in found if not p.name.startswith(".")}


def broken_files(root: Path) -> list[str]:
    """The files a reader can see under ``root`` that are not whole: a CSV that does not parse
    to the end, a PNG without its IEND chunk, a checksummed cache entry or checkpoint that does
    not match its sums. Files inside a temporary of an unfinished write (a name starting with
    a dot) are never read and are swept by the next run."""
    from lab_utils.core import files

    problems = []
    for p in root.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.suffix == ".csv":
            with p.open(newline="") as fh:
                rows = list(csv.reader(fh))
            if not rows or len({len(r) for r in rows}) != 1:
                problems.append(f"ragged CSV {p}")
        elif p.suffix == ".png" and not p.read_bytes().endswith(PNG_END):
            problems.append(f"truncated PNG {p}")
        elif p.name.endswith(".sha256"):
            target = p.with_name(p.name[: -len(".sha256")])
            if files.sha256_file(target) != p.read_text().strip():
                problems.append(f"checksum mismatch {target}")
        elif p.name == "MANIFEST.json" and not files.verify_dir(p.parent):
            problems.append(f"damaged checkpoint {p.parent}")
    return problems


def finished_checkpoints(cache: Path) -> dict[str, int]:
    """The checkpoints renamed into place (a temporary folder starts with a dot): name: mtime."""
    pruned = cache / "pruned"
    if not pruned.exists():
        return {}
    return {d.name: d.stat().st_mtime_ns for d in pruned.iterdir()
            if not d.name.startswith(".") and (d / "MANIFEST.json").is_file()}


def kill_family(pid: int) -> None:
    """A process and every process under it (the runner's kernel runs in a session of its own,
    its Dask workers under the kernel)."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(family, timeout=60)


def settled(root: Path, timeout: float = 60.0) -> None:
    """Wait until nothing under ``root`` changes for a second (nothing should, once the whole
    family of a run is killed: this makes sure)."""
    def snapshot():
        try:
            return sorted((str(p), p.stat().st_size) for p in root.rglob("*"))
        except FileNotFoundError:  # an entry renamed while listing: not settled yet
            return None

    deadline, before = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = snapshot()
        if now is not None and now == before:
            return
        before = now
        time.sleep(1.0)
    raise RuntimeError(f"{root} still changes {timeout:.0f} s after the run was killed")


class Runs:
    def __init__(self, root: Path):
        self.root, self.out, self.again, self.cache = root, root / "out", root / "again", root / "cache"
        self.parent = os.getppid()  # the test session: when it is gone, so are the runs

    def start(self, out: Path, *extra: str) -> subprocess.Popen:
        env = dict(os.environ, LAB_OUTPUT_DIR=str(out), LAB_CACHE_DIR=str(self.cache), **{BACKGROUND: "1"})
        with out.with_suffix(".log").open("w") as stdout, out.with_suffix(".err").open("w") as stderr:
            return subprocess.Popen(report_command(SMOKE_PARAMS, *extra), cwd=REPO, env=env,
                                    stdout=stdout, stderr=stderr)

    def wait(self, proc: subprocess.Popen, until=lambda: False, timeout: float = TIMEOUT_S) -> bool:
        """Wait for ``proc`` to end (True) or ``until()`` to hold (False); a run past ``timeout``
        or a test session that has gone is ended here."""
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if until():
                return False
            if os.getppid() != self.parent or time.monotonic() > deadline:
                kill_family(proc.pid)
                sys.exit(f"ended the smoke report: {'the test session is gone' if os.getppid() != self.parent else 'hung'}")
            time.sleep(0.2)
        return True

    def in_the_sweep(self) -> bool:
        """Whether notebook 03 has finished KILL_AFTER checkpoints (notebooks 01 and 02 build
        some too: those from before 03 started do not count)."""
        if self.before is None and (self.out / "build" / "notebooks" / f"{SWEEP_NOTEBOOK}.ipynb").exists():
            self.before = set(finished_checkpoints(self.cache))
        return self.before is not None and len(set(finished_checkpoints(self.cache)) - self.before) >= KILL_AFTER

    def kill_and_record(self, proc: subprocess.Popen) -> None:
        kill_family(proc.pid)  # runner, kernel and workers: nothing gets to finish a write
        settled(self.out)
        settled(self.cache)
        killed = {"broken": broken_files(self.out) + broken_files(self.cache),
                  "checkpoints": finished_checkpoints(self.cache)}
        for name in outputs(self.out):
            (self.root / "killed" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.out / name, self.root / "killed" / name)
        (self.root / "killed.json").write_text(json.dumps(killed))
        self.out.with_suffix(".log").rename(self.out.with_suffix(".killed.log"))

    def ended(self, name: str, proc: subprocess.Popen) -> None:
        path = self.root / f"{name}.json"
        path.with_suffix(".tmp").write_text(json.dumps({"returncode": proc.returncode}))
        path.with_suffix(".tmp").rename(path)  # whole when a reader sees it

    def run(self, kill: bool, rerun: bool) -> None:
        from lab_utils.core import memo

        self.cache.mkdir(parents=True, exist_ok=True)
        # the hash in every step's cache key: sources edited during the runs move the keys, and
        # the later runs compute again instead of reading what the first wrote
        (self.root / "code_version.txt").write_text(memo.code_version())
        self.before = None
        proc = self.start(self.out)
        if kill and not self.wait(proc, until=self.in_the_sweep):
            self.kill_and_record(proc)
            proc = self.start(self.out)  # the same command resumes it
            self.wait(proc)
        elif not kill:
            self.wait(proc)
        self.ended("first", proc)
        if rerun and proc.returncode == 0:
            second = self.start(self.again, "--only", *RERUN)
            self.wait(second)
            self.ended("second", second)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--rerun", action="store_true")
    args = ap.parse_args()
    Runs(args.root).run(args.kill, args.rerun)


if __name__ == "__main__":
    main()
