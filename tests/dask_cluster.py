"""A Dask cluster started as a user starts one (``dask scheduler`` and ``dask worker`` processes on
127.0.0.1), and what the executor tests look at: the workers' pids, this process's children.

The tests wait on events (a file a job writes, the scheduler's count of running jobs), never on a
clock that a busy machine outruns; the timeouts here only bound a test that hangs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from distributed import Client
from smoke_runs import BACKGROUND

DASK = Path(sys.executable).with_name("dask")  # the venv's CLI, as a user would start a cluster
TESTS = Path(__file__).parent


HUNG_S = 600.0  # a wait this long is a hung test, not a slow machine


def wait_for(condition, timeout: float = HUNG_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread in this process for the block, as on each worker: on some CPUs the
    thread count changes the last bits of a matrix product."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def interrupted_when(condition) -> Iterator[None]:
    """Send SIGINT to this process (the notebook's stop button) once ``condition()`` holds, for
    as long as the block runs: KeyboardInterrupt then rises in the main thread, however long the
    jobs took to start. Nothing is sent once the block has ended."""
    done = threading.Event()

    def send():
        while not done.is_set():
            if condition():
                os.kill(os.getpid(), signal.SIGINT)
                return
            done.wait(0.02)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def connect_timeout(monkeypatch, seconds: float = 0.5) -> float:
    """Make ``seconds`` the connect timeout that ``open_executor`` (and so ``run_jobs`` and the
    sweep) uses by default, for the test: a test of what an unreachable scheduler says need not
    wait out the real bound (test_executor checks that the real one is the default)."""
    from lab_utils.experiments import executor as ex

    monkeypatch.setitem(ex.open_executor.__wrapped__.__kwdefaults__, "connect_timeout", seconds)
    return seconds


def child_processes() -> dict[int, str]:
    """This process's descendants, pid: command line, but multiprocessing's resource tracker
    (started with the first local cluster, it lives as long as this process, by design) and the
    smoke report that runs in the background (conftest), with its kernel and workers."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if BACKGROUND not in p.environ():
                found[p.pid] = " ".join(p.cmdline())
    return {pid: cmd for pid, cmd in found.items() if "resource_tracker" not in cmd}


@dataclass
class External:
    address: str
    scheduler_file: str
    cache_dir: Path  # the workers' LAB_CACHE_DIR

    def worker_pids(self) -> dict[int, dict]:
        """pid: the scheduler's information, for each worker process."""
        with Client(self.address, set_as_default=False, timeout=10) as client:
            pids = client.run(os.getpid)
            info = client.scheduler_info()["workers"]
            # a worker a nanny is restarting may answer before the scheduler lists it
            # (or the other way round): count only the workers both know
            return {pid: info[address] for address, pid in pids.items() if address in info}


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill the cluster's processes and the worker processes their nannies started: a test
    cluster holds nothing that a graceful stop (seconds of timeouts) would save."""
    family = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            family += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    for proc in procs:
        proc.wait()
    psutil.wait_procs(family, timeout=10)


def written(scheduler_file: Path) -> bool:
    """Whether the scheduler has written its file, completely."""
    try:
        return "address" in json.loads(scheduler_file.read_text())
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def external_cluster(folder: Path) -> Iterator[External]:
    """``dask scheduler`` plus two ``dask worker --nthreads 1`` (the first offers ``GPU=1``),
    their cache ``folder/cache``; killed, with their children, on the way out."""
    scheduler_file = folder / "scheduler.json"
    cache = folder / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "LAB_CACHE_DIR": str(cache),
           # the tests' own job functions (tests/executor_jobs.py) go on the cluster's path, as a
           # user's own modules would
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           # as the local cluster: a job waits at the scheduler, not queued on a busy worker,
           # where a cancellation could reach it after the worker is free again
           "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
    with (folder / "cluster.log").open("w") as log:

        def start(*args: str) -> None:
            procs.append(subprocess.Popen([str(DASK), *args], stdout=log, stderr=subprocess.STDOUT,
                                          env=env))

        try:
            start("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                  "127.0.0.1:0", "--scheduler-file", str(scheduler_file))
            wait_for(lambda: written(scheduler_file))
            for extra in (["--resources", "GPU=1"], []):
                start("worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                      "--nthreads", "1", "--no-dashboard", *extra)
            address = json.loads(scheduler_file.read_text())["address"]
            with Client(address, set_as_default=False, timeout=HUNG_S) as client:
                client.wait_for_workers(2, timeout=HUNG_S)
            yield External(address=address, scheduler_file=str(scheduler_file), cache_dir=cache)
        finally:
            stop(procs)
