"""Jobs side by side in worker processes (lab_utils.experiments.jobs)."""

import pytest

from lab_utils.experiments import jobs as workers

RATIO = "lab_utils.core.sparsify:check_sparsity_ratio"


@pytest.mark.parametrize("n_workers", [1, 2])
def test_results_come_back_in_the_order_of_the_jobs(n_workers):
    jobs = [{"sparsity_ratio": s} for s in (0.5, 0.25, 0.0, 0.75, 0.125)]
    assert workers.run_side_by_side(RATIO, jobs, workers=n_workers, progress=False) == [0.5, 0.25, 0.0, 0.75, 0.125]
    assert workers.run_side_by_side(RATIO, [], workers=n_workers, progress=False) == []


def test_a_failed_job_is_one_error_naming_it():
    jobs = [{"sparsity_ratio": 0.5}, {"sparsity_ratio": 1.2}, {"sparsity_ratio": 0.25}]
    with pytest.raises(workers.WorkerError, match=r"ratio 1.2 in a worker process failed: SparsityError: .*1\.2"):
        workers.run_side_by_side(RATIO, jobs, workers=2, progress=False,
                                 describe=lambda j: f"ratio {j['sparsity_ratio']}")


def test_only_functions_of_the_package_run():
    with pytest.raises(workers.WorkerError, match="lab_utils only"):
        workers.run_side_by_side("os:system", [{"command": "true"}] * 2, workers=2, progress=False)


def test_an_interrupt_stops_the_workers(monkeypatch):
    import signal
    import subprocess
    import threading

    started = []
    real_popen = subprocess.Popen

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        return started[-1]

    def interrupted_join(self, timeout=None):  # the notebook's stop button, once both workers run
        import time

        deadline = time.time() + 60
        while len(started) < 2 and time.time() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(threading.Thread, "join", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        workers.run_side_by_side(RATIO, [{"sparsity_ratio": 0.5}] * 50, workers=2, progress=False)
    monkeypatch.undo()
    assert len(started) == 2
    for proc in started:
        assert proc.wait(timeout=30) == -signal.SIGKILL  # killed, not left working through the queue
