"""Perplexity = exp(mean negative log-likelihood per token), from losses a model produced.

The hub's ``perplexity`` metric loads a model by name and runs it; this one
takes each sequence's per-token losses in nats (or log-likelihoods with
``kind="log_likelihood"``), so it works for any model, offline. With sequences
of equal length it equals ``exp(mean window loss)`` of the Wanda/SparseGPT protocol.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity = exp(mean negative log-likelihood per token), from given per-token values."

_KWARGS_DESCRIPTION = """
Args:
    losses (list of list of float): per sequence, the per-token losses in nats (-log p).
    kind (str): 'loss' (default) or 'log_likelihood' (values are log p, i.e. <= 0).
Returns:
    perplexity (float): exp of the mean loss over all tokens.
    mean_loss (float): that mean, in nats.
    tokens (int): number of tokens.
    perplexities (list of float): the perplexity of each sequence.
Example:
    >>> load_metric("perplexity").compute(losses=[[math.log(4)] * 3])["perplexity"]   # uniform over 4
    4.0
"""

_CITATION = "Jelinek et al., Perplexity - a measure of the difficulty of speech recognition tasks, JASA 1977."


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"losses": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, losses, kind="loss"):
        if kind not in ("loss", "log_likelihood"):
            raise ValueError(f"perplexity: kind={kind!r}; use 'loss' (-log p) or 'log_likelihood' (log p)")
        sign = -1.0 if kind == "log_likelihood" else 1.0
        seqs = [[sign * float(v) for v in seq] for seq in losses]
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("perplexity: every sequence needs at least one token's loss")
        if any(v < 0 for s in seqs for v in s):
            raise ValueError(f"perplexity: negative loss found; pass losses (-log p >= 0), or "
                             f"log-likelihoods with kind='log_likelihood' (got kind={kind!r})")
        tokens = sum(len(s) for s in seqs)
        mean = sum(sum(s) for s in seqs) / tokens
        return {"perplexity": math.exp(mean), "mean_loss": mean, "tokens": tokens,
                "perplexities": [math.exp(sum(s) / len(s)) for s in seqs]}
