"""Jobs on Dask (lab_utils.experiments.executor): serial and an external cluster started here as
processes give the same results (the local cluster's results: test_sweep_executor, whose sweep
runs through the same run_jobs); a killed worker, a failing job, an interrupt, an unreachable
scheduler and a bad executor value each end the way the module promises."""

import inspect
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from dask_cluster import (
    child_processes,
    connect_timeout,
    interrupted_when,
    one_torch_thread,
    wait_for,
)
from distributed import Client
from executor_jobs import attempt, attempt_pids, torch_threads, worker_pid

from lab_utils.experiments import executor as ex

PRUNE = "lab_utils.core.sparsify:sparsegpt_prune"
RATIO = "lab_utils.core.sparsify:check_sparsity_ratio"


# --- helpers --------------------------------------------------------------------------------------

def prune_jobs() -> list[dict]:
    """SparseGPT on tiny layers, unstructured and 2:4: a real lab function, floating point."""
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for prune_n, prune_m in [(0, 0), (2, 4), (0, 0), (2, 4)]:
        X = torch.randn(128, 64, generator=gen)
        jobs.append({"W": torch.randn(16, 64, generator=gen), "H": 2 * X.T @ X / 128,
                     "sparsity_ratio": 0.5, "prune_n": prune_n, "prune_m": prune_m,
                     "blocksize": 32})
    return jobs


# --- same results everywhere ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("where", ["address", "scheduler file"])
def test_every_executor_gives_the_serial_results(where, external, tmp_cache):
    # "local": test_sweep_executor's sweep on a local cluster gives the serial checkpoint bytes
    # and closes it (a local cluster's start is many seconds on a busy machine)
    jobs = prune_jobs()
    with one_torch_thread():
        expected = ex.run_jobs(PRUNE, jobs, executor="serial")
    executor = external.address if where == "address" else external.scheduler_file
    before = child_processes()
    got = ex.run_jobs(PRUNE, jobs, executor=executor, workers=2)
    assert len(got) == len(expected) == 4
    for (W, mask), (W_ref, mask_ref) in zip(got, expected, strict=True):
        assert torch.equal(W, W_ref) and torch.equal(mask, mask_ref)  # bit for bit
        assert float((W == 0).float().mean()) == 0.5  # pruned, not passed through
    assert child_processes() == before  # nothing started here is left
    assert not list(tmp_cache.glob(".executor-probe-*"))  # the cache probe cleaned up after


@pytest.mark.slow
def test_workers_run_torch_on_the_threads_asked_for(external, tmp_cache):
    assert ex.run_jobs(torch_threads, [{}, {}], external.address, threads=2) == [2, 2]
    assert ex.run_jobs(torch_threads, [{}, {}], external.address) == [1, 1]
    here = torch.get_num_threads()
    assert ex.run_jobs(torch_threads, [{}, {}], executor="serial") == [here] * 2


@pytest.mark.slow
def test_jobs_that_ask_for_a_gpu_go_to_the_worker_that_offers_one(external, tmp_cache):
    gpu = {pid for pid, w in external.worker_pids().items() if w["resources"].get("GPU")}
    assert len(gpu) == 1
    assert set(ex.run_jobs(worker_pid, [{}] * 3, external.address, resources={"GPU": 1})) == gpu
    with pytest.raises(ex.ExecutorError, match="no Dask worker offers TPU=1"):
        ex.run_jobs(worker_pid, [{}] * 2, external.address, resources={"TPU": 1})


@pytest.mark.slow
def test_the_dashboard_link_is_printed_once(external, tmp_path, capsys):
    with ex.open_executor(external.address, cache_dir=tmp_path) as opened:
        for _ in range(2):
            assert ex.run_jobs(RATIO, [{"sparsity_ratio": 0.5}] * 2, executor=opened) == [0.5, 0.5]
    out = capsys.readouterr().out
    assert out.count("Dask dashboard: http://127.0.0.1:") == 1


