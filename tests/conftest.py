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


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder (LAB_CACHE_DIR) for tests of fetching and rebuilding."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def tmp_output(tmp_path, monkeypatch) -> Path:
    """An empty output root (LAB_OUTPUT_DIR) so tests never touch figs/ or results/."""
    monkeypatch.setenv("LAB_OUTPUT_DIR", str(tmp_path / "out"))
    return tmp_path / "out"
