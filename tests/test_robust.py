"""The report run is reproducible and survives being killed.

* Two runs with the same parameters give byte-identical result tables and
  figures (the second reads the cache the first wrote).
* A run killed in the middle of notebook 03 leaves no half-written file, and
  the next run resumes from the cache without redoing finished work.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMOKE_PARAMS

# Both run the smoke report (make test-fast leaves them out).
pytestmark = pytest.mark.slow

PNG_END = b"IEND\xaeB`\x82"
NOTEBOOK = "03_sparsification_and_sizes"


def _outputs(root: Path) -> dict[str, bytes]:
    files = [p for p in (root / "results").rglob("*.csv")] + [p for p in (root / "figs").glob("*.png")]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_two_runs_give_byte_identical_tables_and_figures(smoke_report, smoke_rerun):
    first_root, proc = smoke_report
    assert proc.returncode == 0, proc.stderr[-2000:]
    second_root, second = smoke_rerun  # on the cache the first run wrote
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = _outputs(first_root), _outputs(second_root)
    assert a.keys() == b.keys() and len(a) > 20
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"differ between two runs: {differ}"


def _files_are_whole(root: Path) -> None:
    """Every file a reader can see is complete: CSVs parse to the end, PNGs
    end with their IEND chunk, checksummed cache entries match their sums."""
    from lab_utils.core import files

    for p in root.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue  # inside a temporary of an unfinished write: never read, swept by the next run
        if p.suffix == ".csv":
            with p.open(newline="") as fh:
                rows = list(csv.reader(fh))
            assert rows and len({len(r) for r in rows}) == 1, f"ragged CSV {p}"
        elif p.suffix == ".png":
            assert p.read_bytes().endswith(PNG_END), f"truncated PNG {p}"
        elif p.name.endswith(".sha256"):
            target = p.with_name(p.name[: -len(".sha256")])
            assert files.sha256_file(target) == p.read_text().strip(), f"checksum mismatch {target}"
        elif p.name == "MANIFEST.json":
            assert files.verify_dir(p.parent), f"damaged checkpoint {p.parent}"


def _settled(root: Path, timeout: float = 60.0) -> None:
    """Wait until nothing under ``root`` changes for a second. A killed run's kernel (its own
    session) and its Dask workers outlive the runner until they notice their parent is gone,
    and may still rename a finished write into place: the check is of what they leave."""
    def snapshot():
        try:
            return sorted((str(p), p.stat().st_size) for p in root.rglob("*"))
        except FileNotFoundError:  # an entry renamed while listing: not settled yet
            return None

    deadline, before = time.time() + timeout, None
    while time.time() < deadline:
        now = snapshot()
        if now is not None and now == before:
            return
        before = now
        time.sleep(1.0)
    raise AssertionError(f"{root} still changes {timeout:.0f} s after the run was killed")


def _finished(pruned: Path) -> list[Path]:
    """Checkpoints renamed into place (a temporary folder starts with a dot)."""
    if not pruned.exists():
        return []
    return [d for d in pruned.iterdir() if not d.name.startswith(".") and (d / "MANIFEST.json").is_file()]


def killed_run_params() -> dict:
    """Notebook 03 on the encoder alone (no perplexity, no generation to time), with the smoke
    report's small settings for everything after the sweep, and a sweep of three calibrated
    checkpoints: the run is killed once two are written, while the third is being pruned."""
    smoke = yaml.safe_load((REPO / SMOKE_PARAMS).read_text())
    section = {**smoke["notebooks"][NOTEBOOK], "methods": ["wanda"], "sparsities": [0.3, 0.5, 0.7],
               "patterns": ["unstructured"], "owl": False, "size_sparsities": [0.5],
               "size_formats": ["dense", "bitmask+zstd"]}
    return {"models": ["minilm-l6"], "seed": 0, "notebooks": {NOTEBOOK: section}}


def test_killed_run_leaves_whole_files_and_resumes_without_redoing_work(tmp_path):
    from lab_utils.core import files

    # A private cache (sharing the converted models and corpora, so nothing is
    # converted or fetched again) and a small notebook-03 run on the encoder.
    real = files.cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("models", "data"):
        (real / sub).mkdir(parents=True, exist_ok=True)
        os.symlink(real / sub, cache / sub)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(killed_run_params()))
    out = tmp_path / "out"
    env = dict(os.environ, LAB_OUTPUT_DIR=str(out), LAB_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "lab_utils.report", "--params", str(params), "--no-progress",
           "--only", NOTEBOOK]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pruned = cache / "pruned"
    deadline = time.time() + 600
    try:
        # kill the whole run (runner and kernel) once the sweep has finished some checkpoints
        while time.time() < deadline and proc.poll() is None:
            done = _finished(pruned)
            if len(done) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _settled(out)
    _settled(cache)
    _files_are_whole(out)
    _files_are_whole(cache)
    finished = {d.name: d.stat().st_mtime_ns for d in _finished(pruned)}
    assert len(finished) >= 2

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    _files_are_whole(out)
    for name, mtime in finished.items():  # reused, not pruned again
        assert (pruned / name).stat().st_mtime_ns == mtime, f"{name} was rebuilt"
    leftovers = [p for root in (out, cache) for p in root.rglob(".*.tmp*")]
    assert not leftovers, leftovers  # the resumed run swept the unfinished writes
    assert (out / "results" / "sizes.csv").is_file() and (out / "report" / "03_sparsification_and_sizes.html").is_file()