# --- faults ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_worker_costs_a_rerun_on_the_other_worker_not_the_batch(external, tmp_path,
                                                                         tmp_cache):
    jobs = [{"x": x, "folder": str(tmp_path), "hold": (0,)} for x in range(4)]
    workers = external.worker_pids()
    killed = []

    with Client(external.address, set_as_default=False, timeout=10) as client:

        def kill_the_worker_holding_job_0():
            # once it is the only job left, so that the other worker is free to take it at once
            wait_for(lambda: all(attempt_pids(tmp_path, x) for x in range(4))
                     and sum(map(len, client.processing().values())) == 1)
            killed.append(attempt_pids(tmp_path, 0)[0])
            os.kill(killed[0], signal.SIGKILL)

        killer = threading.Thread(target=kill_the_worker_holding_job_0, daemon=True)
        killer.start()
        try:
            results = ex.run_jobs(attempt, jobs, executor=external.address)
        finally:
            (tmp_path / "release").touch()  # on a failure, job 0 must not hold a worker
            killer.join(timeout=10)
    assert results == [{"x": x, "square": x * x} for x in range(4)]
    first, again = attempt_pids(tmp_path, 0)
    assert killed == [first] and first in workers  # a worker that the scheduler knew
    assert again in set(workers) - {first}  # the other one
    assert all(len(attempt_pids(tmp_path, x)) == 1 for x in (1, 2, 3))  # finished: not redone
    wait_for(lambda: len(external.worker_pids()) == 2)  # the nanny restarted it


@pytest.mark.slow
@pytest.mark.parametrize("where", ["serial", "external"])
def test_a_failing_job_is_one_error_naming_it(where, request, tmp_cache):
    executor = "serial" if where == "serial" else request.getfixturevalue("external").address
    jobs = [{"sparsity_ratio": s} for s in (0.5, 1.2, 0.25)]
    with pytest.raises(ex.JobError) as info:
        ex.run_jobs(RATIO, jobs, executor=executor,
                    describe=lambda job: f"ratio {job['sparsity_ratio']}")
    assert str(info.value) == ("ratio 1.2 failed: SparsityError: sparsity 1.2 is outside [0, 1): "
                               "it is the fraction of weights set to zero, e.g. 0.5 for half")
    assert type(info.value.__cause__).__name__ == "SparsityError"  # the original, chained


@pytest.mark.slow
def test_an_interrupt_closes_the_local_cluster_and_leaves_no_process(tmp_path):
    jobs = [{"x": x, "folder": str(tmp_path), "hold": (0, 1)} for x in range(4)]
    before = child_processes()
    during = {}

    def both_held():
        held = all(attempt_pids(tmp_path, x) for x in (0, 1))
        if held:
            during.update(child_processes())
        return held

    try:
        with interrupted_when(both_held), pytest.raises(KeyboardInterrupt):
            ex.run_jobs(attempt, jobs, executor="local", workers=2)
    finally:
        (tmp_path / "release").touch()
    workers = {attempt_pids(tmp_path, 0)[0], attempt_pids(tmp_path, 1)[0]}
    assert workers <= set(during) - set(before)  # the jobs ran in the cluster's processes
    assert not any(psutil.pid_exists(pid) for pid in set(during) - set(before))
    assert child_processes() == before
    assert not any(attempt_pids(tmp_path, x) for x in (2, 3))


@pytest.mark.slow
def test_an_interrupt_while_the_local_cluster_starts_still_closes_it(tmp_path):
    jobs = [{"x": x, "folder": str(tmp_path)} for x in range(2)]
    before = child_processes()
    starting = {}

    def a_worker_process_started():
        starting.update({pid: cmd for pid, cmd in child_processes().items()
                         if pid not in before and "spawn_main" in cmd})
        return bool(starting)

    with interrupted_when(a_worker_process_started), pytest.raises(KeyboardInterrupt):
        ex.run_jobs(attempt, jobs, executor="local", workers=2)
    assert starting and not any(psutil.pid_exists(pid) for pid in starting)
    assert child_processes() == before
    assert not any(attempt_pids(tmp_path, x) for x in range(2))  # it stopped before any job


