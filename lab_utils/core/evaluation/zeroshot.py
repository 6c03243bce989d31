"""Zero-shot accuracy of a loaded decoder through EleutherAI's lm-evaluation-harness.

The harness (the one Wanda, SparseGPT and llm-compressor report with) scores a
multiple-choice task by the log-likelihood of each answer after the prompt. It
receives the lab's already-loaded (possibly pruned) model, where it sits.

* :data:`OFFLINE_TASKS`: the lab's own task YAML in ``lm_eval_tasks/``;
  ``lab_sentiment`` reads the movie reviews from the lab's cache (no hub).
* :data:`HUB_SUITE`: the seven tasks the pruning papers report; their data come
  from the hub, so :func:`check_tasks` refuses them up front without it.

lm-eval's logs, warnings and prints are silenced for the call, and its request
cache and response database stay off, so an offline run writes no file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np

OFFLINE_TASKS = ("lab_sentiment",)
HUB_SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
# Requests per forward pass. lm-eval computes the full-vocabulary logits of
# every position: for 32 short reviews that is a few hundred MB, not more.
BATCH_SIZE = 32


def harness_version() -> str:
    """The installed lm-eval version (recorded next to every accuracy)."""
    from importlib.metadata import version

    return version("lm_eval")


def task_names(tasks) -> tuple[str, ...]:
    """One name or several, as a tuple."""
    return (tasks,) if isinstance(tasks, str) else tuple(tasks)


def check_tasks(tasks, hub_available: bool) -> tuple[str, ...]:
    """The task names as a tuple, or one clear ValueError before any work: no
    task at all, or a task that needs the hub (anything not in
    :data:`OFFLINE_TASKS`) while the hub is unavailable."""
    names = task_names(tasks)
    if not names:
        raise ValueError(f"no zero-shot task named; name at least one, e.g. {OFFLINE_TASKS[0]!r}")
    hub = [t for t in names if t not in OFFLINE_TASKS]
    if hub and not hub_available:
        raise ValueError(f"zero-shot task(s) {', '.join(hub)} need the Hugging Face hub, which is not "
                         f"available here; without it use {', '.join(OFFLINE_TASKS)}")
    return names


def task_prompt(task: str) -> tuple[str, list[str]]:
    """The prompt template (lm-eval's Jinja, e.g. ``"Review: {{text}}\\nSentiment:"``)
    and the answers as scored, delimiter included, of one of the lab's own
    tasks, read from its YAML (for the report's protocol line)."""
    import yaml

    if task not in OFFLINE_TASKS:
        raise ValueError(f"{task!r} is not one of the lab's tasks ({', '.join(OFFLINE_TASKS)}): "
                         f"lm-eval's own tasks keep their prompts in lm-eval")

    class _Loader(yaml.SafeLoader):  # the YAML names its loader with lm-eval's !function tag
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load((TASKS_DIR / f"{task}.yaml").read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    delim = cfg.get("target_delimiter", " ")
    return cfg["doc_to_text"], [delim + c for c in cfg["doc_to_choice"]]


def subset_indices(n_docs: int, n_examples: int | None, seed: int = 0) -> list[int] | None:
    """Indices of ``n_examples`` documents drawn by a seeded permutation, in
    document order (the rule of every benchmark subset of the lab), or None for all."""
    if n_examples is None or n_examples >= n_docs:
        return None
    if n_examples < 1:
        raise ValueError(f"n_examples must be at least 1 (or None for every document), got {n_examples}")
    return sorted(np.random.default_rng(seed).permutation(n_docs)[:n_examples].tolist())


@contextlib.contextmanager
def quiet_harness():
    """lm-eval's loggers at ERROR, Python warnings off, and its prints and
    progress bars captured (they would otherwise land in a rendered notebook).
    Levels are restored after."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        logger.setLevel(level)


def task_manager(tasks: tuple[str, ...], *, split_seed: int = 0):
    """An lm-eval TaskManager that knows the lab's task folder. lm-eval's own
    task index (thousands of YAML files, seconds to scan) is read only when a
    hub task is asked for. ``split_seed`` reaches the lab's data loader through
    the tasks' metadata (the train/test split of the lab's corpus)."""
    from lm_eval.tasks import TaskManager

    needs_builtin = any(t not in OFFLINE_TASKS for t in tasks)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_builtin,
                       metadata={"split_seed": int(split_seed)})


def wrap_model(model, tokenizer, *, batch_size: int = BATCH_SIZE, device: str = "cpu"):
    """lm-eval's Hugging Face wrapper around an already-loaded model, which must
    already be on ``device`` (moving the caller's model would be a surprise)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    where = next(model.parameters()).device
    if where != torch.device(device):
        raise ValueError(f"the model is on {where}, not on {device}: move it first (model.to({device!r}))")
    if tokenizer.pad_token_id is None:
        # lm-eval gives a tokenizer without one a pad token: keep the caller's as it was
        tokenizer = copy.deepcopy(tokenizer)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), device=str(device))


def _prepare(loaded: dict, *, seed: int) -> None:
    """Zero-shot unless a task's own config says otherwise, with a fixed
    few-shot seed (what ``simple_evaluate`` does, minus its reseeding of the
    caller's global random generators)."""
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)


