"""Independent jobs on Dask: in this process, on a cluster started here, or on one already running.

A batch of jobs is one plain function and a list of keyword-argument dicts; :func:`run_jobs`
returns the results in the order of the jobs, whichever ``executor`` ran them:

- ``"local"`` (the default): a :class:`distributed.LocalCluster` on this machine, one worker
  process per usable core with one thread each, started for the batch (or for a
  ``with open_executor():`` block) and closed on every exit path;
- ``"serial"``: in this process, in turn, on this process's threads (debugging);
- ``"tcp://HOST:PORT"`` or the path of a scheduler file: an existing Dask cluster, started with
  ``dask scheduler`` / ``dask worker`` or by dask-jobqueue. The cache (``LAB_CACHE_DIR``) stays
  the source of truth, so every worker must see the same cache folder as this process:
  :func:`open_executor` checks that with a probe file that each worker writes. Its scheduler
  is best started as the local one is, with ``DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION=1.0``:
  jobs then wait at the scheduler, not behind a long job on a worker, where a cancellation may
  reach them only once that worker is free and has started them.

Faults: a job that raises stops the batch with one :class:`JobError` naming the job (the jobs
not started yet are cancelled); a worker that dies mid-job (killed, out of memory) costs that job
a rerun on another worker, not the batch; an interrupt (a notebook's stop button) cancels what
was submitted. A finished job's result is fetched and released at once, so the death of the
worker that computed it does not make Dask compute it again.

The local cluster starts its workers with multiprocessing's "spawn", which imports the main
module again in each worker: a script that runs jobs needs the ``if __name__ == "__main__":``
guard (notebooks and the lab's own entry points have one).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
from distributed import Client, Future, KilledWorker, LocalCluster, as_completed

from lab_utils.core import files, progress

LOCAL = "local"
SERIAL = "serial"
PROTOCOLS = ("tcp://", "tls://")
ALLOWED_FAILURES = 3  # worker deaths one job may cause before it is a JobError, not a retry
CONNECT_TIMEOUT_S = 5.0  # an unreachable scheduler fails in seconds (Dask's default is 30 s)
WORKERS_TIMEOUT_S = 60.0  # a batch-queue cluster may take a while to get its first worker
PROBE_WAIT_S = 2.0  # network file systems may show another machine's new file a little late
REACH_TIMEOUT_S = 3.0  # a scheduler that listens accepts a connection in milliseconds


class JobError(RuntimeError):
    """A job failed (its function raised, or its worker kept dying); the message names the job."""


class ExecutorError(RuntimeError):
    """The executor cannot run jobs: no scheduler, no workers, or a cache they do not share."""


@dataclass(frozen=True)
class Executor:
    """An open executor, as :func:`open_executor` yields it; ``client`` is None for serial."""

    name: str
    client: Client | None = None


def check_executor(executor: str | os.PathLike) -> str:
    """The executor value, checked: ``"local"``, ``"serial"``, a scheduler address
    (``tcp://HOST:PORT``) or an existing scheduler file. A bad value is a one-line ValueError."""
    value = os.fspath(executor).strip() if isinstance(executor, str | os.PathLike) else ""
    if value in (LOCAL, SERIAL):
        return value
    if value.startswith(PROTOCOLS):
        return _check_address(value)
    if value and Path(value).expanduser().is_file():
        return _check_scheduler_file(Path(value).expanduser())
    raise ValueError(f"executor {executor!r} is none of 'local', 'serial', a scheduler address "
                     f"(tcp://HOST:PORT) or an existing scheduler file (dask scheduler "
                     f"--scheduler-file)")


def _check_address(address: str) -> str:
    host, _, port = address.split("://", 1)[1].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"executor {address!r}: a scheduler address is written tcp://HOST:PORT, "
                         f"e.g. tcp://127.0.0.1:8786")
    return address


def check_reachable(executor: str | os.PathLike, timeout: float = REACH_TIMEOUT_S) -> str:
    """:func:`check_executor`, and for an existing cluster its scheduler answering within
    ``timeout`` seconds, name lookup included: a parameter check's question, asked without a Dask
    client. A Dask scheduler speaks first (its handshake) on a tcp:// connection, so a port that
    accepts and stays silent (a proxy, another service) does not pass; a tls:// one is connected
    to only. Nobody answering there is a one-line ValueError."""
    name = check_executor(executor)
    if name in (LOCAL, SERIAL):
        return name
    address = name if name.startswith(PROTOCOLS) else _check_address(_file_address(name))
    host, _, port = address.split("://", 1)[1].rpartition(":")
    outcome: list[str | None] = []  # None: a scheduler answered; else why not

    def ask() -> None:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
                if address.startswith("tcp://") and not conn.recv(1):
                    raise OSError("it closed the connection without a Dask handshake")
            outcome.append(None)
        except TimeoutError:
            outcome.append(f"no answer within {timeout:g} s")
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)

    probe = threading.Thread(target=ask, daemon=True)  # the name lookup has no timeout of its own
    probe.start()
    probe.join(timeout)
    if outcome == [None]:
        return name
    where = address if address == name else f"{address} (from {name})"
    raise ValueError(f"executor {name!r}: no Dask scheduler answers at {where} "
                     f"({outcome[0] if outcome else f'no answer within {timeout:g} s'}): start it "
                     f"(dask scheduler, or dask-jobqueue) or use executor 'local'")