@pytest.mark.slow
def test_an_interrupt_cancels_the_jobs_on_an_open_cluster(external, tmp_path, tmp_cache):
    jobs = [{"x": x, "folder": str(tmp_path), "hold": (0, 1)} for x in range(6)]
    with ex.open_executor(external.address, announce=False) as opened:
        try:
            with (interrupted_when(lambda: all(attempt_pids(tmp_path, x) for x in (0, 1))),
                  pytest.raises(KeyboardInterrupt)):
                ex.run_jobs(attempt, jobs, executor=opened)
        finally:
            (tmp_path / "release").touch()  # the two held jobs end; the four others must not start
        after = [{"x": 9, "folder": str(tmp_path)}, {"x": 10, "folder": str(tmp_path)}]
        assert ex.run_jobs(attempt, after, executor=opened)[0]["square"] == 81
        wait_for(lambda: not opened.client.futures)  # nothing left submitted
    assert not any(attempt_pids(tmp_path, x) for x in range(2, 6))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line_in_seconds(tmp_cache, monkeypatch):
    # the executor's own bound (CONNECT_TIMEOUT_S), not Dask's 30 s, is what run_jobs uses by
    # default; the connection is then tried with a shorter default, not to wait out 5 s
    assert inspect.signature(ex.open_executor).parameters["connect_timeout"].default == ex.CONNECT_TIMEOUT_S < 30
    seconds = connect_timeout(monkeypatch)
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ex.ExecutorError) as info:
        ex.run_jobs(RATIO, [{"sparsity_ratio": 0.5}] * 2, executor=address)
    # the message names the timeout in force; the clock only tells it from Dask's 30 s
    assert f"within {seconds:g} s" in str(info.value)
    assert time.monotonic() - start < 25
    assert address in str(info.value) and "\n" not in str(info.value)
    assert "executor='local'" in str(info.value)  # says what to do


def test_a_stale_scheduler_file_names_its_address(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    stale = tmp_path / "scheduler.json"
    stale.write_text(json.dumps({"address": address}))
    with pytest.raises(ex.ExecutorError) as info:
        with ex.open_executor(stale, connect_timeout=1, cache_dir=tmp_path):
            pass
    assert str(info.value).startswith(f"no Dask scheduler answers at {address} (from {stale}) "
                                      f"within 1 s: ")


class ElsewhereClient:
    """A client whose one worker writes its probe into another folder than this process's:
    a cache folder that is not shared."""

    def __init__(self, elsewhere: Path):
        self.elsewhere = elsewhere

    def run(self, function, folder, *args):
        return {"tcp://127.0.0.1:1": function(str(self.elsewhere), *args)}


@pytest.mark.slow
def test_a_cache_the_workers_do_not_share_is_one_line(tmp_path):
    (tmp_path / "worker").mkdir()
    with pytest.raises(ex.ExecutorError) as info:
        ex.check_shared_cache(ElsewhereClient(tmp_path / "worker"), cache_dir=tmp_path / "here",
                              wait_s=0.2)
    assert str(info.value).startswith("LAB_CACHE_DIR must be on storage every worker sees: "
                                      "1 of 1 workers wrote to ")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "worker").iterdir())  # the worker removed its probe


# --- executor values ------------------------------------------------------------------------------

def test_good_executor_values_pass(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": "tcp://127.0.0.1:8786"}))
    assert ex.check_executor("local") == "local"
    assert ex.check_executor("serial") == "serial"
    assert ex.check_executor("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    assert ex.check_executor(scheduler_file) == str(scheduler_file)


@pytest.mark.parametrize("value", ["loacl", "", "tcp://127.0.0.1", "tcp://:8786",
                                   "tcp://127.0.0.1:99999", "no/such/scheduler.json", 2, None,
                                   "not-a-scheduler-file"])
def test_a_bad_executor_value_is_one_line(value, tmp_path):
    if value == "not-a-scheduler-file":
        value = tmp_path / "scheduler.json"
        value.write_text("{}")
    with pytest.raises(ValueError) as info:
        ex.check_executor(value)
    assert "\n" not in str(info.value) and "executor" in str(info.value)


def test_a_bad_function_name_fails_before_any_job():
    with pytest.raises(ValueError, match="not an importable 'package.module:function'"):
        ex.run_jobs("lab_utils.core.sparsify:no_such_function", [{}, {}])
