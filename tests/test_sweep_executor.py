"""Notebook 03's sweep on every executor: serial, the local Dask cluster and an external cluster
started here as processes give the same table and the same checkpoint bytes; a worker killed
while it prunes, a checkpoint write that fails, an interrupt and an unreachable scheduler each end
the way lab_utils.experiments.executor promises."""

import json
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

import dask
import pandas as pd
import psutil
import pytest
from dask_cluster import (
    child_processes,
    connect_timeout,
    interrupted_when,
    one_torch_thread,
    wait_for,
)
from distributed import Client, LocalCluster
from executor_jobs import hook_engine, job_name, prune_pids, unhook_engine

from lab_utils.core import files
from lab_utils.experiments import executor as ex
from lab_utils.experiments import sweep
from lab_utils.report import params

SMALL = dict(nsamples=2, seqlen=16, eval_windows=2, eval_seqlen=16)
METHODS, PATTERNS, SPARSITIES = ["wanda", "sparsegpt"], ["unstructured"], [0.5]
TIMING = ["seconds", "cpu_seconds", "threads", "peak_memory_gib"]  # differ from run to run
REAL_DATA = files.cache_dir() / "data"  # the corpora, shared by symlink: nothing is downloaded


def models(tiny_dirs) -> list[str]:
    return [str(tiny_dirs["gpt2"]), str(tiny_dirs["bert"])]  # decoder-only and encoder-only


