"""Notebook 01's demos as cached steps, each building its own cache key.

:func:`setup` loads the decoder and the data every decoder demo shares (the
evaluation windows, the calibration windows, the timing input); the demo
functions take that :class:`Demo` and their own parameters, and run through
:func:`lab_utils.core.memo.timed`, so a rerun reads each table back with the
times of the run that computed it. The key of every decoder demo starts from
:attr:`Demo.key`: the model and every shared parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab_utils.core import data, memo, models
from lab_utils.core.evaluation.perplexity import default_corpus
from lab_utils.engine.config import default_calibration
from lab_utils.experiments import benchmarks
from lab_utils.experiments.concepts import costs, distill, moe, quantize, sparsification, structured

TIME_TOKENS = 128  # the forward timings run on one window of at most this many tokens


@dataclass
class Demo:
    """The decoder, its data and the parameters every decoder demo shares."""

    lm: models.LoadedModel
    windows: torch.Tensor  # evaluation windows (perplexity)
    calibration: torch.Tensor  # calibration windows (structured pruning, MoE routers)
    time_ids: torch.Tensor  # the input of every forward timing
    key: dict  # the shared part of every decoder demo's cache key
    progress: bool = True

    @property
    def reps(self) -> int:
        return self.key["timing_reps"]


def setup(decoder_model: str, *, seqlen: int, eval_windows: int, nsamples: int, seed: int,
          timing_reps: int, eval_seqlen: int | None = None, progress: bool = True) -> Demo:
    """Load the decoder, its evaluation windows (``eval_windows`` x ``eval_seqlen``
    tokens, default ``seqlen``: the quick protocol of
    :mod:`lab_utils.core.evaluation.protocols`) and calibration windows
    (``nsamples`` x ``seqlen``)."""
    eval_seqlen = eval_seqlen or seqlen
    lm = models.load_model(decoder_model)
    windows = data.eval_windows(lm.tokenizer, eval_seqlen, eval_windows, corpus=default_corpus(lm.spec))
    calibration = data.calibration_windows(lm.tokenizer, nsamples, seqlen, seed, corpus=default_calibration(lm))
    key = {"model": decoder_model, "seqlen": seqlen, "eval_windows": eval_windows, "nsamples": nsamples,
           "seed": seed, "timing_reps": timing_reps}
    if eval_seqlen != seqlen:  # the keys of the runs that measured with seqlen stay what they were
        key["eval_seqlen"] = eval_seqlen
    return Demo(lm, windows, calibration, windows[:1, : min(eval_seqlen, TIME_TOKENS)], key, progress)


def baseline(d: Demo) -> tuple[float, int]:
    """The dense model's perplexity and weights-file bytes."""
    return memo.cached("01-baseline", d.key, lambda: (
        costs.perplexity(d.lm.model, d.windows, progress=d.progress), costs.dense_file_bytes(d.lm.model)))


def sparsification_demo(d: Demo, sparsity: float, method: str, dense_ppl: float, dense_file: int):
    """(table, timing row) of the dense and the sparsified model side by side."""
    return memo.timed("01-sparsification", {**d.key, "sparsity": sparsity, "method": method},
                      lambda: sparsification.demo(
                          d.lm, sparsity, method, d.windows, d.time_ids, dense_ppl, dense_file, reps=d.reps,
                          progress=d.progress, nsamples=d.key["nsamples"], seqlen=d.key["seqlen"],
                          seed=d.key["seed"]), "1 sparsification")


def structured_demo(d: Demo, sparsities, dense_ppl: float, dense_file: int):
    """(table, timing row) of MLP-neuron pruning at each fraction removed."""
    return memo.timed("01-structured", {**d.key, "sparsities": sparsities}, lambda: structured.sweep(
        d.lm.model, d.calibration, d.windows, d.time_ids, sparsities, dense_ppl, reps=d.reps,
        dense_file=dense_file, progress=d.progress), "2 structured pruning")


def quantization_demo(d: Demo, group_sizes, dense_ppl: float, dense_file: int):
    """(table, timing row) of the quantization schemes."""
    return memo.timed("01-quantization", {**d.key, "group_sizes": group_sizes}, lambda: quantize.compare(
        d.lm.model, d.windows, d.time_ids, group_sizes, dense_ppl, reps=d.reps, dense_file=dense_file,
        progress=d.progress), "3 quantization")


def moe_demo(d: Demo, experts: int, active_fractions, dense_ppl: float):
    """(table, timing row) of MoEfication at each fraction of active neurons."""
    return memo.timed("01-moe", {**d.key, "experts": experts, "active": active_fractions}, lambda: moe.sweep(
        d.lm.model, d.calibration, d.windows, experts, active_fractions, dense_ppl=dense_ppl,
        seed=d.key["seed"], progress=d.progress), "5 MoEfication")


def distillation_demo(encoder_model: str, *, train_size: int, test_size: int, steps: int, temperature: float,
                      alpha: float, student_layers: int, seed: int, progress: bool = True):
    """((table, losses, test sentences), timing row) of the distillation
    experiment on movie-review sentences; the encoder and the sentences are
    loaded only when the cache lacks the result."""
    key = {"model": encoder_model, "train": train_size, "test": test_size, "steps": steps,
           "temperature": temperature, "alpha": alpha, "student_layers": student_layers, "seed": seed}

    def compute():
        enc = models.load_model(encoder_model)
        reviews = data.movie_reviews(test_fraction=0.2, seed=seed)
        train = benchmarks.subset(reviews["train"], train_size, seed)
        test = benchmarks.subset(reviews["test"], test_size, seed)
        table, losses = distill.experiment(enc.model, enc.tokenizer, train, test, student_layers, steps,
                                           temperature=temperature, alpha=alpha, seed=seed, progress=progress)
        return table, losses, len(test)

    return memo.timed("01-distillation", key, compute, "4 distillation")
