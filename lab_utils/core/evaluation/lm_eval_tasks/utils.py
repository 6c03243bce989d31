"""Document loader of the lab's lm-eval tasks (named by ``custom_dataset`` in their YAML)."""

from __future__ import annotations

from lab_utils.core import data


def movie_review_splits(split_seed: int = 0, **_metadata):
    """The lab's movie-review ``DatasetDict`` (train/test), built in memory
    from the corpus in the lab's cache.

    lm-eval calls this with the task's metadata as keyword arguments (its
    version, where the config came from, and whatever the TaskManager was
    given); only ``split_seed`` matters here, the rest is ignored.
    """

    return data.movie_reviews(seed=int(split_seed))
