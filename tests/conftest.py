import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Before torch starts OpenMP, and inherited by every process the tests start (the smoke report's
# runner, kernels and Dask workers): a thread that waits for work sleeps instead of spinning. Two
# cores hold the smoke report and the tests at once, and a spinning thread takes the core the
# thread it waits for needs (a SmolLM2 forward beside other work: 8.8 s of CPU spinning, 0.75 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from smoke_runs import REPO, outputs  # noqa: E402
from tiny_models import KINDS, save_tiny  # noqa: E402

# Tests never reach for a model hub: a hub lookup fails at once instead of
# retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# One torch thread in the test process: it runs beside the smoke report on two cores, where a
# second OpenMP thread spin-waits for a core (test_zoo: 61 s of CPU on two threads, 13 s on one).
# The smoke report's own processes keep the lab's default (every core).
torch.set_num_threads(int(os.environ.get("LAB_THREADS", "1")))


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
def cluster_cache(external, monkeypatch) -> Path:
    """The cache of the session's Dask cluster (``external``: its workers' LAB_CACHE_DIR),
    emptied, with the real cache's corpora, converted models and synthesized speech linked in,
    and made this test's cache: for a test that needs *a* cluster beside this process, not the
    start and close of a local one (test_executor and test_sweep_executor test those)."""
    import shutil

    from lab_utils.core import files

    real, cache = files.cache_dir(), external.cache_dir
    for entry in cache.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for sub in ("data", "models", "speech"):
        (real / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(real / sub, target_is_directory=True)
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    return cache


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


@pytest.fixture()
def eval_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache for checkpoints and evaluations that still sees the real cache's
    corpora, converted models and synthesized speech (nothing fetched or converted again)."""
    from lab_utils.core import files

    real = files.cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("data", "models", "speech"):
        (real / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(real / sub, target_is_directory=True)
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    return cache


# How much lower the test process's priority is than the smoke report's (0: the same). The
# report is the session's longest chain (cold run, resumed run, second run); the other tests
# fill the cores around it instead of stretching it. LAB_TEST_NICE=0 turns this off.
NICE = int(os.environ.get("LAB_TEST_NICE", "5"))


def _smoke_runs_read(item) -> int:
    """How many runs of the smoke report a test reads: 0, 1 (smoke_report), or 2 (smoke_rerun too)."""
    names = getattr(item, "fixturenames", ())
    return 2 if "smoke_rerun" in names else int("smoke_report" in names)


def pytest_collection_modifyitems(items):
    # The tests that read the smoke report run last: the report runs in the background
    # (_smoke_report_in_the_background) while every other test runs; the second run starts
    # when the first ends, and the tests that read only the first run beside it.
    items.sort(key=_smoke_runs_read)  # stable: the order within each part is kept


@dataclass
class Killed:
    """What the first run of the smoke report left when it was killed in notebook 03's sweep:
    the files that were not whole, its finished checkpoints (name: mtime) and the tables and
    figures it had written (notebooks 01 and 02, and whatever 03 had written)."""
    broken: list[str]
    checkpoints: dict[str, int]
    outputs: dict[str, bytes]


@dataclass
class SmokeRuns:
    """tests/smoke_runs.py, running the smoke report's runs under ``root``."""
    root: Path
    proc: object  # its subprocess.Popen

    def ended(self, name: str) -> dict:
        """How run ``name`` (first, second) ended, once it has: {"returncode": N}."""
        import json
        import time

        path = self.root / f"{name}.json"
        while not path.exists():
            if self.proc.poll() is not None and not path.exists():
                log = (self.root / "runs.log").read_text()
                raise RuntimeError(f"tests/smoke_runs.py ended ({self.proc.returncode}) before the {name} "
                                   f"run did: {log[-2000:]}")
            time.sleep(0.5)
        return json.loads(path.read_text())

    def completed(self, name: str, out: Path):
        """(output root, subprocess.CompletedProcess) of run ``name``, whose outputs are ``out``."""
        import subprocess

        code = self.ended(name)["returncode"]
        return out, subprocess.CompletedProcess(name, code, out.with_suffix(".log").read_text(),
                                                out.with_suffix(".err").read_text())


@pytest.fixture(scope="session", autouse=True)
def _smoke_report_in_the_background(request, tmp_path_factory):
    """Start the smoke report's runs (tests/smoke_runs.py) at the start of the session when a
    selected test reads them, then lower this process's priority (NICE): the cold run takes
    minutes, mostly in its own processes, and the other tests run meanwhile. When a test reads
    the second run (smoke_rerun: tests/test_robust.py), the first run is also killed in
    notebook 03's sweep and resumed, and the second runs notebooks 03 and 04 on the cache the
    first wrote, beside the tests that read the first."""
    import subprocess

    from smoke_runs import kill_family

    reads = max(map(_smoke_runs_read, request.session.items), default=0)
    if not reads:
        yield None
        return
    root = tmp_path_factory.mktemp("smoke")
    with (root / "runs.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("smoke_runs.py")), str(root),
                                 *(["--kill", "--rerun"] if reads == 2 else [])],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if NICE:
        os.nice(NICE)
    try:
        yield SmokeRuns(root, proc)
    finally:  # a run the session did not wait for (a failure, -x) ends with it
        kill_family(proc.pid)


@pytest.fixture(scope="session")
def smoke_report(_smoke_report_in_the_background):
    """One run of every notebook under params/smoke.yaml, shared by the tests
    that check what it produced: (output root, completed process)."""
    runs = _smoke_report_in_the_background
    return runs.completed("first", runs.root / "out")


@pytest.fixture(scope="session")
def smoke_killed(smoke_report, _smoke_report_in_the_background) -> Killed | None:
    """What the first run left when it was killed in notebook 03 (None: it ended before)."""
    import json

    root = _smoke_report_in_the_background.root
    if not (root / "killed.json").exists():
        return None
    killed = json.loads((root / "killed.json").read_text())
    return Killed(killed["broken"], killed["checkpoints"], outputs(root / "killed"))


@pytest.fixture(scope="session")
def smoke_rerun(smoke_report, _smoke_report_in_the_background):
    """A second run of notebooks 03 and 04 that reads the cache the first one wrote:
    (output root, completed process), or None when the first run failed."""
    runs = _smoke_report_in_the_background
    if smoke_report[1].returncode != 0:
        return None
    return runs.completed("second", runs.root / "again")
