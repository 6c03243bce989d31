"""Sentiment benchmarks: zero-shot for decoders, a linear probe for encoders.

Decoder-only (zero-shot). Each review goes into one fixed prompt and the model
scores two answers; the prediction is the answer with the higher
log-probability. No example, no training, no calibration: the prompt and the
answers are reported next to the numbers (:data:`PROMPT`, :data:`ANSWERS`).

Encoder-only (linear probe). A sentence encoder has no answer to score, so a
logistic-regression head is trained once, on the *dense* encoder's frozen
mean-pooled features of the training split, and then applied unchanged to the
features every sparsified encoder produces on the test split: the head is
the same for all, so accuracy and F1 measure how much of the sentiment
information the pruned features still carry in the place the head expects it.
Embedding fidelity, the mean cosine similarity between a sparse and the dense
sentence embedding of the same sentence, needs no labels at all.

The functions take a model and data and return numbers; caching and the choice
of data split live in :mod:`lab_utils.experiments.benchmarks`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

# The prompt ends right before the answer; the answers start with a space, as
# a word after "Sentiment:" does in running text (byte-level BPE tokenizers
# give " positive" its own token). Chosen among three wordings on 160 sentences
# of the *training* split with dense SmolLM2 (0.80 accuracy there, against
# 0.76 and 0.53 for the others); the test split was not looked at.
PROMPT = "Review: {text}\nSentiment:"
ANSWERS = (" negative", " positive")  # index = label (0 negative, 1 positive)


def _batches(lengths: list[int], batch_tokens: int, max_batch: int = 64) -> list[list[int]]:
    """Indices grouped by similar length (less padding), each batch at most
    ``batch_tokens`` padded tokens; the order inside is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out, cur, longest = [], [], 0
    for i in order:
        longest_if = max(longest, lengths[i])
        if cur and (longest_if * (len(cur) + 1) > batch_tokens or len(cur) >= max_batch):
            out.append(cur)
            cur, longest_if = [], lengths[i]
        cur.append(i)
        longest = longest_if
    if cur:
        out.append(cur)
    return out


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tok_id is not None:
            return int(tok_id)
    return 0


@torch.no_grad()
def answer_logprobs(model, tokenizer, texts: list[str], prompt: str = PROMPT,
                    answers: tuple[str, ...] = ANSWERS, batch_tokens: int = 4096,
                    device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """log p(answer | prompt(text)) for every text and answer: shape (n, len(answers)).

    A multi-token answer scores the sum of its tokens' log-probabilities. When
    every answer is one token, one forward pass of the prompt gives all of
    them (the next-token distribution at the prompt's last position);
    otherwise each prompt + answer is scored on its own.
    """
    from tqdm.auto import tqdm

    model.eval()
    prompts = [tokenizer(prompt.format(text=t))["input_ids"] for t in texts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    if any(len(a) == 0 for a in answer_ids):
        raise ValueError(f"an answer in {answers!r} tokenizes to nothing; use words the tokenizer knows")
    single = all(len(a) == 1 for a in answer_ids)
    pad = _pad_id(tokenizer)
    if single:
        seqs = prompts
    else:
        seqs = [p + a for p in prompts for a in answer_ids]
    out = np.zeros((len(texts), len(answers)), dtype=np.float64)
    scores = np.zeros(len(seqs), dtype=np.float64)  # one per prompt + answer (multi-token path)
    body, head = model.base_model, model.get_output_embeddings()
    batches = _batches([len(s) for s in seqs], batch_tokens)
    for idx in tqdm(batches, desc="zero-shot", disable=not progress, leave=False):
        ids, mask = _pad([seqs[i] for i in idx], pad)
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device),
                      use_cache=False).last_hidden_state
        # The vocabulary projection only where an answer is read: the full
        # (batch, tokens, vocab) logits would cost more than the model itself.
        rows, pos, targets, owner = [], [], [], []
        for row, i in enumerate(idx):
            if single:
                last = len(seqs[i]) - 1
                for k, a in enumerate(answer_ids):
                    rows.append(row), pos.append(last), targets.append(a[0]), owner.append((i, k))
            else:
                t, k = divmod(i, len(answers))
                start = len(prompts[t])  # the first answer token sits at this position
                for j, tok in enumerate(answer_ids[k]):
                    rows.append(row), pos.append(start - 1 + j), targets.append(tok), owner.append((i, None))
        logp = F.log_softmax(head(hidden[torch.tensor(rows), torch.tensor(pos)]).float(), dim=-1)
        picked = logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)].cpu().numpy()
        for (i, k), v in zip(owner, picked, strict=True):
            if single:
                out[i, k] = v
            else:
                scores[i] += v
    if not single:
        out = scores.reshape(len(texts), len(answers))
    return out


