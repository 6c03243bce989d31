"""Run every family's benchmarks on a model's dense and pruned checkpoints.

One tidy table comes out (:data:`COLUMNS`): a row per model, setting, metric and
zero-shot task, with the dense model's value and the relative change. The
benchmarks of a family (:func:`benchmarks_for`, each in :mod:`lab_utils.core.evaluation`):
``perplexity`` and ``zero-shot`` (a row per lm-eval task) for a decoder;
``sentiment-probe`` (a head trained once on the dense encoder: accuracy, F1,
embedding fidelity) for an encoder; ``wer`` for a speech model and ``denoising``
for a text encoder-decoder. Every evaluation is cached as checksummed JSON under
``cache_dir()/eval/``, keyed by the checkpoint key (computed without loading the
model, so a fully cached run loads nothing), the benchmark, its parameters and
:data:`EVAL_VERSION`.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lab_utils.core import data, files, sparsify
from lab_utils.core import formats as core_formats
from lab_utils.core.evaluation import asr, denoising, perplexity, sentiment, zeroshot
from lab_utils.core.evaluation.protocols import EvalConfig
from lab_utils.core.models import DECODER_ONLY, ENCODER_ONLY, ModelSpec, resolve
from lab_utils.engine import checkpoints
from lab_utils.engine import config as engine_config
from lab_utils.experiments import executor as ex
from lab_utils.experiments import file_sizes, sweep

EVAL_VERSION = 1  # part of every cache key: bump when a benchmark's numbers change
DENSE = "dense"


# --------------------------------------------------------------------------- what is measured
@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    tolerance: float  # "within X of dense": 5% for quality scores, 10% for perplexities


METRICS = {m.name: m for m in [
    Metric("perplexity", False, 0.10),
    Metric("zero-shot accuracy", True, 0.05),
    Metric("probe accuracy", True, 0.05),
    Metric("probe F1", True, 0.05),
    Metric("embedding fidelity", True, 0.05),
    Metric("WER", False, 0.05),
    Metric("denoising perplexity", False, 0.10),
    Metric("infill perplexity", False, 0.10),
]}


@dataclass(frozen=True)
class BenchmarkConfig:
    """Notebook 04's settings: the calibration of the pruned checkpoints (shared
    with notebook 03), the size of every benchmark, the lossless formats whose
    files are measured (None: no sizes) and where the work runs (resolved names:
    :func:`lab_utils.core.device.resolved`)."""

    nsamples: int = 16
    seqlen: int | None = 256
    seed: int = 0
    bench: EvalConfig = field(default_factory=EvalConfig)
    size_formats: tuple[str, ...] | None = None
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(frozen=True)
class Setting:
    method: str  # "dense" for the baseline
    pattern: str
    sparsity: float  # requested

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE


def settings(methods, patterns, sparsities) -> list[Setting]:
    """The dense baseline first, then every method x pattern x sparsity:
    each requested sparsity for ``unstructured``, N/M for an N:M pattern
    (:func:`lab_utils.experiments.sweep.settings`)."""
    return [Setting(*t) for t in sweep.settings(methods, patterns, sparsities)]


def benchmarks_for(spec: ModelSpec, config=None) -> list[str]:
    """The benchmarks of a model's family (Whisper: WER; BART-like: denoising)."""
    if spec.family == DECODER_ONLY:
        return ["perplexity", "zero-shot"]
    if spec.family == ENCODER_ONLY:
        return ["sentiment-probe"]
    config = config or engine_config.hf_config(spec)
    return ["wer"] if config.model_type == "whisper" else ["denoising"]


def bench_params(benchmark: str, bench: EvalConfig) -> dict:
    """The parameters a benchmark reads (its cache key)."""
    keys = {"perplexity": ("eval_windows", "eval_seqlen"),
            "zero-shot": ("sentiment_examples", "seed", "zeroshot_tasks"),
            "sentiment-probe": ("probe_train_examples", "probe_test_examples", "probe_max_length", "seed"),
            "wer": ("wer_utterances", "wer_per_window"),
            "denoising": ("denoise_sentences", "denoise_mask_ratio", "denoise_poisson_lambda", "seed")}[benchmark]
    out = {k: getattr(bench, k) for k in keys}
    if benchmark == "zero-shot":  # another harness version may score differently
        out["zeroshot_tasks"] = list(bench.zeroshot_tasks)
        out["harness"] = zeroshot.harness_version()
    if benchmark == "wer":  # the decoding budget changes a looping model's WER
        out["max_new_tokens"] = asr.MAX_NEW_TOKENS
    return out


