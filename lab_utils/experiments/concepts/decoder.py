"""The decoder every decoder demo of notebook 01 runs on, and its data.

Its fields are its settings, so a demo step taking it is keyed by all of them;
the model and windows load on first use, so a rerun that reads every demo back
from the cache never tokenizes the calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lab_utils.core import data, memo, models
from lab_utils.core.evaluation.perplexity import default_corpus, perplexity
from lab_utils.engine.config import default_calibration
from lab_utils.experiments.concepts import costs

TIME_TOKENS = 128  # the forward timings run on one window of at most this many tokens


@dataclass(frozen=True)
class Decoder:
    model: str  # preset, hub id or folder
    seqlen: int  # tokens per calibration window
    eval_windows: int  # perplexity windows
    eval_seqlen: int  # tokens per perplexity window
    nsamples: int  # calibration windows (structured pruning, MoE routers, calibrated pruning)
    seed: int
    timing_reps: int  # forward passes timed per model (median)

    @cached_property
    def lm(self) -> models.LoadedModel:
        return models.load_model(self.model)

    @cached_property
    def windows(self) -> torch.Tensor:
        """The evaluation windows every perplexity of the demos is measured on."""
        return data.eval_windows(self.lm.tokenizer, self.eval_seqlen, self.eval_windows,
                                 corpus=default_corpus(self.lm.spec))

    @cached_property
    def calibration(self) -> torch.Tensor:
        return data.calibration_windows(self.lm.tokenizer, self.nsamples, self.seqlen, self.seed,
                                        corpus=default_calibration(self.lm))

    @property
    def time_ids(self) -> torch.Tensor:
        """The input of every forward timing."""
        return self.windows[:1, : min(self.eval_seqlen, TIME_TOKENS)]


@memo.step("01-baseline")
def baseline(decoder: Decoder) -> tuple[float, int]:
    """The dense model's perplexity and weights-file bytes."""
    return perplexity(decoder.lm.model, decoder.windows), costs.dense_file_bytes(decoder.lm.model)