def zero_shot_sentiment(model, tokenizer, texts: list[str], labels: list[int], prompt: str = PROMPT,
                        answers: tuple[str, ...] = ANSWERS, batch_tokens: int = 4096,
                        device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Accuracy and F1 (positive class) of choosing the likelier answer.

    Also returns the share of reviews predicted positive: a model that always
    answers one way shows up there before it shows up anywhere else.
    """
    from lab_utils.core.metrics import load_metric

    t0 = time.perf_counter()
    lp = answer_logprobs(model, tokenizer, texts, prompt, answers, batch_tokens, device, progress)
    pred = lp.argmax(axis=1).tolist()
    labels = [int(v) for v in labels]
    return {"accuracy": load_metric("accuracy").compute(predictions=pred, references=labels)["accuracy"],
            "f1": load_metric("f1").compute(predictions=pred, references=labels)["f1"],
            "predicted_positive": float(np.mean(pred)), "n": len(texts),
            "margin": float(np.mean(lp[:, 1] - lp[:, 0])),
            "prompt": prompt, "answers": list(answers), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- encoder probe
@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], max_length: int = 128, batch_tokens: int = 8192,
                device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """Sentence embeddings: the last hidden state averaged over the real
    tokens (padding masked out), as all-MiniLM-L6-v2 was trained to be used.
    Returns float32 (n, hidden)."""
    from tqdm.auto import tqdm

    model.eval()
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    pad = _pad_id(tokenizer)
    for idx in tqdm(_batches([len(e) for e in enc], batch_tokens, max_batch=256), desc="features",
                    disable=not progress, leave=False):
        ids, mask = _pad([enc[i] for i in idx], pad)
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        m = mask.to(hidden.device).unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        out[idx] = pooled.cpu().numpy()
    return out


def train_probe(X: np.ndarray, y, C: float = 1.0, max_iter: int = 2000, seed: int = 0) -> dict:
    """A logistic-regression head on standardized features, as plain numbers
    (feature mean and scale, weights, bias) so it can be cached as JSON and
    applied to any encoder's features of the same width."""
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(np.unique(y)) != 2:
        raise ValueError(f"the probe needs two classes in its training labels, got {np.unique(y).tolist()}")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature carries nothing: leave it unscaled
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    clf.fit((X - mean) / scale, y)
    train_acc = float(clf.score((X - mean) / scale, y))
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": clf.coef_[0].tolist(),
            "intercept": float(clf.intercept_[0]), "C": C, "n_train": int(len(y)),
            "train_accuracy": train_acc}


def probe_predict(probe: dict, X: np.ndarray) -> np.ndarray:
    """Labels (0/1) the head gives to features X."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] != len(probe["coef"]):
        raise ValueError(f"features have width {X.shape[1]} but the probe was trained on "
                         f"{len(probe['coef'])}: use the probe of the same model")
    z = ((X - np.asarray(probe["mean"])) / np.asarray(probe["scale"])) @ np.asarray(probe["coef"])
    return (z + probe["intercept"] > 0).astype(np.int64)


def cosine_fidelity(X: np.ndarray, X_dense: np.ndarray) -> float:
    """Mean cosine similarity between rows of X and the matching rows of
    X_dense (1 = every embedding points the same way; a zero vector counts 0)."""
    X = np.asarray(X, dtype=np.float64)
    D = np.asarray(X_dense, dtype=np.float64)
    if X.shape != D.shape:
        raise ValueError(f"embeddings of shape {X.shape} and {D.shape} do not match row for row")
    num = (X * D).sum(axis=1)
    den = np.linalg.norm(X, axis=1) * np.linalg.norm(D, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return float(cos.mean())


def probe_scores(probe: dict, X: np.ndarray, labels, X_dense: np.ndarray | None = None) -> dict:
    """Accuracy and F1 of the head on features X, plus fidelity to X_dense."""
    from lab_utils.core.metrics import load_metric

    pred = probe_predict(probe, X).tolist()
    labels = [int(v) for v in labels]
    out = {"accuracy": load_metric("accuracy").compute(predictions=pred, references=labels)["accuracy"],
           "f1": load_metric("f1").compute(predictions=pred, references=labels)["f1"],
           "predicted_positive": float(np.mean(pred)), "n": len(labels)}
    out["fidelity"] = cosine_fidelity(X, X_dense) if X_dense is not None else math.nan
    return out
