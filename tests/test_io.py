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
