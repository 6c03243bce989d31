"""Recovery: fine-tune a pruned checkpoint with its mask kept, and measure what it wins back.

The training loop, the losses and the cached recovered checkpoint are the engine's
(:mod:`lab_utils.engine.recover`); this module gives it what each family trains on
and measures the result with notebook 04's own benchmarks:

* **Data that cannot leak** (:func:`training_texts`): the embedded corpora that no
  benchmark reads (Amazon review and tweet sentences, the movie-review *train*
  split), less every sentence an evaluation reads (:func:`evaluation_texts`: all
  NYT editorial sentences, which hold the perplexity windows and the WER speech,
  and the movie-review test split of the zero-shot task and the probe);
  :func:`check_disjoint` refuses any overlap.
* **A task per family**, a frozen dataclass whose fields key the checkpoint: the
  decoder distils the dense model's next-token distribution on text windows
  (:class:`DecoderTask`); the encoder matches the dense model's mean-pooled
  sentence embeddings (:class:`EncoderTask`); Whisper distils its decoder's
  logits on synthesized speech of the training sentences (:class:`WhisperTask`).
* **The table** (:func:`recovery_table`): per model and recovered setting the
  family's metric dense / pruned / recovered (perplexity under the notebook's
  protocol, embedding fidelity, WER), the fraction of the gap recovered (for
  perplexity, of the log-perplexity gap), the sparsity before and after, steps,
  tokens and seconds; and the training loss of every step for the figure.
"""

from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd
import torch
import torch.nn.functional as F

from lab_utils.core import data, files, memo, sparsify
from lab_utils.core.data import DataError
from lab_utils.core.evaluation import asr
from lab_utils.core.models import (
    DECODER_ONLY,
    ENCODER_DECODER,
    ENCODER_ONLY,
    load_model,
    prunable_layers,
    resolve,
)
from lab_utils.engine import checkpoints, recover
from lab_utils.engine import config as engine_config
from lab_utils.experiments import benchmarks

LOSSES = ("kd", "next-token", "lora")
TRAIN_FILES = ("amazonReviewSnippets_GroundTruth.txt", "tweets_GroundTruth.txt")
SPEECH_PER_CLIP = engine_config.SPEECH_PER_WINDOW  # Whisper hears 30 s: four sentences per clip, as it calibrates
EVAL_VERSION = 1  # part of every recovered evaluation's cache key: bump when its numbers change


# --------------------------------------------------------------------------- data that cannot leak
def _norm(sentence: str) -> str:
    """A sentence as the disjointness check compares it: case and spacing ignored."""
    return " ".join(sentence.lower().split())


def evaluation_texts(seed: int = 0) -> dict[str, frozenset[str]]:
    """Every sentence an evaluation reads, normalized, by where it is read: the NYT
    editorials (perplexity windows and the WER speech: all of them, whatever the
    window count) and the movie-review test split of ``seed`` (zero-shot and probe)."""
    test = data.movie_reviews(seed=seed)["test"]["text"]
    return {"NYT editorials (perplexity, WER)": frozenset(_norm(s) for _, s in data.nyt_sentences()),
            "movie-review test split (zero-shot, probe)": frozenset(_norm(s) for s in test)}


@lru_cache(maxsize=4)
def training_texts(seed: int = 0) -> tuple[str, ...]:
    """The recovery's training sentences: Amazon reviews, tweets and the movie-review
    train split of ``seed``, each once, less any sentence an evaluation reads, in a
    seeded order (so a window of joined sentences mixes the three sources)."""
    folder = data.corpus_dir()
    pool = [t for name in TRAIN_FILES for _, _, t in data.read_ground_truth(folder / name)]
    pool += data.movie_reviews(seed=seed)["train"]["text"]
    held_out = frozenset().union(*evaluation_texts(seed).values())
    seen: set[str] = set()
    texts = []
    for t in pool:
        n = _norm(t)
        if n and n not in held_out and n not in seen:
            seen.add(n)
            texts.append(t)
    random.Random(seed).shuffle(texts)
    return tuple(texts)


def check_disjoint(texts, seed: int = 0) -> None:
    """Refuse training text that any evaluation reads (sentence level, case and
    spacing ignored), naming the first overlap and where it is evaluated."""
    train = {_norm(t) for t in texts}
    for where, held_out in evaluation_texts(seed).items():
        both = train & held_out
        if both:
            raise DataError(f"{len(both)} training sentence(s) are evaluated in the {where}, e.g. "
                            f"{sorted(both)[0][:60]!r}; train on training_texts() only")