def _file_address(path: str | os.PathLike) -> str | None:
    """The scheduler address that a scheduler file holds, or None."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        address = json.loads(Path(path).read_text()).get("address")
        return address if isinstance(address, str) else None
    return None


def _check_scheduler_file(path: Path) -> str:
    if _file_address(path) is None:
        raise ValueError(f"executor {str(path)!r} is not a scheduler file: it has no 'address' "
                         f"(dask scheduler --scheduler-file writes one)")
    return str(path)


def accelerator_resources(device: str | None) -> dict[str, float] | None:
    """What a job that runs on ``device`` asks of a cluster's workers: one ``GPU`` for an explicit
    accelerator (``cuda``, ``cuda:N``, ``mps``), nothing for ``cpu`` or ``auto`` (which takes
    whatever the worker has). Workers offer it with ``dask worker --resources GPU=1``."""
    name = str(device or "auto").strip()
    return None if name in ("auto", "cpu") else {"GPU": 1}


def local_workers() -> int:
    """Worker processes for the local cluster: one per core this process may use."""
    if hasattr(os, "sched_getaffinity"):  # honours taskset and container CPU sets
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def open_executor(executor: str | os.PathLike = LOCAL, *, workers: int | None = None,
                  cache_dir: str | os.PathLike | None = None,
                  connect_timeout: float = CONNECT_TIMEOUT_S,
                  workers_timeout: float = WORKERS_TIMEOUT_S,
                  announce: bool = True) -> Iterator[Executor]:
    """Open the executor for one or more batches of :func:`run_jobs`; close what it started.

    ``"local"`` starts a cluster of ``workers`` processes (default: one per usable core) and
    closes it on every exit path, an interrupt included. An existing cluster is connected to
    within ``connect_timeout`` seconds, must have a worker within ``workers_timeout`` seconds,
    and its workers must see ``cache_dir`` (default the lab's cache,
    :func:`lab_utils.core.files.cache_dir`). ``announce`` prints the cluster's dashboard link,
    once, when it has one.
    """
    name = check_executor(executor)
    if name == SERIAL:
        yield Executor(name=name)
        return
    with contextlib.ExitStack() as stack:  # closes the client, then the cluster it started
        if name == LOCAL:
            cluster = stack.enter_context(_local_cluster(workers=workers))
            client = stack.enter_context(Client(cluster, set_as_default=False))
        else:
            client = stack.enter_context(_connect(name, timeout=connect_timeout))
            _wait_for_workers(client, name=name, timeout=workers_timeout)
            check_shared_cache(client, cache_dir=cache_dir or files.cache_dir())
        # Without bokeh the local dashboard is only a page that asks to install it.
        if announce and (name != LOCAL or importlib.util.find_spec("bokeh")):
            _announce_dashboard(client)
        yield Executor(name=name, client=client)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[list]:
    """Hold Ctrl-C (a notebook's stop button) for the block; yields the list of those held.

    Python raises KeyboardInterrupt wherever the main thread is, and in the middle of starting
    or closing a cluster that would leave worker processes that nothing closes any more."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held  # only the main thread receives signals, and may set their handlers
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _local_cluster(workers: int | None) -> Iterator[LocalCluster]:
    """A local cluster, closed on every exit path; an interrupt while it starts or closes takes
    effect once that is done."""
    with _interrupts_held() as interrupted:
        cluster = _start_local_cluster(workers=workers)
    try:
        if interrupted:
            raise KeyboardInterrupt
        yield cluster
    finally:
        with _interrupts_held() as interrupted:
            cluster.close()
        if interrupted:
            raise KeyboardInterrupt


def _start_local_cluster(workers: int | None) -> LocalCluster:
    config = {"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
              # one job per worker at a time, the rest wait at the scheduler: a worker that
              # dies loses only the job it runs, and long jobs do not queue behind each other
              "distributed.scheduler.worker-saturation": 1.0,
              # Dask's nannies set MALLOC_TRIM_THRESHOLD_ in their workers, which switches off
              # glibc's adaptive mmap threshold: every large tensor is then mapped and unmapped
              # anew, and pruning jobs ran about 15% slower than in plain processes. Keep the
              # one-thread settings, drop that one.
              "distributed.nanny.pre-spawn-environ": {
                  k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
                  if k != "MALLOC_TRIM_THRESHOLD_"}}
    with dask.config.set(config):  # the scheduler and the nannies read these when they start
        try:
            return LocalCluster(n_workers=workers or local_workers(), threads_per_worker=1,
                                processes=True, host="127.0.0.1",  # nothing listens off-machine
                                # the scheduler's HTTP server always starts; a free port
                                # keeps two labs on one machine from contending for 8787
                                dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                                # a job may use the memory of the machine, not a 1/n share
                                memory_limit=0)
        except RuntimeError as e:
            raise ExecutorError(f"the local Dask cluster did not start ({e}); from a script, "
                                f"it needs an `if __name__ == '__main__':` guard, as worker "
                                f"processes import the main module again") from e


def _connect(name: str, timeout: float) -> Client:
    is_address = name.startswith(PROTOCOLS)
    where = name if is_address else f"{_file_address(name) or '?'} (from {name})"
    target = {"address": name} if is_address else {"scheduler_file": name}
    try:
        return Client(**target, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError):
        raise ExecutorError(f"no Dask scheduler answers at {where} within {timeout:g} s: start "
                            f"one (dask scheduler, or dask-jobqueue) and give its address or "
                            f"scheduler file, or use executor='local'") from None


def _wait_for_workers(client: Client, name: str, timeout: float) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ExecutorError(f"the Dask scheduler at {name} has no worker after {timeout:g} s: "
                            f"start some (dask worker ADDRESS --nthreads 1)") from None


def _announce_dashboard(client: Client) -> None:
    if "dashboard" in client.scheduler_info().get("services", {}):
        print(f"Dask dashboard: {client.dashboard_link}")


def check_shared_cache(client: Client, cache_dir: str | os.PathLike,
                       wait_s: float = PROBE_WAIT_S) -> None:
    """Every worker writes a probe file into ``cache_dir``; this process must see them all
    (within ``wait_s`` seconds).

    Raises :class:`ExecutorError` in one line otherwise: a cache on a worker's local disk would
    be rebuilt per worker, and this process would not find what the workers wrote.
    """
    folder = Path(cache_dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    written = client.run(_write_probe, str(folder), token)
    try:
        unseen = unseen_probes(folder, written, wait_s=wait_s)
    finally:
        client.run(_remove_probe, str(folder), token)
    if unseen:
        raise ExecutorError(f"LAB_CACHE_DIR must be on storage every worker sees: "
                            f"{len(unseen)} of {len(written)} workers wrote to {folder} where this "
                            f"process does not see it ({'; '.join(unseen[:3])})")


def _probe_name(token: str) -> str:
    return f".executor-probe-{token}-{socket.gethostname()}-{os.getpid()}"


def _write_probe(folder: str, token: str) -> dict:
    """Run on each worker: write a probe file, say its name (or why it could not)."""
    name = _probe_name(token)
    try:
        (Path(folder) / name).write_text(name)
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"name": name}


def _remove_probe(folder: str, token: str) -> None:
    """Run on each worker: remove its own probe file, wherever it landed."""
    (Path(folder) / _probe_name(token)).unlink(missing_ok=True)


def unseen_probes(folder: Path, written: dict[str, dict], wait_s: float) -> list[str]:
    """The workers (``address: what _write_probe said``) whose probe file this process does not
    see in ``folder`` within ``wait_s`` seconds, each with the reason."""
    unseen = {a: w["error"] for a, w in written.items() if "error" in w}
    missing = {a: folder / w["name"] for a, w in written.items() if "name" in w}
    deadline = time.monotonic() + wait_s
    while True:
        missing = {a: p for a, p in missing.items() if not p.exists()}
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    unseen.update({a: f"{p.name} not found here" for a, p in missing.items()})
    return [f"{a}: {why}" for a, why in sorted(unseen.items())]


def resolve_function(func: str | Callable) -> Callable:
    """A job function, given itself or as ``"package.module:function"``."""
    if callable(func):
        return func
    module, _, name = str(func).partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"job function {func!r} is not an importable 'package.module:function' "
                         f"({type(e).__name__}: {e})") from None


