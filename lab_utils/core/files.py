"""Where things live, and how they are written without ever leaving half a file.

Every file the lab writes goes through :func:`atomic_path` (a temporary file in
the same folder, then ``os.replace``), so an interrupted run leaves either the
old file or the new one, never a truncated mix. Cache entries carry a sha256
manifest written last: an entry without a valid manifest is treated as absent
and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # lab_utils/core/files.py -> the repository
MANIFEST = "MANIFEST.json"


def cache_dir() -> Path:
    """Cache for converted models, pruned checkpoints, data and evaluations.

    ``LAB_CACHE_DIR`` overrides the default ``<repo>/.cache``.
    """
    return _mkdir(Path(os.environ.get("LAB_CACHE_DIR", REPO_ROOT / ".cache")))


def output_root() -> Path:
    """Root under which figs/, results/, build/ and report/ are written.

    ``LAB_OUTPUT_DIR`` overrides the repository root; the smoke tests point it
    at a temporary folder so that they never touch the committed outputs.
    """
    return _mkdir(Path(os.environ.get("LAB_OUTPUT_DIR", REPO_ROOT)))


def figs_dir() -> Path:
    return _mkdir(output_root() / "figs")


def results_dir() -> Path:
    return _mkdir(output_root() / "results")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it
    to read it back would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str | os.PathLike, directory: bool = False) -> None:
    """Give a finished temporary file (or folder) the mode a plain ``open`` (``mkdir``)
    would have: ``mkstemp`` and ``mkdtemp`` make them private (0600 / 0700), and a
    report, a figure or a shared cache must stay readable by the group and others
    wherever the user's umask allows it."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for a writer that wants a file
    name (savefig, ``to_csv``, safetensors), then rename it over ``path``.
    On any exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """:func:`atomic_path`, opened in ``mode`` and flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it into place.

    A manifest of sha256 sums is written into it last, so :func:`verify_dir`
    can tell a complete entry from one that was cut short or edited later.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        write_manifest(tmp)
        _publish(tmp, directory=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_temporaries(*roots: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that a killed run left behind
    (``.<name>.*.tmp*``: never a finished file, only an unfinished write)."""
    removed = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted(root.rglob(".*.tmp*"), reverse=True):
            if p.name.startswith(".") and ".tmp" in p.name:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                removed.append(p)
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _under(folder, path: str | os.PathLike) -> Path:
    """A bare file name goes under ``folder()``; a path with a folder is kept."""
    path = Path(path)
    return folder() / path if path.parent == Path(".") else path


def write_csv(table, path: str | os.PathLike, float_format: str | None = None) -> Path:
    """A pandas table as CSV, atomically (the write-up and the reruns read it).
    A bare name (``"sweep.csv"``) goes to :func:`results_dir`."""
    path = _under(results_dir, path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format=float_format)
    return Path(path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as PNG, atomically and with no timestamp or software
    tag in its metadata: the same data gives the same bytes on every run.
    A bare name (``"sweep.png"``) goes to :func:`figs_dir`."""
    path = _under(figs_dir, path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    sums = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    write_json(folder / MANIFEST, sums)


def verify_dir(folder: str | os.PathLike) -> bool:
    """True when ``folder`` has a manifest and every file matches its sum."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        sums = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    for rel, digest in sums.items():
        f = folder / rel
        if not f.is_file() or sha256_file(f) != digest:
            return False
    return True


def write_checked(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically with a ``.sha256`` sidecar (for single-file
    cache entries such as an evaluation result or a synthesized utterance)."""
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(data)
    write_text(path.with_name(path.name + ".sha256"), sha256_bytes(data) + "\n")
    return path


def read_checked(path: str | os.PathLike) -> bytes | None:
    """Bytes of a checked cache file, or None when absent, truncated or edited."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not path.is_file() or not side.is_file():
        return None
    data = path.read_bytes()
    if sha256_bytes(data) != side.read_text().strip():
        return None
    return data


def cached_json(path: str | os.PathLike):
    """A JSON cache entry, or None if missing or failing its checksum."""
    data = read_checked(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None


def store_json(path: str | os.PathLike, obj) -> None:
    write_checked(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def key_hash(*parts) -> str:
    """A short stable hash of a cache key made of plain values."""
    return sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode())[:16]
