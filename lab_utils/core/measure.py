"""Measuring a run: wall and CPU time, interleaved timings, thread pinning, peak memory."""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch


def single_thread():
    """Run small tensor ops on one thread: for a 576-wide rank-1 update, the
    fan-out to a second (often busy) core costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_each(calls: dict, reps: int = 5, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each zero-argument call, the repetitions
    interleaved (A B C A B C ...) so that a burst of load on a shared machine
    hits every candidate alike. CPU time (all threads of this process) does
    not count the time other processes hold the cores, so it is the steadier
    of the two on a busy machine."""
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for call in calls.values():
            for _ in range(warmup):
                call()
        for _ in range(reps):
            for name, call in calls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {k: {"forward_s": statistics.median(wall[k]), "forward_cpu_s": statistics.median(cpu[k])}
            for k in calls}


class Stopwatch:
    """Wall and CPU seconds of a block (CPU time counts every thread of this
    process, so CPU / threads estimates the wall time on an idle machine)."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.load0 = _load_average()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        self.load = max(self.load0, _load_average())
        return False

    def row(self, demo: str) -> dict:
        return {"demo": demo, "wall_s": self.wall, "cpu_s": self.cpu,
                "threads": torch.get_num_threads(), "load_average": self.load}


def _load_average() -> float:

    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def num_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads (None: leave as is)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 7,
               threads: int | None = None) -> pd.DataFrame:
    """Seconds per call of each function: ``warmup`` untimed rounds, then
    ``repeats`` rounds in which every function runs once, in an order that
    rotates from round to round. One row per (name, repeat)."""
    names = list(fns)
    rows = []
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name]()
        for rep in range(repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[name]()
                rows.append({"name": name, "repeat": rep, "seconds": time.perf_counter() - t0})
    return pd.DataFrame(rows)


def median_seconds(times: pd.DataFrame) -> pd.Series:
    return times.groupby("name", sort=False)["seconds"].median()


class RssPeak:
    """Peak resident memory of this process while the block runs, sampled
    every ``interval`` seconds by a thread (the kernel's high-water mark is
    not used: the pruning engine resets it for its own measurement)."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval = interval
        self.start = self.peak = self.end = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end = self.rss()
        self.peak = max(self.peak, self.end)
        return False


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS: glibc keeps them otherwise, and
    the next model's "before" would include this one's leftovers."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak resident memory (RSS) of this process while the block runs.

    Linux resets the high-water mark when 5 is written to
    /proc/self/clear_refs, and reports it as VmHWM; elsewhere a background
    thread samples the RSS every 20 ms. Works on CPU, without tracemalloc.
    """

    def __init__(self):
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        self._hwm = False

    @staticmethod
    def _rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def _vmhwm() -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024

    def __enter__(self):
        self.start = self._rss()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._vmhwm()
            self._hwm = True
        except (OSError, AttributeError):
            self._hwm = False
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self._hwm:
            self.peak = max(self._vmhwm(), self._rss())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        return False