# --------------------------------------------------------------------------- what each family trains on
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class DecoderTask:
    """Windows of ``rec_cfg.seqlen`` tokens of the joined training sentences, at
    seeded random starts, ``rec_cfg.batch_size`` per step. The engine's default
    loss applies (kd on the logits, or next-token)."""

    family: str = DECODER_ONLY
    corpus: str = "amazon+tweets+movie-train"
    seed: int = 0

    step_loss = None  # the engine's default: kd on the logits, or next-token

    def batches(self, lm, rec_cfg):
        ids = _decoder_tokens(lm.tokenizer, self.seed)
        if ids.numel() <= rec_cfg.seqlen:
            raise DataError(f"the training text has {ids.numel()} tokens, fewer than one window of {rec_cfg.seqlen}")
        gen = _generator(self.seed)
        for _ in range(rec_cfg.steps):
            starts = torch.randint(0, ids.numel() - rec_cfg.seqlen, (rec_cfg.batch_size,), generator=gen)
            yield {"input_ids": torch.stack([ids[s:s + rec_cfg.seqlen] for s in starts.tolist()])}


_TOKENS: dict = {}  # the training text tokenized, per tokenizer and seed: seconds for 16k sentences


def _decoder_tokens(tokenizer, seed: int) -> torch.Tensor:
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), seed)
    if key not in _TOKENS:
        text = " ".join(training_texts(seed))
        _TOKENS[key] = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return _TOKENS[key]


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, as :func:`lab_utils.core.evaluation.sentiment.mean_pooled` pools."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class EncoderTask:
    """Training sentences (at most ``rec_cfg.seqlen`` tokens each), drawn at seeded random
    until a step holds ``rec_cfg.batch_size`` x ``rec_cfg.seqlen`` tokens, the decoder's
    tokens per step: a sentence is short (about 20 tokens), and four sentences a step made a
    gradient so noisy that training moved the embeddings of other sentences further from the
    dense model's. The loss is 1 - the cosine between the student's and the dense model's
    mean-pooled embeddings, the quantity embedding fidelity averages."""

    family: str = ENCODER_ONLY
    corpus: str = "amazon+tweets+movie-train"
    seed: int = 0

    def batches(self, lm, rec_cfg):
        texts = training_texts(self.seed)
        gen = _generator(self.seed)
        budget = rec_cfg.batch_size * rec_cfg.seqlen
        for _ in range(rec_cfg.steps):
            chosen, used = [], 0
            while used < budget:
                i = int(torch.randint(0, len(texts), (1,), generator=gen))
                chosen.append(texts[i])
                used += len(lm.tokenizer(texts[i], truncation=True, max_length=rec_cfg.seqlen)["input_ids"])
            enc = lm.tokenizer(chosen, truncation=True, max_length=rec_cfg.seqlen, padding=True, return_tensors="pt")
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def step_loss(self, student_out, teacher_out, batch, cfg):
        mask = batch["attention_mask"]
        s = _pooled(student_out.last_hidden_state.float(), mask)
        t = _pooled(teacher_out.last_hidden_state.float(), mask)
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


@dataclass(frozen=True)
class WhisperTask:
    """``rec_cfg.batch_size`` training sentences per step, of a speakable length, spoken by
    espeak-ng and packed :data:`SPEECH_PER_CLIP` to a 30 s clip as the engine calibrates
    (none is an NYT sentence, which the WER set reads): a clip costs the encoder the same
    30 s whatever it holds. The decoder reads the transcript after Whisper's prompt
    (teacher forcing) and its logits are distilled (or trained on the next token),
    padding masked out."""

    family: str = ENCODER_DECODER
    corpus: str = "amazon+tweets+movie-train, speakable"
    per_clip: int = SPEECH_PER_CLIP
    voice: str = "en-us"
    seed: int = 0

    def batches(self, lm, rec_cfg):
        low, high = data.SPEAKABLE_WORDS  # under 30 s of speech each, as the WER sentences
        pool = [t for t in training_texts(self.seed) if low <= len(t.split()) <= high]
        gen = _generator(self.seed)
        prompt = asr.decoder_prompt(lm.tokenizer, lm.model.config)
        eos = lm.model.config.eos_token_id
        limit = lm.model.config.max_target_positions
        for _ in range(rec_cfg.steps):
            idx = torch.randint(0, len(pool), (rec_cfg.batch_size,), generator=gen).tolist()
            texts = [pool[i] for i in idx]
            refs, clips = data.pack(texts, data.speech(texts, self.voice), self.per_clip)
            feats = lm.feature_extractor(clips, sampling_rate=data.SAMPLE_RATE, return_tensors="pt").input_features
            seqs = [(prompt + lm.tokenizer(" " + r, add_special_tokens=False)["input_ids"] + [eos])[:limit]
                    for r in refs]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), eos, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            yield {"input_features": feats, "decoder_input_ids": ids, "decoder_attention_mask": mask}

    step_loss = None  # the engine's default: kd (or next-token) on the decoder's tokens, padding masked