def _metric(task_results: dict, name: str) -> float:
    # lm-eval names a metric with its filter ("acc,none"); a stderr it could
    # not compute is the string "N/A"
    v = task_results.get(f"{name},none")
    return float(v) if isinstance(v, (int, float)) else math.nan


def accuracy_rows(results: dict, tasks) -> list[dict]:
    """One row per task (see :func:`zeroshot_accuracy`) from :func:`run_harness`'s results."""
    version = harness_version()
    rows = []
    for name in task_names(tasks):
        r = results["results"][name]
        rows.append({"task": name, "accuracy": _metric(r, "acc"), "stderr": _metric(r, "acc_stderr"),
                     "accuracy_norm": _metric(r, "acc_norm"),
                     "stderr_norm": _metric(r, "acc_norm_stderr"),
                     "n": int(results["n-samples"][name]["effective"]), "harness_version": version})
    return rows


def run_harness(model, tokenizer, tasks=OFFLINE_TASKS, *, n_examples: int | None = None,
                seed: int = 0, batch_size: int = BATCH_SIZE, hub_available: bool | None = None,
                log_samples: bool = False) -> dict:
    """lm-eval's own results dict for ``tasks`` on ``model`` (see
    :func:`zeroshot_accuracy` for the arguments); ``log_samples`` adds every
    document's requests and log-likelihoods under ``"samples"``."""
    from lm_eval.evaluator import evaluate

    from lab_utils.core.models import hub_reachable  # here: importing this module needs no torch

    names = task_names(tasks)
    if hub_available is None and any(t not in OFFLINE_TASKS for t in names):
        hub_available = hub_reachable()[0]
    names = check_tasks(names, bool(hub_available))
    with quiet_harness():
        lm = wrap_model(model, tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
        loaded = task_manager(names, split_seed=seed).load(list(names))
        _prepare(loaded, seed=seed)
        samples = {name: idx for name, task in loaded["tasks"].items()
                   if (idx := subset_indices(len(task.eval_docs), n_examples, seed)) is not None}
        # the model as given, every time: no response database (use_cache) and
        # no request cache on disk (cache_requests)
        results = evaluate(lm=lm, task_dict=loaded, samples=samples or None, cache_requests=False,
                           log_samples=log_samples, bootstrap_iters=1000)
    return results


def zeroshot_accuracy(model, tokenizer, tasks=OFFLINE_TASKS, *, n_examples: int | None = None,
                      seed: int = 0, batch_size: int = BATCH_SIZE, hub_available: bool | None = None) -> list[dict]:
    """Zero-shot accuracy of ``model`` (where it sits) on each task through lm-eval.

    A row per task, in the order asked: task, accuracy ("acc"), stderr,
    accuracy_norm ("acc_norm", NaN where the task has none), stderr_norm, n
    (documents scored) and harness_version. ``seed`` fixes the lab corpus's
    train/test split and the subset of ``n_examples`` documents (None: all).
    ``hub_available`` None asks the hub, only when a hub task is requested.
    """
    results = run_harness(model, tokenizer, tasks, n_examples=n_examples, seed=seed,
                          batch_size=batch_size, hub_available=hub_available)
    return accuracy_rows(results, tasks)
