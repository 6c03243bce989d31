"""Denoising benchmark for text encoder-decoders (BART): text infilling.

BART was pre-trained to rebuild a text from a corrupted copy; the benchmark
asks the same of a (pruned) model. Corruption is BART's text infilling (Lewis
et al. 2020, section 2.2): 30% of a sentence's tokens are masked in spans of
Poisson(3) lengths (a span of 0 inserts a ``<mask>``), and every run of masked
tokens becomes a *single* ``<mask>``, so the model must also infer how many
are missing. The draws come from ``default_rng(seed + sentence index)``: the
same corruption for every model, dense or pruned.

Score: the decoder reads the original sentence (teacher forcing); the
perplexity of every target token (BART's training loss) and of the masked-out
tokens only (``infill_perplexity``: what cannot be copied from the input).
Text: sentences of 8-48 words in reading order, from WikiText-2 (raw test) for
a hub model, the NYT editorials for a local one.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from lab_utils.core import data
from lab_utils.core.device import model_device
from lab_utils.core.metrics import load_metric
from lab_utils.core.progress import tqdm

MASK_RATIO = 0.3
POISSON_LAMBDA = 3.0
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def split_sentences(text: str, min_words: int = 8, max_words: int = 48) -> list[str]:
    """Sentences of a running text in order (WikiText headings skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sent in _SENTENCE_END.split(line):
            if min_words <= len(sent.split()) <= max_words:
                out.append(sent.strip())
    return out


def corpus_sentences(corpus: str, n: int) -> list[str]:
    """The first ``n`` sentences of ``corpus`` ("wikitext2" or "nyt")."""
    if corpus == "wikitext2":
        return split_sentences(data.wikitext2_text())[:n]
    if corpus == "nyt":
        return [s for _, s in data.nyt_sentences() if 8 <= len(s.split()) <= 48][:n]
    raise ValueError(f"unknown denoising corpus {corpus!r}; choose 'wikitext2' or 'nyt'")


def text_infilling(ids: list[int], mask_id: int, mask_ratio: float = MASK_RATIO,
                   poisson_lambda: float = POISSON_LAMBDA, rng: np.random.Generator | None = None
                   ) -> tuple[list[int], np.ndarray]:
    """Corrupt ``ids`` (no special tokens): returns (corrupted ids, boolean
    mask over ``ids`` of the tokens that were masked out)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio {mask_ratio!r} must be in [0, 1)")
    rng = rng if rng is not None else np.random.default_rng(0)
    n = len(ids)
    masked = np.zeros(n, dtype=bool)
    inserts: set[int] = set()
    target = int(round(mask_ratio * n))
    while int(masked.sum()) < target:
        length = int(rng.poisson(poisson_lambda))
        if length == 0:
            inserts.add(int(rng.integers(0, n + 1)))
            continue
        start = int(rng.integers(0, n))
        # never mask more than the target: trim the last span
        room = target - int(masked.sum())
        masked[start:min(n, start + min(length, room))] = True
    out = []
    for i in range(n):
        if i in inserts:
            out.append(mask_id)
        if masked[i]:
            if i == 0 or not masked[i - 1]:
                out.append(mask_id)  # one <mask> per contiguous run
        else:
            out.append(ids[i])
    if n in inserts:
        out.append(mask_id)
    return out, masked


def special_wrapping(tokenizer, text: str) -> tuple[list[int], list[int], list[int]]:
    """(prefix, content ids, suffix): what the tokenizer puts around a
    sentence (``<s>`` ... ``</s>`` for BART; nothing for a bare tokenizer)."""
    full = tokenizer(text)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for offset in range(len(full) - len(ids) + 1):
        if full[offset:offset + len(ids)] == ids:
            return full[:offset], ids, full[offset + len(ids):]
    return [], ids, []


@torch.no_grad()
def token_losses(model, tokenizer, sentences: list[str], mask_ratio: float = MASK_RATIO,
                 poisson_lambda: float = POISSON_LAMBDA, seed: int = 0, batch_size: int = 16,
                 device: str | torch.device | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """Per sentence: the loss of every target token, and of the masked-out ones
    (on ``device``; default: where the model reads its inputs)."""
    device = device or model_device(model)
    if tokenizer.mask_token_id is None:
        raise ValueError("text infilling needs a tokenizer with a mask token (BART's <mask>)")
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = []
    for i, sent in enumerate(sentences):
        prefix, ids, suffix = special_wrapping(tokenizer, sent)
        corrupted, masked = text_infilling(ids, tokenizer.mask_token_id, mask_ratio, poisson_lambda,
                                           np.random.default_rng(seed + i))
        src, tgt = prefix + corrupted + suffix, prefix + ids + suffix
        is_masked = np.zeros(len(tgt), dtype=bool)
        is_masked[len(prefix):len(prefix) + len(ids)] = masked
        items.append((src, tgt, is_masked))
    all_losses, masked_losses = [], []
    for b in tqdm(range(0, len(items), batch_size), desc="denoising", leave=False):
        batch = items[b:b + batch_size]
        n_src = max(len(s) for s, _, _ in batch)
        n_tgt = max(len(t) for _, t, _ in batch)
        src = torch.full((len(batch), n_src), pad, dtype=torch.long)
        att = torch.zeros((len(batch), n_src), dtype=torch.long)
        labels = torch.full((len(batch), n_tgt), -100, dtype=torch.long)
        for r, (s, t, _) in enumerate(batch):
            src[r, :len(s)], att[r, :len(s)] = torch.tensor(s), 1
            labels[r, :len(t)] = torch.tensor(t)
        # labels= makes the model build decoder inputs by shifting them right,
        # exactly as in pre-training; the loss is recomputed per token here.
        logits = model(input_ids=src.to(device), attention_mask=att.to(device),
                       labels=labels.to(device)).logits.float()
        loss = F.cross_entropy(logits.transpose(1, 2), labels.to(device), reduction="none",
                               ignore_index=-100).cpu().numpy()
        for r, (_, t, m) in enumerate(batch):
            row = loss[r, :len(t)]
            all_losses.append(row.tolist())
            masked_losses.append(row[m].tolist())
    return all_losses, masked_losses


def denoising(model, tokenizer, sentences: list[str], mask_ratio: float = MASK_RATIO,
              poisson_lambda: float = POISSON_LAMBDA, seed: int = 0, batch_size: int = 16,
              device: str | torch.device | None = None) -> dict:
    """Reconstruction loss and perplexity of ``sentences`` from their infilled copies."""
    t0 = time.perf_counter()
    all_l, masked_l = token_losses(model, tokenizer, sentences, mask_ratio, poisson_lambda, seed,
                                   batch_size, device)
    ppl = load_metric("perplexity")
    full = ppl.compute(losses=all_l)
    masked_only = [m for m in masked_l if m]
    infill = ppl.compute(losses=masked_only) if masked_only else {"perplexity": float("nan"),
                                                                  "mean_loss": float("nan"), "tokens": 0}
    return {"perplexity": full["perplexity"], "loss": full["mean_loss"], "tokens": full["tokens"],
            "infill_perplexity": infill["perplexity"], "infill_loss": infill["mean_loss"],
            "masked_tokens": infill["tokens"], "n": len(sentences), "mask_ratio": mask_ratio,
            "poisson_lambda": poisson_lambda, "seed": seed, "seconds": time.perf_counter() - t0}
