import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import KINDS, save_tiny  # noqa: E402

# Tests never reach for a model hub: a hub lookup fails at once instead of
# retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(int(os.environ.get("LAB_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny saved models, one per architecture: gpt2, llama, bert, bart, whisper."""
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny(k, root / k) for k in KINDS}


@pytest.fixture(scope="session")
def external(tmp_path_factory):
    """A Dask cluster started as a user starts one (tests/dask_cluster.py), shared by the executor
    tests of the whole session: its start is seconds of process spawns and imports."""
    from dask_cluster import external_cluster

    with external_cluster(tmp_path_factory.mktemp("dask-cluster")) as cluster:
        yield cluster


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder (LAB_CACHE_DIR) for tests of fetching and rebuilding."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _outputs_never_in_the_repo(tmp_path, monkeypatch):
    # Every test writes its figures and tables under its own temporary folder,
    # so running the tests never touches the repository's figs/ or results/.
    monkeypatch.setenv("LAB_OUTPUT_DIR", str(tmp_path / "out"))


@pytest.fixture()
def tmp_output(tmp_path, monkeypatch) -> Path:
    """An empty output root (LAB_OUTPUT_DIR) so tests never touch figs/ or results/."""
    monkeypatch.setenv("LAB_OUTPUT_DIR", str(tmp_path / "out"))
    return tmp_path / "out"


@pytest.fixture()
def cache_with_data(tmp_path, monkeypatch) -> Path:
    """An empty cache for checkpoints, sharing the real cache's corpora (no download)."""
    from lab_utils.core import files

    real = files.cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (real / "data").mkdir(parents=True, exist_ok=True)
    os.symlink(real / "data", cache / "data")
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    return cache


REPO = Path(__file__).resolve().parent.parent
SMOKE_PARAMS = "params/smoke.yaml"
BACKGROUND = "LAB_TEST_BACKGROUND"  # in the environment of the smoke report's processes


def report_command(params: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lab_utils.report", "--params", params, "--no-progress", *extra]


def run_report(out_dir: Path, params: str = SMOKE_PARAMS, *extra: str, timeout: int = 1500,
               cache: Path | None = None):
    """Run the report runner in a subprocess with its outputs under ``out_dir`` (and its cache
    in ``cache``, when given)."""
    import subprocess

    env = dict(os.environ, LAB_OUTPUT_DIR=str(out_dir), **({"LAB_CACHE_DIR": str(cache)} if cache else {}))
    return subprocess.run(report_command(params, *extra), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def smoke_cache(out: Path) -> Path:
    """The cache of the smoke report whose output root is ``out`` (a cold one of its own)."""
    return out.parent / "cache"


def _smoke_runs_read(item) -> int:
    """How many runs of the smoke report a test reads: 0, 1 (smoke_report), or 2 (smoke_rerun too)."""
    names = getattr(item, "fixturenames", ())
    return 2 if "smoke_rerun" in names else int("smoke_report" in names)


def pytest_collection_modifyitems(items):
    # The tests that read the smoke report run last: the report runs in the background
    # (_smoke_report_in_the_background) while every other test runs; the second run starts
    # when the first ends, and the tests that read only the first run beside it.
    items.sort(key=_smoke_runs_read)  # stable: the order within each part is kept


def _kill_family(pid: int) -> None:
    """A process and every process under it (the runner's kernel runs in a session of its own,
    its Dask workers under the kernel)."""
    import contextlib

    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(family, timeout=60)


def _start_smoke_report(out: Path, cache: Path):
    """The smoke report in a process of its own: outputs under ``out``, cache in ``cache``, its
    stdout and stderr in ``out``.log and ``out``.err beside ``out``."""
    import subprocess

    env = dict(os.environ, LAB_OUTPUT_DIR=str(out), LAB_CACHE_DIR=str(cache), **{BACKGROUND: "1"})
    with out.with_suffix(".log").open("w") as stdout, out.with_suffix(".err").open("w") as stderr:
        return subprocess.Popen(report_command(SMOKE_PARAMS), cwd=REPO, env=env, stdout=stdout,
                                stderr=stderr, text=True)


def _finished(proc, out: Path, timeout: int = 1500):
    """Wait for a background run of the smoke report: (output root, completed process)."""
    import subprocess

    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_family(proc.pid)
        raise
    return out, subprocess.CompletedProcess(proc.args, returncode, out.with_suffix(".log").read_text(),
                                            out.with_suffix(".err").read_text())


@pytest.fixture(scope="session", autouse=True)
def _smoke_report_in_the_background(request, tmp_path_factory):
    """Start the smoke report at the start of the session when a selected test reads it: the
    cold run takes minutes, mostly in its own processes, and the other tests run meanwhile.
    It has a cache of its own, so it and the tests never write the same entry. When a test
    reads a second run (smoke_rerun), that one starts on the first one's cache as soon as the
    first has ended well, beside the tests that read the first."""
    import threading

    reads = max(map(_smoke_runs_read, request.session.items), default=0)
    if not reads:
        yield None
        return
    out = tmp_path_factory.mktemp("smoke") / "out"
    smoke_cache(out).mkdir(parents=True)
    first = _start_smoke_report(out, smoke_cache(out))
    again, second = out.parent / "again", []
    ending = threading.Event()

    def rerun():
        if first.wait() == 0 and not ending.is_set():
            second.append(_start_smoke_report(again, smoke_cache(out)))

    starter = threading.Thread(target=rerun, daemon=True)
    if reads == 2:
        starter.start()
    try:
        yield out, first, again, second, starter
    finally:  # a run the session did not wait for (a failure, -x) ends with it
        ending.set()
        _kill_family(first.pid)
        if starter.is_alive():
            starter.join()
        for proc in second:
            _kill_family(proc.pid)


@pytest.fixture(scope="session")
def smoke_report(_smoke_report_in_the_background):
    """One run of every notebook under params/smoke.yaml, shared by the tests
    that check what it produced: (output root, completed process)."""
    out, first, *_ = _smoke_report_in_the_background
    return _finished(first, out)


@pytest.fixture(scope="session")
def smoke_rerun(smoke_report, _smoke_report_in_the_background):
    """A second run of the smoke report that reads the cache the first one wrote:
    (output root, completed process), or None when the first run failed."""
    _, _, again, second, starter = _smoke_report_in_the_background
    starter.join()
    return _finished(second[0], again) if second else None
