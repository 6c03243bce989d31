"""Jobs for tests/test_executor.py, in a module of their own: the workers of a test cluster
import it to run them, so it imports nothing beyond the standard library at the top."""

import os
import time
from pathlib import Path


def attempt(x: int, folder: str, hold: tuple = ()) -> dict:
    """x squared, recording the pid of each attempt; an x in ``hold`` waits, on its first
    attempt only, for a file ``release`` in ``folder`` (or for its worker to be killed)."""
    _record_and_hold(Path(folder), f"attempt-{x}", x in hold, f"job {x}")
    return {"x": x, "square": x * x}


def _record_and_hold(folder: Path, log_name: str, held: bool, what: str) -> None:
    """Append this process's pid to ``folder/log_name``; when ``held``, on the first attempt
    only, wait for a file ``release`` in ``folder`` (or for the worker to be killed)."""
    log = folder / log_name
    with log.open("a") as f:
        f.write(f"{os.getpid()}\n")
    if held and len(log.read_text().split()) == 1:
        # no clock: the test releases it (or kills the worker, or closes the cluster) when it
        # has seen what it waits for, however busy the machine; the bound is for a hung test
        deadline = time.monotonic() + 600
        while not (folder / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} held for 10 min: the test never released it")
            time.sleep(0.02)


def attempt_pids(folder: Path, x: int) -> list[int]:
    """The pids of the attempts at job x, in order."""
    log = Path(folder) / f"attempt-{x}"
    return [int(p) for p in log.read_text().split()] if log.exists() else []


def torch_threads() -> int:
    import torch  # here: the other jobs need no torch, and a worker's import of it takes seconds

    return torch.get_num_threads()


def worker_pid() -> int:
    return os.getpid()


# --- hooks into the pruning engine of a worker process (client.run, or a worker preload) ----------

_ORIGINAL: dict = {}


def job_name(model_name: str, method: str, sparsity: float) -> str:
    """How the hooks name a pruning: the model folder's name, the method, the sparsity."""
    return f"{Path(model_name).name}-{method}-{sparsity:g}"


def prune_pids(folder: Path, name: str) -> list[int]:
    """The pids of the attempts at the pruning ``name`` (:func:`job_name`), in order."""
    log = Path(folder) / f"prune-{name}"
    return [int(p) for p in log.read_text().split()] if log.exists() else []


def hook_engine(folder: str, hold: tuple = (), fail_write: tuple = ()) -> int:
    """In this process, record every pruning's attempt (``prune-<job_name>``: one pid a line);
    a pruning named in ``hold`` waits, on its first attempt only, for ``folder/release`` (or for
    its worker to be killed); one named in ``fail_write`` fails while its checkpoint is half
    written, as a full disk would. Returns this process's pid."""
    import errno

    from lab_utils.engine import checkpoints

    _ORIGINAL.setdefault("prune_model", checkpoints.prune_model)
    _ORIGINAL.setdefault("save_checkpoint", checkpoints.save_checkpoint)
    current: list[str] = []

    def prune_model(lm, cfg, *args, **kw):
        name = job_name(lm.spec.name, cfg.method, cfg.sparsity)
        current[:] = [name]
        _record_and_hold(Path(folder), f"prune-{name}", name in hold, f"pruning {name}")
        return _ORIGINAL["prune_model"](lm, cfg, *args, **kw)

    def save_checkpoint(model, tmp):
        if current and current[0] in fail_write:
            (Path(tmp) / "pruned.safetensors").write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _ORIGINAL["save_checkpoint"](model, tmp)

    checkpoints.prune_model = prune_model
    checkpoints.save_checkpoint = save_checkpoint
    return os.getpid()


def unhook_engine() -> None:
    """Undo :func:`hook_engine` in this process."""
    from lab_utils.engine import checkpoints

    for name, function in _ORIGINAL.items():
        setattr(checkpoints, name, function)


def dask_setup(worker) -> None:
    """As a worker preload (``distributed.worker.preload``): :func:`hook_engine` with the JSON
    arguments in ``EXECUTOR_JOBS_HOOK``, so a local cluster's workers are hooked from their start."""
    import json

    hook_engine(**json.loads(os.environ["EXECUTOR_JOBS_HOOK"]))
