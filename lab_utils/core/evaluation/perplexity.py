"""Decoder perplexity under the protocol of the Wanda and SparseGPT papers.

The evaluation text, tokenized once without special tokens, is cut into
non-overlapping windows of ``seqlen`` tokens and the first K are kept
(:func:`lab_utils.core.data.token_windows`); each window's loss is the mean
next-token cross-entropy that ``model(input_ids=w, labels=w)`` reports, and
perplexity = exp(mean window loss). Embedded models read the NYT editorials,
hub presets WikiText-2 (raw, test split) with ``seqlen`` = the model's context.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from lab_utils.core import data, files
from lab_utils.core.device import model_device
from lab_utils.core.models import DECODER_ONLY, default_seqlen
from lab_utils.core.progress import tqdm

BATCH_TOKENS = 2048  # tokens per forward: bounds the (batch, seqlen, vocab) logits


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_tokens: int = BATCH_TOKENS,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """Loss of every window (K,), each the mean over its seqlen-1 predicted tokens;
    the windows go to ``device`` (default: where the model reads its inputs)."""
    model.eval()
    device = device or model_device(model)
    K, seqlen = windows.shape
    bs = max(1, batch_tokens // seqlen)
    out = []
    for i in tqdm(range(0, K, bs), desc="perplexity", leave=False):
        w = windows[i:i + bs].to(device)
        logits = model(input_ids=w, use_cache=False).logits.float()
        # the same shift as model(labels=w): token t predicts token t+1
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               w[:, 1:].reshape(-1), reduction="none")
        out.append(loss.view(w.shape[0], -1).mean(dim=1).cpu())
        del logits, loss
    return torch.cat(out)


def perplexity(model, windows: torch.Tensor, batch_tokens: int = BATCH_TOKENS,
               device: str | torch.device | None = None) -> float:
    """exp of the mean window loss."""
    return math.exp(float(window_losses(model, windows, batch_tokens, device).mean()))


def default_corpus(spec) -> str:
    """WikiText-2 for hub presets (as in the papers), NYT editorials otherwise."""
    return "wikitext2" if spec.source == "hub" else "nyt"


def evaluate(lm, seqlen: int | None = None, n_windows: int | None = 64, corpus: str | None = None,
             cache_key: str | None = None) -> dict:
    """Perplexity of a loaded decoder-only model as a dict (perplexity, seqlen,
    windows, corpus, seconds). With a ``cache_key`` (e.g. a PruneReport's
    key) the result is cached on disk and reused."""
    if lm.family != DECODER_ONLY:
        raise ValueError(f"perplexity is defined here for decoder-only models; {lm.spec.name} is "
                         f"{lm.family} (its benchmark is {lm.spec.benchmark!r})")
    seqlen = seqlen or default_seqlen(lm.spec, lm.model.config)
    corpus = corpus or default_corpus(lm.spec)
    path = None
    if cache_key is not None:
        path = files.cache_dir() / "eval" / f"ppl-{files.key_hash(cache_key, seqlen, n_windows, corpus)}.json"
        hit = files.cached_json(path)
        if hit is not None:
            return hit
    windows = data.token_windows(lm.tokenizer, "eval", n_windows, seqlen, corpus=corpus)
    t0 = time.perf_counter()
    ppl = perplexity(lm.model, windows)
    result = {"model": lm.spec.name, "perplexity": ppl, "seqlen": seqlen,
              "windows": int(windows.shape[0]), "corpus": corpus,
              "seconds": time.perf_counter() - t0}
    if path is not None:
        files.store_json(path, result)
    return result