def task_for(model_name: str, seed: int = 0):
    """The recovery task of a model's family, or None where none is built (a
    text encoder-decoder such as BART)."""
    spec = resolve(model_name, check_hub=False)
    if spec.family == DECODER_ONLY:
        return DecoderTask(seed=seed)
    if spec.family == ENCODER_ONLY:
        return EncoderTask(seed=seed)
    config = engine_config.hf_config(spec)
    return WhisperTask(seed=seed) if config.model_type == "whisper" else None


def supports(task, loss: str) -> bool:
    """Whether a task trains with ``loss``: an encoder has no next token to predict."""
    return task is not None and not (loss == "next-token" and isinstance(task, EncoderTask))


# --------------------------------------------------------------------------- what is recovered
@dataclass(frozen=True)
class Recovery:
    """One recovered setting: the pruned checkpoint (a notebook 04 setting) and the loss."""

    setting: benchmarks.Setting
    loss: str

    @property
    def name(self) -> str:
        s = self.setting
        shown = f"{s.method} {s.pattern}" if sparsify.parse_pattern(s.pattern)[0] else f"{s.method} {s.sparsity:.0%}"
        return f"{shown} + {self.loss}"


_SETTING = re.compile(r"^\s*(\w+)\s+(\d+:\d+|\d+(?:\.\d+)?%|0?\.\d+)\s*$")


def parse_setting(text: str) -> benchmarks.Setting:
    """``"wanda 50%"``, ``"wanda 0.5"`` or ``"sparsegpt 2:4"`` (the names the tables
    use) as a :class:`~lab_utils.experiments.benchmarks.Setting`; one clear error otherwise."""
    m = _SETTING.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a setting; write METHOD SPARSITY or METHOD N:M, "
                         f"e.g. 'wanda 50%' or 'sparsegpt 2:4'")
    method, amount = sparsify.check_method(m.group(1)), m.group(2)
    if ":" in amount:
        n, mm = sparsify.parse_pattern(amount)
        return benchmarks.Setting(method, sparsify.pattern_name(n, mm), n / mm)
    value = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
    s = sparsify.check_sparsity_ratio(value)
    if s == 0:
        raise ValueError(f"{text!r} prunes nothing: there is no gap to recover")
    return benchmarks.Setting(method, sparsify.UNSTRUCTURED, s)


@dataclass(frozen=True)
class RecoveryPlan:
    """Notebook 04's recovery parameters, checked when the plan is made: which pruned
    ``settings`` (``"wanda 50%"``, ``"sparsegpt 2:4"``) are recovered with the first of
    ``losses`` (the default, kd), the further losses (the ablations) run on the first
    setting of the first model only, so they compare at equal cost; and the engine's settings, the same for
    every loss (:meth:`config` drops those a loss ignores)."""

    settings: tuple = ("wanda 50%", "sparsegpt 2:4")
    losses: tuple = ("kd", "next-token", "lora")
    steps: int = 24
    batch_size: int = 4
    seqlen: int = 128
    lr: float = 2e-4
    schedule: str = "constant"
    temperature: float = 2.0
    hidden_weight: float = 0.0
    lora_rank: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self):
        """One ValueError opening with the field's name (``settings: ...``, ``lr must be ...``)."""
        object.__setattr__(self, "settings", tuple(self.settings))
        object.__setattr__(self, "losses", tuple(self.losses))
        bad = [x for x in self.losses if x not in LOSSES]
        if bad:
            raise ValueError(f"losses: {bad[0]!r} is not a recovery loss; choose from {', '.join(LOSSES)}")
        if len(set(self.losses)) != len(self.losses):
            raise ValueError(f"losses: {list(self.losses)} names a loss twice; list each once")
        if self.settings and not self.losses:
            raise ValueError("losses: [] names no loss; give at least one, e.g. ['kd']")
        for loss in LOSSES:  # the engine's own checks, one line each, also of a loss not run now
            self.config(loss)
        try:
            parsed = [parse_setting(s) for s in self.settings]
        except ValueError as e:
            raise ValueError(f"settings: {e}") from None
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"settings: {list(self.settings)} names a setting twice; list each once")

    def config(self, loss: str) -> recover.RecoveryConfig:
        """The engine's configuration of a recovery with ``loss``."""
        return recover.RecoveryConfig(loss, steps=self.steps, batch_size=self.batch_size, seqlen=self.seqlen,
                                      lr=self.lr, schedule=self.schedule, temperature=self.temperature,
                                      hidden_weight=self.hidden_weight, lora_rank=self.lora_rank, seed=self.seed,
                                      device=self.device, dtype=self.dtype)

    @property
    def recoveries(self) -> list[Recovery]:
        settings = [parse_setting(s) for s in self.settings]
        if not settings:
            return []
        return [Recovery(s, self.losses[0]) for s in settings] + [Recovery(settings[0], x) for x in self.losses[1:]]


