"""The report run survives being killed and is reproducible, on the smoke report's runs
(tests/smoke_runs.py runs them in the background):

* The first, cold run is killed (runner, kernel and Dask workers at once) in notebook 03's
  sweep once two of its checkpoints are written, while others are being pruned: it leaves no
  half-written file, and the same command resumes it from the cache without pruning the
  finished checkpoints again.
* Two runs with the same parameters give byte-identical result tables and figures: what the
  killed run had written (notebooks 01, 02 and part of 03) equals what the resumed run wrote
  again from the cache, and a second run of notebooks 03 and 04 on the cache the first wrote
  equals the first run's. Every table and figure is compared with another run's.
"""

import pytest
from smoke_runs import broken_files, outputs

from lab_utils.core import memo

# They read the smoke report (make test-fast leaves them out).
pytestmark = pytest.mark.slow


def test_a_killed_run_resumes_and_two_runs_give_byte_identical_tables_and_figures(
        smoke_report, smoke_killed, smoke_rerun):
    first_root, proc = smoke_report
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert smoke_killed is not None, "the first run ended before it could be killed in notebook 03's sweep"
    assert not smoke_killed.broken, smoke_killed.broken  # every file a reader can see is whole

    # Resumed from the cache: the finished checkpoints were reused, not pruned again, and the
    # resumed run swept the unfinished writes of the killed one.
    cache = first_root.parent / "cache"
    pruned = cache / "pruned"
    for name, mtime in smoke_killed.checkpoints.items():
        assert (pruned / name).stat().st_mtime_ns == mtime, f"{name} was rebuilt"
    leftovers = [p for root in (first_root, cache) for p in root.rglob(".*.tmp*")]
    assert not leftovers, leftovers
    assert not broken_files(first_root)

    # Byte for byte: the killed run's files against the resumed run's, the second run's
    # (03 and 04 on the first run's cache) against the first's; together they cover them all.
    second_root, second = smoke_rerun
    assert second.returncode == 0, second.stderr[-2000:]
    started = (first_root.parent / "code_version.txt").read_text()
    assert memo.code_version.__wrapped__() == started, (
        "lab_utils sources (core, engine, experiments) were edited while the smoke report ran: "
        "every cache key moved, so the later runs measured again instead of reading the cache")
    first, killed, again = outputs(first_root), smoke_killed.outputs, outputs(second_root)
    assert len(first) > 20 and killed and again
    differ = [name for name, data in [*killed.items(), *again.items()] if first.get(name) != data]
    assert not differ, f"differ between two runs: {differ}"
    unchecked = first.keys() - killed.keys() - again.keys()
    assert not unchecked, f"written by one run only: {sorted(unchecked)}"