# --------------------------------------------------------------------------- checkpoint keys
def prune_config(setting: Setting, cfg: BenchmarkConfig) -> engine_config.PruneConfig:
    """The pruning engine's config of one setting (the dense one: magnitude at 0)."""
    if setting.is_dense:
        return engine_config.PruneConfig("magnitude", 0.0, device=cfg.device, dtype=cfg.dtype)
    return engine_config.PruneConfig(setting.method, setting.sparsity, setting.pattern, nsamples=cfg.nsamples,
                                     seqlen=cfg.seqlen, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype)


def checkpoint_key(spec: ModelSpec, setting: Setting, cfg: BenchmarkConfig, config=None) -> str:
    """The key :func:`lab_utils.engine.checkpoints.pruned_model` gives this checkpoint,
    computed from the config alone (a test checks that they agree)."""
    return engine_config.checkpoint_key(spec, prune_config(setting, cfg), config)


def _eval_path(key: str, what: str, params: dict, suffix: str = ".json"):
    h = files.key_hash("eval", EVAL_VERSION, key, what, sorted(params.items()))
    return files.cache_dir() / "eval" / f"{what}-{h}{suffix}"


# --------------------------------------------------------------------------- benchmark data
def sentiment_splits(spec: ModelSpec, seed: int = 0):
    """(train, test) with text/label: the movie reviews for embedded and local
    models, GLUE SST-2 (train, validation) for the hub models."""
    if spec.source == "hub":
        ds = data.sst2()
        return ds["train"], ds["validation"]
    ds = data.movie_reviews(seed=seed)
    return ds["train"], ds["test"]


def subset(ds, n: int, seed: int = 0):
    """``n`` examples drawn by the lab's seeded rule (:func:`~lab_utils.core.evaluation.zeroshot.subset_indices`),
    kept in file order. (The first ``n`` would not do: the review file lists positive sentences first.)"""
    idx = zeroshot.subset_indices(len(ds), n, seed)
    return ds if idx is None else ds.select(idx)


def _load_array(path) -> np.ndarray | None:
    raw = files.read_checked(path)
    return None if raw is None else np.load(io.BytesIO(raw))


