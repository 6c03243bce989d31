"""Sentiment of an encoder: a linear probe on frozen features, and embedding fidelity.

A sentence encoder has no answer to score, so a logistic-regression head is
trained once on the *dense* encoder's mean-pooled features and applied
unchanged to every sparsified encoder's features of the test split: accuracy
and F1 measure how much sentiment information the pruned features still carry
where the head expects it. Embedding fidelity (mean cosine similarity to the
dense embedding of the same sentence) needs no labels. A decoder's zero-shot
sentiment is an lm-eval task (:mod:`lab_utils.core.evaluation.zeroshot`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lab_utils.core.device import model_device
from lab_utils.core.metrics import load_metric
from lab_utils.core.progress import tqdm


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


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], max_length: int = 128, batch_tokens: int = 8192,
                device: str | torch.device | None = None) -> np.ndarray:
    """Sentence embeddings: the last hidden state averaged over the real
    tokens (padding masked out), as all-MiniLM-L6-v2 was trained to be used.
    Computed on ``device`` (default: where the model reads its inputs).
    Returns float32 (n, hidden)."""
    model.eval()
    device = device or model_device(model)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    pad = next(int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    for idx in tqdm(_batches([len(e) for e in enc], batch_tokens, max_batch=256), desc="features", leave=False):
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
    pred = probe_predict(probe, X).tolist()
    labels = [int(v) for v in labels]
    out = {"accuracy": load_metric("accuracy").compute(predictions=pred, references=labels)["accuracy"],
           "f1": load_metric("f1").compute(predictions=pred, references=labels)["f1"],
           "predicted_positive": float(np.mean(pred)), "n": len(labels)}
    out["fidelity"] = cosine_fidelity(X, X_dense) if X_dense is not None else math.nan
    return out
