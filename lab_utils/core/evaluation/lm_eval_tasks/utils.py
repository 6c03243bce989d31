"""Document loader of the lab's lm-eval tasks (named by ``custom_dataset`` in their YAML)."""

from __future__ import annotations

from lab_utils.core import data


def movie_review_splits(split_seed: int = 0, **_metadata):
    """The lab's movie-review ``DatasetDict`` (train/test), built in memory from
    the lab's cache. lm-eval passes the task's metadata as keyword arguments;
    only ``split_seed`` (given to the TaskManager) matters here."""
    return data.movie_reviews(seed=int(split_seed))
