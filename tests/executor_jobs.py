"""Jobs for tests/test_executor.py, in a module of their own: the workers of a test cluster
import it to run them, so it imports nothing beyond the standard library at the top."""

import os
import time
from pathlib import Path


def attempt(x: int, folder: str, hold: tuple = ()) -> dict:
    """x squared, recording the pid of each attempt; an x in ``hold`` waits, on its first
    attempt only, for a file ``release`` in ``folder`` (or for its worker to be killed)."""
    log = Path(folder) / f"attempt-{x}"
    with log.open("a") as f:
        f.write(f"{os.getpid()}\n")
    if x in hold and len(log.read_text().split()) == 1:
        deadline = time.monotonic() + 60
        while not (Path(folder) / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {x} held for 60 s")
            time.sleep(0.02)
    return {"x": x, "square": x * x}


def attempt_pids(folder: Path, x: int) -> list[int]:
    """The pids of the attempts at job x, in order."""
    log = Path(folder) / f"attempt-{x}"
    return [int(p) for p in log.read_text().split()] if log.exists() else []


def torch_threads() -> int:
    import torch  # here: the other jobs need no torch, and a worker's import of it takes seconds

    return torch.get_num_threads()


def worker_pid() -> int:
    return os.getpid()
