"""Measuring a run: wall and CPU time, interleaved timings, thread pinning, peak memory.

One of each: :func:`num_threads` pins torch's intra-op threads,
:func:`time_calls` times functions interleaved, :class:`Stopwatch` times a
block, :class:`PeakMemory` measures a block's peak resident memory,
:func:`process_usage` this process's time and the machine's load so far.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psutil
import torch

from lab_utils.core.device import synchronize


class Stopwatch:
    """Wall and CPU seconds of a block (CPU time counts every thread of this
    process, so CPU / threads estimates the wall time on an idle machine)."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.load0 = _load_average()
        self.started = dt.datetime.now().astimezone()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        self.load = max(self.load0, _load_average())
        return False

    def row(self, demo: str) -> dict:
        # When and where: a cached row is shown again by later runs, elsewhere perhaps.
        return {"demo": demo, "wall_s": self.wall, "cpu_s": self.cpu,
                "threads": torch.get_num_threads(), "load_average": self.load,
                "measured": self.started.isoformat(timespec="seconds"), "host": platform.node()}


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def process_usage() -> dict:
    """This process so far: ``elapsed_s`` since it started, ``cpu_s`` (user +
    system), and the machine's ``load_average`` (1 minute) and ``cores``."""
    proc = psutil.Process()
    return {"elapsed_s": time.time() - proc.create_time(), "cpu_s": sum(proc.cpu_times()[:2]),
            "load_average": _load_average(), "cores": os.cpu_count()}


# --------------------------------------------------------------------------- threads and timing
@contextlib.contextmanager
def num_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads (None: leave as is).

    ``num_threads(1)`` serves small tensor ops (a fan-out to a second, often
    busy, core costs more than it saves) and ops that several Python threads
    run at once (each then rounds its sums the same way in every run)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 7,
               threads: int | None = None, device: str | torch.device | None = None) -> pd.DataFrame:
    """Seconds per call of each function, one row per (name, repeat): wall
    ``seconds`` and ``cpu_seconds`` (the steadier on a busy machine: it does not
    count the time other processes hold the cores). After ``warmup`` untimed
    rounds, every round runs each function once in an order that rotates, so
    a burst of load hits every candidate alike. On an accelerator (``device``)
    the queued work is waited for before each clock read."""
    names = list(fns)
    sync = (lambda: synchronize(device)) if device is not None else (lambda: None)
    rows = []
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name]()
        for rep in range(repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                sync()
                rows.append({"name": name, "repeat": rep, "seconds": time.perf_counter() - t0,
                             "cpu_seconds": time.process_time() - c0})
    return pd.DataFrame(rows)


def median_seconds(times: pd.DataFrame, column: str = "seconds") -> pd.Series:
    """Median of a :func:`time_calls` column per function, in the order given."""
    return times.groupby("name", sort=False)[column].median()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS: glibc keeps them otherwise, and
    the next model's "before" would include this one's leftovers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Resident memory (RSS) of this process around a block: ``start``,
    ``peak`` while it ran, and ``end``, in bytes.

    On Linux the kernel keeps the high-water mark (VmHWM), reset by writing 5
    to /proc/self/clear_refs: exact, and free while the block runs. A probe
    opened inside another (the pruning engine inside a step that measures a
    whole load-prune-measure cycle) resets the mark, so it first hands the mark
    so far to the probes still open. Elsewhere a thread samples the RSS every
    :attr:`INTERVAL` seconds. Works on CPU, without tracemalloc.
    """

    _open: list[PeakMemory] = []  # probes inside their block, outermost first
    INTERVAL = 0.005

    def __init__(self):
        self.start = self.peak = self.end = 0
        self._stop = threading.Event()
        self._thread = None
        self._hwm = False

    @staticmethod
    def rss() -> int:
        return psutil.Process().memory_info().rss

    @staticmethod
    def _vmhwm() -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024

    @staticmethod
    def _reset_vmhwm() -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def __enter__(self):
        self.start = self.peak = self.rss()
        try:
            mark = self._vmhwm()
            for outer in self._open:
                outer.peak = max(outer.peak, mark)
            self._reset_vmhwm()
            self._hwm = True
        except (OSError, AttributeError):
            self._hwm = False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._open.append(self)
        return self

    def _sample(self):
        while not self._stop.wait(self.INTERVAL):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._open.remove(self)
        self.end = self.rss()
        if self._hwm:
            self.peak = max(self.peak, self._vmhwm(), self.end)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.end)
        return False