# --------------------------------------------------------------------------- the method, one step
def _zeros_kept(state: str, model, W_mask: dict) -> dict:
    """How many of the pruned weights (``W_mask``) are still exactly 0 in ``model``."""
    weights = {pl.name: pl.weight.detach().cpu() for pl in prunable_layers(model)}
    pruned = sum(int(m.sum()) for m in W_mask.values())
    zero = sum(int((weights[name][m] == 0).sum()) for name, m in W_mask.items())
    return {"model state": state, "pruned weights": pruned, "still exactly 0": zero, "moved off 0": pruned - zero}


def _plain_step(student, teacher, batch: dict, task, cfg) -> None:
    """One AdamW step on every prunable matrix with nothing masked: what recovery must not do."""
    weights = list({id(pl.module.weight): pl.module.weight for pl in prunable_layers(student)}.values())
    for p in student.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.0)
    with torch.enable_grad():
        out = student(**batch)
        with torch.no_grad():
            ref = teacher(**batch)
        (task.step_loss or recover.default_step_loss)(out, ref, batch, cfg).backward()
    opt.step()


@memo.step("04-recovery-one-step")  # a rerun shows the table without training again
def one_step(model_name: str, plan: RecoveryPlan, cfg: benchmarks.BenchmarkConfig) -> pd.DataFrame:
    """The mask kept, shown: the checkpoint of the plan's first recovery, then one training
    step on one batch of its task two ways, a plain AdamW step and the lab's masked step
    (:func:`lab_utils.engine.recover.recover`, one step), and how many pruned weights each
    leaves exactly 0. Empty when the plan recovers nothing or the model has no task.
    Cached by its arguments like every step of the notebook."""
    task = task_for(model_name, cfg.bench.seed)
    if not plan.recoveries or task is None:
        return pd.DataFrame(columns=["model state", "pruned weights", "still exactly 0", "moved off 0"])
    first = plan.recoveries[0]
    rec_cfg = plan.config("kd" if first.loss == "lora" else first.loss).replace(steps=1)
    dense = load_model(model_name)
    lm, _ = checkpoints.pruned_model(dense, benchmarks.prune_config(first.setting, cfg))
    W_mask = recover.W_masks(lm.model)
    batch = next(task.batches(lm, rec_cfg))
    rows = [_zeros_kept("pruned checkpoint", lm.model, W_mask)]
    plain = copy.deepcopy(lm.model)
    _plain_step(plain, dense.model, batch, task, rec_cfg)
    rows.append(_zeros_kept("after one plain AdamW step", plain, W_mask))
    del plain
    recover.recover(lm.model, dense.model, [batch], rec_cfg, step_loss=task.step_loss)
    rows.append(_zeros_kept("after one masked step (the lab's)", lm.model, W_mask))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- measuring what it wins back
# The benchmark each family is measured on, and the one metric of it that the table reports.
METRIC_OF = {"perplexity": "perplexity", "sentiment-probe": "embedding fidelity", "wer": "WER"}
LOG_METRICS = ("perplexity",)  # a perplexity's gap is measured in log-perplexity (nats per token)


def gap_recovered(metric: str, dense: float, pruned: float, recovered: float) -> float:
    """The fraction of the pruned model's gap to dense that recovery closed: 0 = none,
    1 = all, below 0 = worse than pruned. Perplexities compare in log-perplexity, the
    loss they exponentiate (a ratio of perplexities is a difference of losses)."""
    if metric in LOG_METRICS:
        dense, pruned, recovered = math.log(dense), math.log(pruned), math.log(recovered)
    gap = pruned - dense
    return math.nan if gap == 0 else (pruned - recovered) / gap


def _recovered_path(key: str, benchmark: str, bench):
    h = files.key_hash("recovered-eval", EVAL_VERSION, benchmarks.EVAL_VERSION, key, benchmark,
                       sorted(benchmarks.bench_params(benchmark, bench).items()))
    return files.cache_dir() / "eval" / f"recovered-{benchmark}-{h}.json"