def run_jobs(func: str | Callable, jobs: Sequence[dict], executor: str | Executor = LOCAL, *,
             workers: int | None = None, threads: int = 1, describe: Callable[[dict], str] = str,
             desc: str = "jobs", resources: dict[str, float] | None = None) -> list:
    """``func(**job)`` for every job, on ``executor``; the results in the order of ``jobs``.

    ``executor`` is a value for :func:`check_executor` or an :class:`Executor` already open.
    On a cluster each job runs with torch on ``threads`` threads; ``resources`` (e.g.
    ``{"GPU": 1}``) sends jobs only to workers started with them. With the local executor and
    one job, or ``workers=1``, the jobs run here (a cluster would only add its start). A job that
    raises stops the batch: the rest are cancelled and one :class:`JobError` names the job
    (``describe(job)``) and its error. The progress bar (``desc``) and the dashboard link follow
    tqdm's own switch (``TQDM_DISABLE``, which the report runner sets).
    """
    function = resolve_function(func)
    jobs = list(jobs)
    if isinstance(executor, Executor):
        return _run_on(executor, function, jobs, threads=threads, describe=describe, desc=desc,
                       resources=resources)
    name = check_executor(executor)
    if name == SERIAL or (name == LOCAL and (len(jobs) <= 1 or workers == 1)):
        return _run_here(function, jobs, describe=describe, desc=desc)
    with open_executor(name, workers=workers, announce=not progress.QUIET) as opened:
        return _run_on(opened, function, jobs, threads=threads, describe=describe, desc=desc,
                       resources=resources)


