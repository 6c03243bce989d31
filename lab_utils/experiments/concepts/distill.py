"""Distillation: train a small student on a teacher's soft targets.

The teacher is an encoder (mean-pooled) with the sentiment probe of notebook 04
(:mod:`lab_utils.core.evaluation.sentiment`) as a linear head; the student is
the encoder cut to its first blocks, with a probe fitted on its own features.
Two students start from the same weights and see the same batches; only the
loss differs:

* **distilled**: ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) +
  (1 - alpha) * CE(s, y)`` (Hinton et al. 2015; the T^2 keeps the soft-target
  gradients on the scale of the hard-label ones when T changes);
* **label-only**: ``CE(s, y)``.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lab_utils.core import data, memo, models
from lab_utils.core.checks import whole_number
from lab_utils.core.evaluation import sentiment
from lab_utils.core.models import transformer_blocks
from lab_utils.core.progress import tqdm
from lab_utils.engine import recover
from lab_utils.experiments import benchmarks
from lab_utils.experiments.concepts import costs


class DistillError(ValueError):
    """Bad distillation input, in one line that names the fix."""


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The distillation demo's settings (notebook 01's ``distill_*`` parameters)."""

    encoder_model: str = "minilm-l6"
    train_size: int = 1024  # movie-review training sentences (teacher head and students)
    test_size: int = 1024  # test sentences for the accuracies
    steps: int = 48  # AdamW steps of each student
    temperature: float = 2.0
    alpha: float = 1.0  # weight of the soft targets; 0 trains on the labels alone
    student_layers: int = 2  # blocks the student keeps from the teacher
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-4
    max_length: int = 64  # tokens per sentence
    freeze_embeddings: bool = True  # the embedding layer keeps the teacher's weights
    timing_reps: int = 3  # forward passes timed per model (median), as notebook 01's ``timing_reps``


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, temperature: float = 2.0,
                      alpha: float = 1.0) -> torch.Tensor:
    """Soft-target KL (scaled by T^2) mixed with the hard-label cross-entropy.

    ``alpha=1`` is pure distillation, ``alpha=0`` is training on labels alone.
    """
    if temperature <= 0:
        raise DistillError(f"temperature {temperature!r} must be > 0 (e.g. 2.0)")
    if not 0 <= alpha <= 1:
        raise DistillError(f"alpha {alpha!r} must be in [0, 1]: the weight of the soft targets")
    loss = student_logits.new_zeros(())
    if alpha > 0:  # the engine's kd loss, the one recovery after pruning trains with
        loss = loss + alpha * recover.kd_loss(student_logits, teacher_logits, temperature)
    if alpha < 1:
        if labels is None:
            raise DistillError("alpha < 1 mixes in the label loss: pass labels")
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, labels)
    return loss


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states, padding excluded (the sentence embedding of MiniLM)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class SentenceClassifier(nn.Module):
    """Encoder + mean pooling + a linear head over two classes."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, input_ids, attention_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids, attention_mask):
        return self.head(self.features(input_ids, attention_mask))


def truncate_blocks(encoder: nn.Module, n_blocks: int) -> nn.Module:
    """A copy of ``encoder`` that keeps only its first ``n_blocks`` transformer blocks."""
    sides = transformer_blocks(encoder)
    if len(sides) != 1:
        raise DistillError(f"{type(encoder).__name__}: expected one stack of blocks, got {list(sides)}")
    ((prefix, blocks),) = sides.values()
    if not 1 <= n_blocks <= len(blocks):
        raise DistillError(f"student_layers={n_blocks} must be between 1 and the teacher's "
                           f"{len(blocks)} layers")
    student = copy.deepcopy(encoder)
    parent_name, _, attr = prefix.rpartition(".")
    parent = student.get_submodule(parent_name) if parent_name else student
    setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[:n_blocks]))
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(student.config, key):
            setattr(student.config, key, n_blocks)
    return student


def _batches(tokenizer, texts, batch_size: int, max_length: int):
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"]


def head_from_probe(probe: dict) -> nn.Linear:
    """The benchmarks' sentiment probe (:func:`lab_utils.core.evaluation.sentiment.train_probe`:
    a logistic regression on standardized features) as a two-logit linear head.

    The standardization is folded into the weights, z = ((x - mean) / scale) . coef + b
    = x . (coef / scale) + (b - mean . coef / scale), and the logits are (-z/2, z/2), so
    the head's softmax is exactly the regression's probability and its argmax the
    probe's prediction.
    """
    coef = torch.tensor(probe["coef"], dtype=torch.float64)
    mean = torch.tensor(probe["mean"], dtype=torch.float64)
    scale = torch.tensor(probe["scale"], dtype=torch.float64)
    w = coef / scale
    b = probe["intercept"] - float(mean @ w)
    head = nn.Linear(len(coef), 2)
    with torch.no_grad():
        head.weight.copy_(torch.stack([-w / 2, w / 2]).float())
        head.bias.copy_(torch.tensor([-b / 2, b / 2]))
    return head


@torch.no_grad()
def predict_logits(model: SentenceClassifier, tokenizer, texts, batch_size: int = 64,
                   max_length: int = 64) -> torch.Tensor:
    model.eval()
    batches = tqdm(_batches(tokenizer, texts, batch_size, max_length),
                   total=(len(texts) + batch_size - 1) // batch_size, desc="predict", leave=False)
    return torch.cat([model(ids, mask).float() for ids, mask in batches])


def accuracy(logits: torch.Tensor, labels) -> float:
    return float((logits.argmax(-1) == torch.as_tensor(labels)).float().mean())


def train_student(student: SentenceClassifier, tokenizer, texts, labels,
                  teacher_logits: torch.Tensor | None, cfg: DistillConfig) -> list[float]:
    """Train ``student`` in place for ``cfg.steps`` AdamW steps on the loss
    :func:`distillation_loss` with ``cfg``'s temperature and alpha; return the
    loss per step. The batches are a seeded shuffle of the training set, so two
    students trained with the same seed see the same sentences in the same order.
    """
    steps, batch_size = whole_number("distill_steps", cfg.steps, error=DistillError), cfg.batch_size
    if cfg.alpha > 0 and teacher_logits is None:
        raise DistillError("alpha > 0 distils from the teacher: pass teacher_logits")
    labels = torch.as_tensor(labels)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout draws, if the encoder has any
    student.train()
    if cfg.freeze_embeddings:
        # the token table is most of a small student's parameters and the same
        # for every student: training only the blocks and the head keeps a step cheap
        for name, p in student.named_parameters():
            if "embeddings" in name:
                p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=0.01)
    order = np.concatenate([rng.permutation(len(texts))
                            for _ in range(steps * batch_size // len(texts) + 1)])
    losses = []
    for step in tqdm(range(steps), desc="train", leave=False):
        idx = order[step * batch_size : (step + 1) * batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=cfg.max_length, return_tensors="pt")
        logits = student(enc["input_ids"], enc["attention_mask"])
        t = teacher_logits[idx] if teacher_logits is not None else None
        loss = distillation_loss(logits, t, labels[idx], cfg.temperature, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    student.eval()
    return losses


# --------------------------------------------------------------------------- the demo
@memo.step("01-distillation", timed_as="4 distillation")
def demo(cfg: DistillConfig):
    """((table, losses, test sentences), timing row) of :func:`experiment` on
    movie-review sentences; the encoder and the sentences are loaded only when
    the cache lacks the result."""
    enc = models.load_model(cfg.encoder_model)
    reviews = data.movie_reviews(test_fraction=0.2, seed=cfg.seed)
    train = benchmarks.subset(reviews["train"], cfg.train_size, cfg.seed)
    test = benchmarks.subset(reviews["test"], cfg.test_size, cfg.seed)
    table, losses = experiment(enc.model, enc.tokenizer, train, test, cfg)
    return table, losses, len(test)


def experiment(encoder: nn.Module, tokenizer, train, test, cfg: DistillConfig):
    """Teacher, the truncated student with its probe head (before any training),
    the distilled student and the label-only student.

    Returns (table, losses): one row per model (layers, parameters, bytes,
    test accuracy, seconds of training), and the per-step training losses.
    """
    student_layers, max_length, seed = cfg.student_layers, cfg.max_length, cfg.seed
    t0 = time.perf_counter()
    f_train = sentiment.mean_pooled(encoder, tokenizer, train["text"], max_length)
    f_test = sentiment.mean_pooled(encoder, tokenizer, test["text"], max_length)
    head = head_from_probe(sentiment.train_probe(f_train, train["label"], seed=seed))
    with torch.no_grad():
        teacher_train, teacher_test = head(torch.from_numpy(f_train)), head(torch.from_numpy(f_test))
    teacher_s = time.perf_counter() - t0
    n_blocks = len(next(iter(transformer_blocks(encoder).values()))[1])

    def row(name: str, layers: int, model: nn.Module, logits: torch.Tensor, train_s: float) -> dict:
        return {"model": name, "layers": layers,
                "parameters": sum(p.numel() for p in model.parameters()),
                "accuracy": accuracy(logits, test["label"]), "train_s": train_s,
                "agreement_with_teacher": accuracy(logits, teacher_test.argmax(-1))}

    teacher = SentenceClassifier(encoder, head)
    rows = [row("teacher", n_blocks, teacher, teacher_test, teacher_s)]
    # The truncated encoder's features live elsewhere than the teacher's: its
    # starting head is the same probe, fitted on its own frozen features.
    truncated = truncate_blocks(encoder, student_layers)
    f_student = sentiment.mean_pooled(truncated, tokenizer, train["text"], max_length)
    start = SentenceClassifier(truncated, head_from_probe(
        sentiment.train_probe(f_student, train["label"], seed=seed)))
    logits = predict_logits(start, tokenizer, test["text"], max_length=max_length)
    rows.append(row("student, probe only", student_layers, start, logits, 0.0))
    losses = {}
    for name, a in (("student, distilled", cfg.alpha), ("student, labels only", 0.0)):
        student = copy.deepcopy(start)
        t0 = time.perf_counter()
        losses[name] = train_student(student, tokenizer, train["text"], train["label"],
                                     teacher_train, dataclasses.replace(cfg, alpha=a))
        seconds = time.perf_counter() - t0
        logits = predict_logits(student, tokenizer, test["text"], max_length=max_length)
        rows.append(row(name, student_layers, student, logits, seconds))
    table = pd.DataFrame(rows)
    table["bytes_fp32"] = 4 * table.parameters
    table["embedding_parameters"] = sum(p.numel() for n, p in start.named_parameters()
                                        if "embeddings" in n)
    enc = tokenizer(list(test["text"][:64]), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    teacher.eval()
    start.eval()
    speed = costs.seconds_each({m: (lambda c=c: c(enc["input_ids"], enc["attention_mask"]))
                                for m, c in (("teacher", teacher), ("student", start))}, reps=cfg.timing_reps)
    for col in ("forward_s", "forward_cpu_s"):
        table[col] = [speed["teacher"][col]] + [speed["student"][col]] * (len(table) - 1)
    return table, pd.DataFrame(losses)