def empty_cache(folder: Path) -> Path:
    """``folder`` as a cache holding nothing but the corpora (what a test left there is gone)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name != "data":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if not (folder / "data").exists():
        REAL_DATA.mkdir(parents=True, exist_ok=True)
        os.symlink(REAL_DATA, folder / "data")
    return folder


def checkpoint_bytes(cache: Path) -> dict[str, bytes]:
    """The weights file of every checkpoint in ``cache``, by checkpoint folder name."""
    return {p.parent.name: p.read_bytes() for p in (cache / "pruned").glob("*/pruned.safetensors")}


def run_sweep(tiny_dirs, executor, cache: Path, **kw) -> pd.DataFrame:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_CACHE_DIR", str(cache))
        cfg = sweep.SweepConfig(models(tiny_dirs), METHODS, PATTERNS, SPARSITIES, **SMALL)
        return sweep.sparsity_sweep.compute(cfg, executor=executor, **kw)  # uncached: every run prunes


@pytest.fixture(scope="module")
def serial(tiny_dirs, tmp_path_factory) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """The sweep in this process on one thread, as each worker runs it: (table, checkpoints)."""
    cache = empty_cache(tmp_path_factory.mktemp("serial-cache"))
    with one_torch_thread():
        table = run_sweep(tiny_dirs, "serial", cache)
    return table, checkpoint_bytes(cache)


def same_as_serial(table: pd.DataFrame, cache: Path, serial) -> None:
    expected, checkpoints = serial
    pd.testing.assert_frame_equal(table.drop(columns=TIMING), expected.drop(columns=TIMING),
                                  check_exact=True)
    assert checkpoint_bytes(cache) == checkpoints


# --- the same results everywhere ------------------------------------------------------------------

def test_the_serial_sweep_prunes_both_families(serial):
    table, checkpoints = serial
    pruned = table[table.method != "dense"]
    assert len(table) == 2 + 2 * 2 and set(table.family) == {"decoder-only", "encoder-only"}
    assert (pruned.actual.sub(0.5).abs() < 0.02).all() and not pruned.cached.any()
    assert len(checkpoints) == 4  # wanda and sparsegpt are calibrated: each is checkpointed


@pytest.mark.slow  # worker processes (make test-fast leaves it out)
@pytest.mark.parametrize("where", ["local", "scheduler file"])
def test_every_executor_gives_the_serial_table_and_checkpoint_bytes(where, tiny_dirs, serial,
                                                                     request, tmp_path):
    if where == "local":
        cache, executor = empty_cache(tmp_path / "cache"), "local"
    else:
        cluster = request.getfixturevalue("external")
        cache, executor = empty_cache(cluster.cache_dir), cluster.scheduler_file
    before = child_processes()
    table = run_sweep(tiny_dirs, executor, cache, workers=2)
    assert (table[table.method != "dense"].threads == 1).all()  # built in one-thread workers
    same_as_serial(table, cache, serial)
    assert child_processes() == before  # a local cluster is closed, its workers gone


# --- faults ---------------------------------------------------------------------------------------

@pytest.mark.slow  # worker processes (make test-fast leaves it out)
def test_a_worker_killed_while_it_prunes_costs_a_rerun_not_the_sweep(tiny_dirs, serial, external,
                                                                    tmp_path):
    cache = empty_cache(external.cache_dir)
    last = job_name(models(tiny_dirs)[-1], METHODS[-1], SPARSITIES[0])  # the last job submitted
    workers = set(external.worker_pids())
    killed = []
    with Client(external.address, set_as_default=False, timeout=10) as client:

        def kill_the_worker_pruning_the_last_job():
            # once it is the only job left, so the rerun goes to the other, live worker
            wait_for(lambda: prune_pids(tmp_path, last)
                     and sum(map(len, client.processing().values())) == 1)
            killed.append(prune_pids(tmp_path, last)[0])
            os.kill(killed[0], signal.SIGKILL)

        client.run(hook_engine, str(tmp_path), hold=(last,))
        killer = threading.Thread(target=kill_the_worker_pruning_the_last_job, daemon=True)
        killer.start()
        try:
            table = run_sweep(tiny_dirs, external.address, cache)
        finally:
            (tmp_path / "release").touch()  # on a failure, the held pruning must not hold a worker
            killer.join(timeout=10)
            client.run(unhook_engine)
    same_as_serial(table, cache, serial)
    first, again = prune_pids(tmp_path, last)
    assert killed == [first] and first in workers
    assert again in workers - {first}  # the other worker pruned it again
    pruned = [job_name(m, meth, s) for m in models(tiny_dirs) for meth in METHODS for s in SPARSITIES]
    assert all(len(prune_pids(tmp_path, name)) == 1 for name in pruned if name != last)  # not redone
    wait_for(lambda: len(external.worker_pids()) == 2)  # the nanny restarted it


@pytest.mark.slow  # worker processes (make test-fast leaves it out)
def test_a_failing_job_is_one_error_and_leaves_no_half_written_checkpoint(tiny_dirs, external,
                                                                         tmp_path):
    cache = empty_cache(external.cache_dir)
    failing = job_name(models(tiny_dirs)[0], "sparsegpt", 0.5)
    with Client(external.address, set_as_default=False, timeout=10) as client:
        client.run(hook_engine, str(tmp_path), fail_write=(failing,))
        try:
            with pytest.raises(ex.JobError) as info:
                run_sweep(tiny_dirs, external.address, cache)
        finally:
            client.run(unhook_engine)
    assert str(info.value) == (f"pruning {models(tiny_dirs)[0]} (sparsegpt, unstructured, 0.5) "
                               f"failed: OSError: [Errno 28] No space left on device")
    assert prune_pids(tmp_path, failing)  # it did get as far as writing
    failed_slug = Path(models(tiny_dirs)[0]).name + "-sparsegpt"
    assert not [p for p in (cache / "pruned").iterdir() if ".tmp" in p.name and failed_slug in p.name]
    # a job the other worker had started when the error came runs to its end (Dask does not
    # stop a running task): its temporary folder must become a whole checkpoint, not stay
    wait_for(lambda: not [p for p in (cache / "pruned").iterdir() if ".tmp" in p.name])
    entries = list((cache / "pruned").iterdir())
    assert all(files.verify_dir(p) for p in entries)  # what is there is whole
    assert not [p for p in entries if p.name.startswith(Path(models(tiny_dirs)[0]).name + "-sparsegpt")]


@pytest.mark.slow  # worker processes (make test-fast leaves it out)
def test_an_interrupt_cancels_the_sweep_and_closes_the_local_cluster(tiny_dirs, tmp_path,
                                                                    monkeypatch):
    cache = empty_cache(tmp_path / "cache")
    pruned = [job_name(m, meth, s) for m in models(tiny_dirs) for meth in METHODS for s in SPARSITIES]
    # every pruning waits (for a release that never comes): two of them hold the two workers
    monkeypatch.setenv("EXECUTOR_JOBS_HOOK", json.dumps({"folder": str(tmp_path), "hold": pruned}))
    before, during = child_processes(), {}

    def two_prunings_held():
        held = sum(bool(prune_pids(tmp_path, name)) for name in pruned) == 2
        if held:
            during.update(child_processes())
        return held

    # hooked from the start; the notebook's stop button once two prunings are held
    with (dask.config.set({"distributed.worker.preload": ["executor_jobs"]}),
          interrupted_when(two_prunings_held), pytest.raises(KeyboardInterrupt)):
        run_sweep(tiny_dirs, "local", cache, workers=2)
    started = set(during) - set(before)
    assert started and not any(psutil.pid_exists(pid) for pid in started)  # no stray process
    assert child_processes() == before
    assert sum(bool(prune_pids(tmp_path, name)) for name in pruned) == 2  # the rest never started
    assert not list((cache / "pruned").glob("*/pruned.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_in_seconds(tiny_dirs, tmp_path, monkeypatch):
    seconds = connect_timeout(monkeypatch)  # not the 5 s default: test_executor checks that one
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ex.ExecutorError) as info:
        run_sweep(tiny_dirs, address, empty_cache(tmp_path / "cache"))
    # the executor's own connect timeout, not Dask's 30 s
    assert str(info.value).startswith(f"no Dask scheduler answers at {address} within {seconds:g} s")
    assert "\n" not in str(info.value)


def test_the_command_line_sweep_says_so_in_one_line(tiny_dirs, tmp_path, monkeypatch, capsys):
    # the entry point in this process (test_cli starts it in a fresh interpreter)
    import torch

    from lab_utils.__main__ import main

    seconds = connect_timeout(monkeypatch)
    address = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LAB_CACHE_DIR", str(empty_cache(tmp_path / "cache")))
    monkeypatch.setenv("LAB_THREADS", str(torch.get_num_threads()))  # main sets torch's threads
    code = main(["sweep", "--models", *models(tiny_dirs), "--methods", "wanda", "--executor", address])
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert err.startswith(f"error: no Dask scheduler answers at {address} within {seconds:g} s")
    assert err.count("\n") == 1


# --- the parameter --------------------------------------------------------------------------------

def test_the_executor_parameter_is_declared_and_checked():
    for notebook in ("03_sparsification_and_sizes", "04_benchmarks"):
        assert params.declared(notebook)["executor"]["default"] == '"local"'
    params.validate_value("executor", "serial")
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:  # an address passes where a scheduler answers
        params.validate_value("executor", cluster.scheduler_address)  # (test_report: where none does)
    with pytest.raises(params.ParamError, match="executor 'loacl' is none of 'local', 'serial'"):
        params.validate_value("executor", "loacl")


def test_a_job_on_an_accelerator_asks_the_workers_for_a_gpu():
    assert ex.accelerator_resources("cuda") == ex.accelerator_resources("cuda:1") == {"GPU": 1}
    assert ex.accelerator_resources("mps") == {"GPU": 1}
    assert ex.accelerator_resources("cpu") is ex.accelerator_resources("auto") is None
    assert ex.accelerator_resources(None) is None