def _failure(what: str, error: BaseException) -> str:
    if isinstance(error, KilledWorker):
        return (f"{what} failed: the workers running it kept dying (killed, or out of memory), "
                f"so Dask gave up on it")
    message = str(error).strip().splitlines()
    return f"{what} failed: {type(error).__name__}: {message[0] if message else '(no message)'}"


def _run_here(function: Callable, jobs: list[dict], describe: Callable[[dict], str],
              desc: str) -> list:
    results = []
    for job in progress.tqdm(jobs, desc=desc) if jobs else ():
        try:
            results.append(function(**job))
        except Exception as e:  # the same one error as on a cluster, the traceback chained
            raise JobError(_failure(describe(job), e)) from e
    return results


def _limit_threads(threads: int) -> None:
    """torch on ``threads`` threads in this worker: at once if torch is loaded (a lab job's
    module imports it), else from its start, as OpenMP and MKL read these when they load."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:  # a job without torch does not pay seconds of import for a setting it never uses
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def _run_job(job: dict, function: Callable, threads: int):
    """What a worker runs: one job, with torch on ``threads`` threads and warnings muted."""
    _limit_threads(threads)  # the worker processes share the cores among themselves
    with warnings.catch_warnings():  # the client shows progress; a warning would print per job
        warnings.simplefilter("ignore")
        return function(**job)


def _check_resources(client: Client, resources: dict[str, float] | None) -> None:
    if not resources:
        return
    offered = [w.get("resources", {}) for w in client.scheduler_info()["workers"].values()]
    if not any(all(r.get(k, 0) >= v for k, v in resources.items()) for r in offered):
        wanted = ",".join(f"{k}={v:g}" for k, v in resources.items())
        raise ExecutorError(f"no Dask worker offers {wanted}: start workers with "
                            f"`dask worker ADDRESS --resources {wanted}`")


def _run_on(executor: Executor, function: Callable, jobs: list[dict], threads: int,
            describe: Callable[[dict], str], desc: str, resources: dict[str, float] | None) -> list:
    client = executor.client
    if client is None:
        return _run_here(function, jobs, describe=describe, desc=desc)
    if not jobs:
        return []
    _check_resources(client, resources)
    results: list = [None] * len(jobs)
    pending: dict[str, tuple[int, Future]] = {}
    bar = progress.tqdm(total=len(jobs), desc=f"{desc} ({len(client.nthreads())} workers)")
    name = getattr(function, "__name__", "job")
    try:
        # one call for the batch (the scheduler runs the jobs in this order); an interrupt
        # waits until every submitted job is in ``pending``, where it can be cancelled
        with _interrupts_held() as interrupted:
            futures = client.map(_run_job, jobs, key=[f"{name}-{uuid.uuid4().hex}" for _ in jobs],
                                 resources=resources, function=function, threads=threads)
            pending.update((f.key, (i, f)) for i, f in enumerate(futures))
        if interrupted:
            raise KeyboardInterrupt
        for future in as_completed(futures, loop=client.loop):
            i, _ = pending.pop(future.key)
            if future.status != "finished":
                error = _error_of(future)
                raise JobError(_failure(describe(jobs[i]), error)) from error
            results[i] = future.result()
            future.release()  # a result here needs no copy on a worker that may die
            bar.update(1)
    except BaseException:  # a failed job or an interrupt: no job that has not run starts now
        with contextlib.suppress(Exception):  # a lost scheduler must not hide the first error
            client.cancel([f for _, f in pending.values()])
        raise
    finally:
        bar.close()
    return results


def _error_of(future: Future) -> BaseException:
    if future.status == "cancelled":  # by someone else, or the scheduler went away
        return RuntimeError("it was cancelled on the cluster")
    return future.exception()
