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


def run_report(out_dir: Path, params: str = "params/smoke.yaml", *extra: str, timeout: int = 1500):
    """Run the report runner in a subprocess with its outputs under ``out_dir``."""
    import subprocess

    env = dict(os.environ, LAB_OUTPUT_DIR=str(out_dir))
    return subprocess.run([sys.executable, "-m", "lab_utils.report", "--params", params,
                           "--no-progress", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory):
    """One run of every notebook under params/smoke.yaml, shared by the tests
    that check what it produced: (output root, completed process)."""
    out = tmp_path_factory.mktemp("smoke")
    proc = run_report(out)
    return out, proc
