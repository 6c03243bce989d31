"""Independent jobs side by side, in worker processes on one thread each.

Much of what a sweep does runs on one core whatever torch's thread count:
SparseGPT's column-by-column updates, numpy and zstd while a file is written,
Python between small tensor ops. On the 2-core machines this lab is sized
for, two such jobs side by side, each on one thread, finish sooner than the
same two one after the other on two threads. :func:`run_side_by_side` does
that for jobs that write their result into the cache (a checkpoint, a size
row): the caller then reads the cache as if it had computed them itself.

A worker is ``python -m lab_utils.experiments.jobs THREADS``: it reads one job per
line on stdin (``{"func": "lab_utils.module:function", "kwargs": {...}}``) and
answers one line on stdout (``{"result": ...}`` or ``{"error": ...}``). Plain
processes rather than :mod:`multiprocessing`, whose "spawn" start re-runs the
caller's main script in every worker (a script without a ``__main__`` guard
would start the sweep again). Only functions of this package are run.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence

WORKERS = 2  # one per core of the 2-core machines this lab is sized for


class WorkerError(RuntimeError):
    """A job failed in a worker (or the worker died); the message names the job."""


def _function(path: str) -> Callable:
    module, _, name = path.partition(":")
    if not module.startswith("lab_utils.") or not name:
        raise WorkerError(f"a worker runs functions of lab_utils only, as 'lab_utils.module:function'; got {path!r}")
    return getattr(importlib.import_module(module), name)


def run_side_by_side(func: str, jobs: Sequence[dict], workers: int = WORKERS, threads: int = 1,
                     describe: Callable[[dict], str] = str, progress: bool = True,
                     desc: str = "jobs") -> list:
    """``func(**job)`` for every job, ``workers`` at a time in worker processes
    on ``threads`` threads each; returns the results in the order of ``jobs``.

    With one job, or ``workers`` <= 1, the jobs run here, in turn, on this
    process's threads. If a job fails, the other workers finish the job they
    hold and take no new one; one :class:`WorkerError` then names the failed
    job (``describe(job)``) and its error.
    """
    from tqdm.auto import tqdm

    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        f = _function(func)
        return [f(**job) for job in tqdm(jobs, desc=desc, disable=not progress or not jobs)]
    _function(func)  # a bad name fails here, before any process starts
    pending: queue.Queue = queue.Queue()
    for i, job in enumerate(jobs):
        pending.put((i, job))
    results: list = [None] * len(jobs)
    failures: list[str] = []
    bar = tqdm(total=len(jobs), desc=f"{desc} ({workers} side by side)", disable=not progress)

    procs: list[subprocess.Popen] = []

    def lane():
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lab_utils.experiments.jobs", str(threads)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
            procs.append(proc)
            try:
                while not failures:
                    try:
                        i, job = pending.get_nowait()
                    except queue.Empty:
                        break
                    proc.stdin.write(json.dumps({"func": func, "kwargs": job}) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    if not line:  # killed (out of memory, say): its last words are in the log
                        log.seek(0)
                        tail = log.read().strip().splitlines()[-1:] or [f"exit code {proc.wait()}"]
                        failures.append(f"{describe(job)} in a worker process died: {tail[0]}")
                        break
                    answer = json.loads(line)
                    if "error" in answer:
                        failures.append(f"{describe(job)} in a worker process failed: {answer['error']}")
                        break
                    results[i] = answer["result"]
                    bar.update(1)
            finally:
                proc.stdin.close()
                proc.wait()

    lanes = [threading.Thread(target=lane, daemon=True) for _ in range(min(workers, len(jobs)))]
    for t in lanes:
        t.start()
    try:
        for t in lanes:
            t.join()
    except BaseException:  # interrupted (a notebook's stop button): no lane takes another job
        failures.append("interrupted")
        for proc in procs:
            proc.kill()
        raise
    finally:
        bar.close()
    if failures:
        raise WorkerError(failures[0])
    return results


def serve(threads: int) -> None:
    """The worker's loop: one JSON job per line in, one JSON answer per line out."""
    import warnings

    import torch

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints goes to the log, not into the answers
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")  # the parent shows the progress
    torch.set_num_threads(threads)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            answer = {"result": _function(job["func"])(**job["kwargs"])}
        except Exception as e:  # the parent raises it, naming the job
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
