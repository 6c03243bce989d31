import os
import stat

import pytest

from lab_utils.core import files


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    f = tmp_path / "x.txt"
    files.write_text(f, "old")
    with pytest.raises(RuntimeError), files.atomic_write(f, "w") as fh:
        fh.write("half")
        raise RuntimeError("killed")
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temporary left behind


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_a_plain_open_would_give(tmp_path, umask):
    """mkstemp makes a private 0600 file: a report or figure renamed into place must not stay so."""
    old = os.umask(umask)
    try:
        files.write_text(tmp_path / "a.txt", "x")
        with files.atomic_path(tmp_path / "b.csv") as tmp:
            tmp.write_text("y")
        with files.atomic_dir(tmp_path / "entry") as tmp:
            (tmp / "c.bin").write_bytes(b"z")
        (tmp_path / "plain.txt").write_text("p")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~umask
    for name in ("a.txt", "b.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert files.verify_dir(tmp_path / "entry")


def test_atomic_dir_and_manifest(tmp_path):
    d = tmp_path / "entry"
    with files.atomic_dir(d) as tmp:
        (tmp / "a.bin").write_bytes(b"123")
    assert files.verify_dir(d)
    (d / "a.bin").write_bytes(b"12")
    assert not files.verify_dir(d)


def test_checked_files_detect_edits(tmp_path):
    f = tmp_path / "r.json"
    files.store_json(f, {"v": 1})
    assert files.cached_json(f) == {"v": 1}
    f.write_text('{"v": 2}')
    assert files.cached_json(f) is None


def test_key_hash_is_stable_and_sensitive():
    assert files.key_hash("a", 1, 0.5) == files.key_hash("a", 1, 0.5)
    assert files.key_hash("a", 1, 0.5) != files.key_hash("a", 1, 0.25)


def test_sweep_removes_only_unfinished_temporaries(tmp_path):
    done = files.write_text(tmp_path / "figs" / "a.png", "complete")
    leftover = tmp_path / "figs" / ".a.png.x1y2.tmp"
    leftover.write_text("half")
    leftover_dir = tmp_path / "cache" / ".ckpt.abc.tmp"
    leftover_dir.mkdir(parents=True)
    (leftover_dir / "model.safetensors").write_bytes(b"\0" * 10)
    removed = files.sweep_temporaries(tmp_path)
    assert set(removed) == {leftover, leftover_dir}
    assert done.read_text() == "complete" and not leftover.exists() and not leftover_dir.exists()


def test_bare_names_go_to_the_results_and_figures_folders(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from lab_utils.core import files
    monkeypatch.setenv("LAB_OUTPUT_DIR", str(tmp_path))
    assert files.write_csv(pd.DataFrame({"a": [1]}), "t.csv") == tmp_path / "results" / "t.csv"
    assert files.save_figure(plt.figure(), "f.png") == tmp_path / "figs" / "f.png"
    other = tmp_path / "elsewhere" / "t.csv"
    other.parent.mkdir()
    assert files.write_csv(pd.DataFrame({"a": [1]}), other) == other


def test_whole_number_check():
    from lab_utils.core.checks import whole_number
    assert whole_number("nsamples", 3) == 3
    assert whole_number("seed", 0, minimum=0) == 0
    for bad in (True, 0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="nsamples must be a positive integer"):
            whole_number("nsamples", bad)
    with pytest.raises(KeyError):
        whole_number("x", 0, error=KeyError)