def evaluate_recovered(lm, key: str, benchmark: str, cfg: benchmarks.BenchmarkConfig) -> dict:
    """A recovered checkpoint's result on ``benchmark`` (as notebook 04 runs it, with the
    dense model's probe head for an encoder), cached under the checkpoint's ``key``."""
    path = _recovered_path(key, benchmark, cfg.bench)
    hit = files.cached_json(path)
    if hit is not None:
        return hit
    ctx = None
    if benchmark == "sentiment-probe":
        dense = benchmarks.Setting(benchmarks.DENSE, sparsify.UNSTRUCTURED, 0.0)
        ctx = benchmarks.probe_context(lm.spec, benchmarks.checkpoint_key(lm.spec, dense, cfg), cfg.bench)
    if cfg.device != "cpu":
        lm.model.to(cfg.device)
    result = benchmarks.run_benchmark(benchmark, lm, cfg.bench, ctx)
    files.store_json(path, result)
    return result


COLUMNS = ["model", "label", "family", "method", "pattern", "requested", "loss", "metric", "dense", "pruned",
           "recovered", "gap_recovered", "sparsity_before", "sparsity_after", "plain_merge_sparsity", "steps",
           "tokens", "seconds", "key"]
HISTORY_COLUMNS = ["model", "label", "setting", "loss", "step", "train_loss"]


def recovery_table(models, plan: RecoveryPlan,
                   cfg: benchmarks.BenchmarkConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Recover every model of ``models`` at every recovery of ``plan`` that its family
    supports, and measure it: (a row per recovered
    setting, :data:`COLUMNS`; the training loss of every step, :data:`HISTORY_COLUMNS`).

    The dense and pruned values are notebook 04's own (:func:`benchmarks.evaluate_model`,
    from its cache when the setting was benchmarked); the recovered checkpoint and its
    evaluation are cached too, so a rerun trains nothing.
    """
    rows, history = [], []
    ablations_run = False
    for model in models:
        task = task_for(model, cfg.bench.seed)  # the split seed: training avoids that test split
        # the ablations (every loss after the first) cost a whole recovery each: the first
        # model with a task runs them, the others run the default loss only
        todo = [r for r in plan.recoveries if supports(task, r.loss)
                and (r.loss == plan.losses[0] or not ablations_run)]
        if not todo:
            continue
        ablations_run = True
        spec = resolve(model)
        benchmark = benchmarks.benchmarks_for(spec)[0]
        metric = METRIC_OF[benchmark]
        dense = benchmarks.Setting(benchmarks.DENSE, sparsify.UNSTRUCTURED, 0.0)
        settings = list(dict.fromkeys(r.setting for r in todo))
        measured, _ = benchmarks.evaluate_model(model, [dense, *settings], cfg, executor="serial")
        teacher = load_model(model)  # loaded once: every recovery of this model copies it and reads it
        value = {(r["method"], r["pattern"], r["requested_sparsity"]): r for r in measured if r["metric"] == metric}
        base = value[(dense.method, dense.pattern, dense.sparsity)]["value"]
        for r in todo:
            s = r.setting
            pruned = value[(s.method, s.pattern, s.sparsity)]
            lm, run = recover.recovered_model(teacher, benchmarks.prune_config(s, cfg), plan.config(r.loss), task)
            got = evaluate_recovered(lm, run.key, benchmark, cfg)["metrics"][metric]
            del lm
            rows.append({"model": spec.name, "label": spec.label, "family": spec.family, "method": s.method,
                         "pattern": s.pattern, "requested": s.sparsity, "loss": r.loss, "metric": metric,
                         "dense": base, "pruned": pruned["value"], "recovered": got,
                         "gap_recovered": gap_recovered(metric, base, pruned["value"], got),
                         "sparsity_before": run.sparsity_before, "sparsity_after": run.sparsity_after,
                         # LoRA's pitfall: the sparsity left by peft's plain merge_and_unload()
                         "plain_merge_sparsity": (run.lora or {}).get("zero_fraction_plain_merge"),
                         "steps": run.steps, "tokens": run.tokens, "seconds": run.seconds, "key": run.key})
            history += [{"model": spec.name, "label": spec.label, "setting": r.name, "loss": r.loss,
                         "step": int(step), "train_loss": float(loss)} for step, loss in run.history]
        del teacher
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["plain_merge_sparsity"] = pd.to_numeric(table["plain_merge_sparsity"])
    return table, pd.DataFrame(history, columns=HISTORY_COLUMNS)