def _store_array(path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    files.write_checked(path, buf.getvalue())


@dataclass
class ProbeContext:
    """What every encoder is compared with: the head trained on the dense
    encoder, and the dense embeddings of the test sentences."""

    head: dict
    dense_test: np.ndarray
    test_labels: list[int]
    test_texts: list[str]


def probe_context(spec: ModelSpec, dense_key: str, bench: EvalConfig, dense_lm=None) -> ProbeContext:
    """The dense head and test embeddings, from the cache or computed once
    (loading the dense model if ``dense_lm`` is not given)."""
    params = bench_params("sentiment-probe", bench)
    head_path = _eval_path(dense_key, "probe-head", params)
    feat_path = _eval_path(dense_key, "probe-dense-test", params, ".npy")
    train, test = sentiment_splits(spec, bench.seed)
    test = subset(test, bench.probe_test_examples, bench.seed)
    head, dense_test = files.cached_json(head_path), _load_array(feat_path)
    if head is None or dense_test is None:
        if dense_lm is None:
            dense_lm, _ = checkpoints.pruned_model(spec.name, engine_config.PruneConfig("magnitude", 0.0))
        def feats(texts):
            return sentiment.mean_pooled(dense_lm.model, dense_lm.tokenizer, texts, bench.probe_max_length)
        train = subset(train, bench.probe_train_examples, bench.seed)
        head = sentiment.train_probe(feats(train["text"]), train["label"], seed=bench.seed)
        dense_test = feats(test["text"])
        files.store_json(head_path, head)
        _store_array(feat_path, dense_test)
    return ProbeContext(head, dense_test, list(test["label"]), list(test["text"]))


# --------------------------------------------------------------------------- one benchmark
def run_benchmark(benchmark: str, lm, bench: EvalConfig, ctx: ProbeContext | None = None,
                  key: str | None = None) -> dict:
    """Run one benchmark on a loaded model: {"metrics": {name: value}, "details": {...}},
    or, for a benchmark with tasks (zero-shot), {"rows": [a row per task], ...}.
    ``key`` (the checkpoint's) lets the perplexity come from the cache that the
    pruning sweep of notebook 03 fills with the same protocol."""
    t0 = time.perf_counter()
    if benchmark == "perplexity":
        r = perplexity.evaluate(lm, bench.eval_seqlen, bench.eval_windows, cache_key=key)
        # the seconds of the evaluation itself, also when it was read from the cache
        return {"metrics": {"perplexity": r["perplexity"]}, "details": r, "seconds": r["seconds"]}
    if benchmark == "zero-shot":
        tasks = zeroshot.zeroshot_accuracy(lm.model, lm.tokenizer, bench.zeroshot_tasks,
                                           n_examples=bench.sentiment_examples, seed=bench.seed)
        rows = [{"metric": "zero-shot accuracy", "task": t["task"], "value": t["accuracy"],
                 "stderr": t["stderr"], "n": t["n"], "harness_version": t["harness_version"]} for t in tasks]
        return {"metrics": {}, "rows": rows, "details": {"tasks": tasks}, "seconds": time.perf_counter() - t0}
    if benchmark == "sentiment-probe":
        if ctx is None:
            raise ValueError("the sentiment probe needs the dense head and embeddings (probe_context)")
        X = sentiment.mean_pooled(lm.model, lm.tokenizer, ctx.test_texts, bench.probe_max_length)
        r = sentiment.probe_scores(ctx.head, X, ctx.test_labels, ctx.dense_test)
        r["head_train_accuracy"] = ctx.head["train_accuracy"]
        metrics = {"probe accuracy": r["accuracy"], "probe F1": r["f1"], "embedding fidelity": r["fidelity"]}
    elif benchmark == "wer":
        r = asr.wer_benchmark(lm, bench.wer_utterances, bench.wer_batch_size, per_window=bench.wer_per_window)
        metrics = {"WER": r["wer"]}
    elif benchmark == "denoising":
        corpus = perplexity.default_corpus(lm.spec)
        sents = denoising.corpus_sentences(corpus, bench.denoise_sentences)
        r = denoising.denoising(lm.model, lm.tokenizer, sents, bench.denoise_mask_ratio,
                                bench.denoise_poisson_lambda, bench.seed)
        r["corpus"] = corpus
        metrics = {"denoising perplexity": r["perplexity"], "infill perplexity": r["infill_perplexity"]}
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    return {"metrics": metrics, "details": r, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- sweeps
def _size_entry(lm, pattern: str, formats, dense_file_bytes: int | None = None) -> dict:
    """The smallest lossless file among ``formats``, each written and measured
    on disk by :func:`lab_utils.experiments.file_sizes.model_sizes`.

    A pruned model saved densely keeps its zeros, so its plain ``dense`` file
    is exactly as large as the dense model's: pass that size as
    ``dense_file_bytes`` and the (slow) write is skipped.
    """
    nm = sparsify.parse_pattern(pattern)[0]
    fmts = [f for f in formats if core_formats.parse_format(f).lossless
            and (core_formats.parse_format(f).layout != "nm" or nm)
            and not (f == "dense" and dense_file_bytes is not None)]
    measured = {}
    if fmts:
        table = file_sizes.model_sizes(lm.model, fmts, pattern=pattern)
        measured = {str(f): int(b) for f, b in zip(table.format, table.file_bytes, strict=True)}
    if dense_file_bytes is not None:
        measured["dense"] = int(dense_file_bytes)
    best = min(measured, key=lambda f: (measured[f], f))
    return {"format": best, "file_bytes": measured[best], "dense_file_bytes": measured.get("dense"),
            "formats": measured}


def evaluate_model(model_name: str, setting_list: list[Setting], cfg: BenchmarkConfig,
                   workers: int | None = None, executor: str | ex.Executor = ex.LOCAL,
                   resources: dict[str, float] | None = None) -> tuple[list[dict], list[dict]]:
    """All benchmarks of one model on every setting: (metric rows, size rows).

    A checkpoint is loaded (and pruned) only when one of its results is missing
    from the cache. The dense setting (the first) is evaluated here first: its
    file size is every other's baseline and the probe's head is trained on it.
    The other settings are jobs on ``executor`` (by default ``workers``
    processes of one thread each: much of an evaluation, such as Whisper's
    token-by-token decoding, runs on one core), so each result's ``seconds`` is
    its wall time with the other evaluations running beside it.
    """
    returned = _run_settings(_dense_first(model_name, setting_list, cfg), cfg, workers, executor, resources)
    return _model_rows(model_name, setting_list, cfg, returned)


def _dense_first(model_name: str, setting_list: list[Setting], cfg: BenchmarkConfig) -> list[dict]:
    """Evaluate the dense setting here (what the cache lacks of it); the jobs of the
    other settings whose results the cache lacks."""
    spec = resolve(model_name)
    config = engine_config.hf_config(spec)
    if not setting_list or not setting_list[0].is_dense:
        raise ValueError("the settings start with the dense baseline (see settings())")
    _evaluate_setting(model_name, setting_list[0], cfg, None)
    dense_bytes = _read_entries(spec, setting_list[0], cfg, config)[1].get("dense_file_bytes")
    return [{"model_name": model_name, "setting": s, "cfg": cfg, "dense_file_bytes": dense_bytes}
            for s in setting_list[1:] if not _complete(_read_entries(spec, s, cfg, config))]


def _run_settings(jobs: list[dict], cfg: BenchmarkConfig, workers: int | None, executor: str | ex.Executor,
                  resources: dict[str, float] | None = None) -> dict:
    """:func:`evaluate_job` of every job, as one batch on ``executor``:
    {(model name, setting): what the job found in the cache it wrote}."""
    try:
        evaluated = ex.run_jobs(
            evaluate_job, jobs, executor, workers=workers,
            resources=resources if resources is not None else ex.accelerator_resources(cfg.device),
            desc="settings",
            describe=lambda j: f"evaluating {resolve(j['model_name']).label} ({j['setting'].method}, "
                               f"{j['setting'].pattern}, {j['setting'].sparsity:g})")
    except ex.JobError as e:
        raise RuntimeError(str(e)) from e
    finally:
        sweep.release()  # jobs run here (serial) leave their model behind
    return {(j["model_name"], j["setting"]): r for j, r in zip(jobs, evaluated, strict=True)}


def _model_rows(model_name: str, setting_list: list[Setting], cfg: BenchmarkConfig,
                returned: dict) -> tuple[list[dict], list[dict]]:
    """(metric rows, size rows) of one model, from ``returned`` or the cache."""
    spec = resolve(model_name)
    config = engine_config.hf_config(spec)
    rows, sizes = [], []
    for setting in setting_list:
        entries = returned.get((model_name, setting)) or _read_entries(spec, setting, cfg, config)
        if not _complete(entries):
            raise RuntimeError(f"the evaluation of {spec.label} {setting} left no result in the cache")
        info, size, results = entries
        base = {"model": spec.name, "label": spec.label, "family": spec.family,
                "method": setting.method, "pattern": setting.pattern,
                "requested_sparsity": setting.sparsity, "actual_sparsity": info["actual_sparsity"]}
        key = checkpoint_key(spec, setting, cfg, config)
        for b, result in results.items():
            for r in metric_rows(result):
                rows.append({**base, "benchmark": b, **r, "seconds": result["seconds"],
                             "prune_seconds": info["prune_seconds"], "key": key})
        if cfg.size_formats:
            sizes.append({**base, "format": size["format"], "file_bytes": size["file_bytes"],
                          "dense_file_bytes": size["dense_file_bytes"]})
    return rows, sizes


def _paths(spec: ModelSpec, setting: Setting, cfg: BenchmarkConfig, config) -> tuple:
    """(checkpoint key, info path, size path or None, {benchmark: path}) of one setting."""
    key = checkpoint_key(spec, setting, cfg, config)
    paths = {b: _eval_path(key, b, bench_params(b, cfg.bench)) for b in benchmarks_for(spec, config)}
    size_path = _eval_path(key, "size", {"formats": list(cfg.size_formats or []),
                                         "storage": f"{core_formats.FILE_VERSION}"}) if cfg.size_formats else None
    return key, _eval_path(key, "checkpoint", {}), size_path, paths


def _read_entries(spec: ModelSpec, setting: Setting, cfg: BenchmarkConfig, config) -> tuple:
    """(info, size, {benchmark: result}) of one setting as the cache has them,
    None for each one missing (size is {} when no sizes are measured)."""
    _, info_path, size_path, paths = _paths(spec, setting, cfg, config)
    size = files.cached_json(size_path) if size_path else {}
    return files.cached_json(info_path), size, {b: files.cached_json(p) for b, p in paths.items()}


def _complete(entries: tuple) -> bool:
    info, size, results = entries
    return info is not None and size is not None and all(r is not None for r in results.values())


def _evaluate_setting(model_name: str, setting: Setting, cfg: BenchmarkConfig, dense_file_bytes: int | None) -> None:
    """Compute whatever the cache lacks for one setting, and store it."""
    spec = resolve(model_name)
    config = engine_config.hf_config(spec)
    key, info_path, size_path, paths = _paths(spec, setting, cfg, config)
    entries = _read_entries(spec, setting, cfg, config)
    if _complete(entries):
        return
    _, size, results = entries
    # a pruned setting prunes a copy of the dense model that this process holds (a worker
    # evaluates several settings of a model in turn); the dense one is loaded on its own, as the
    # benchmarks then run on it
    lm, report = checkpoints.pruned_model(model_name if setting.is_dense else sweep.dense_model(model_name),
                                          prune_config(setting, cfg))
    if cfg.device != "cpu":  # the engine returns the model in host memory; evaluate it on the device
        lm.model.to(cfg.device)
    if report.key != key:  # the engine changed its key: do not file results under a wrong one
        raise RuntimeError(f"checkpoint key {report.key} of the pruning engine differs from "
                           f"{key} computed here; update benchmarks.checkpoint_key")
    files.store_json(info_path, {"actual_sparsity": report.actual_sparsity,
                                 "actual_sparsity_total": report.actual_sparsity_total,
                                 "nm_verified": report.nm_verified, "prune_seconds": report.seconds})
    if size is None:
        files.store_json(size_path, _size_entry(lm, setting.pattern, cfg.size_formats,
                                             None if setting.is_dense else dense_file_bytes))
    ctx = None
    if "sentiment-probe" in paths:
        dense_key = checkpoint_key(spec, Setting(DENSE, sparsify.UNSTRUCTURED, 0.0), cfg, config)
        ctx = probe_context(spec, dense_key, cfg.bench, lm if setting.is_dense else None)
    for b, p in paths.items():
        if results[b] is None:
            files.store_json(p, run_benchmark(b, lm, cfg.bench, ctx, key=key))


def evaluate_job(model_name: str, setting: Setting, cfg: BenchmarkConfig, dense_file_bytes: int | None) -> tuple:
    """One setting of :func:`evaluate_model`, in a worker: the results go to the cache, and
    come back as the cache then holds them (:func:`_read_entries`)."""
    _evaluate_setting(model_name, setting, cfg, dense_file_bytes)
    spec = resolve(model_name)
    return _read_entries(spec, setting, cfg, engine_config.hf_config(spec))


COLUMNS = ["model", "label", "family", "method", "pattern", "requested_sparsity", "actual_sparsity",
           "benchmark", "metric", "task", "value", "stderr", "n", "harness_version", "dense_value",
           "relative_change", "higher_is_better", "seconds", "prune_seconds", "key"]


def metric_rows(result: dict) -> list[dict]:
    """The table rows of one stored result: a benchmark with tasks (zero-shot)
    gives a row per task with its standard error, n and harness version; the
    others a row per metric with those left empty (task "")."""
    empty = {"task": "", "stderr": math.nan, "n": math.nan, "harness_version": ""}
    if "rows" in result:
        return [{**empty, **r} for r in result["rows"]]
    # in METRICS order: a cached entry comes back with its keys sorted
    return [{**empty, "metric": m, "value": result["metrics"][m]}
            for m in sorted(result["metrics"], key=list(METRICS).index)]


def add_dense(df: pd.DataFrame) -> pd.DataFrame:
    """Dense value and relative change ((value - dense) / dense) per model,
    metric and task (a table without a task column gets one, all "")."""
    df = df.copy()
    df["task"] = df["task"].fillna("") if "task" in df else ""
    dense = df[df.method == DENSE].set_index(["model", "metric", "task"])["value"]
    df["dense_value"] = [dense.get((m, k, t), math.nan)
                         for m, k, t in zip(df.model, df.metric, df.task, strict=True)]
    with np.errstate(divide="ignore", invalid="ignore"):
        df["relative_change"] = (df.value - df.dense_value) / df.dense_value.abs()
    df["higher_is_better"] = [METRICS[m].higher_is_better for m in df.metric]
    return df


def benchmark_table(models, methods, patterns, sparsities, cfg: BenchmarkConfig | None = None,
                    workers: int | None = None,
                    executor: str | ex.Executor = ex.LOCAL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy benchmark table of every model (dense rows first per model)
    and, when ``cfg.size_formats`` is set, the file size of every checkpoint;
    the pruned settings of all models are one batch of jobs on ``executor`` (see
    :func:`evaluate_model`)."""
    cfg = cfg or BenchmarkConfig()
    setting_list = settings(methods, patterns, sparsities)
    # every model's dense setting here first, then the other settings of all models as one
    # batch: a local cluster starts once (its workers import torch and the lab anew)
    jobs = [job for model_name in models for job in _dense_first(model_name, setting_list, cfg)]
    returned = _run_settings(jobs, cfg, workers, executor)
    rows, sizes = [], []
    for model_name in models:
        r, s = _model_rows(model_name, setting_list, cfg, returned)
        rows += r
        sizes += s
    return add_dense(pd.DataFrame(rows))[COLUMNS], pd.DataFrame(sizes)
