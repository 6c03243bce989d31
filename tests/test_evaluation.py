"""Benchmarks of lab_utils.evaluation (sentiment, asr, denoising, benchmarks,
summary) on tiny models, hand-made features, and one real Whisper check."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from lab_utils.core import files, models
from lab_utils.core.evaluation import asr, denoising, sentiment, zeroshot
from lab_utils.core.evaluation.protocols import EvalConfig
from lab_utils.engine import checkpoints
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments import benchmarks, throughput
from lab_utils.presentation import benchmarks_view
from lab_utils.report import params


def _tokenizer():
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


# --------------------------------------------------------------------------- probe
def test_probe_on_separable_features_reaches_full_accuracy():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    X = rng.normal(size=(400, 16))
    y = (X @ direction > 0).astype(int)
    X += np.outer(2 * y - 1, direction) * 1.0  # a margin of 2 between the classes
    head = sentiment.train_probe(X[:300], y[:300])
    assert head["train_accuracy"] == 1.0
    out = sentiment.probe_scores(head, X[300:], y[300:], X_dense=X[300:])
    assert out["accuracy"] == 1.0 and out["f1"] == 1.0 and out["fidelity"] == pytest.approx(1.0)
    # the cached head is plain JSON and predicts the same after a round trip
    again = json.loads(json.dumps(head))
    assert (sentiment.probe_predict(again, X[300:]) == y[300:]).all()


def test_probe_on_random_labels_is_near_chance():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(2000, 8)), rng.integers(0, 2, 2000)
    head = sentiment.train_probe(X[:1000], y[:1000])
    acc = sentiment.probe_scores(head, X[1000:], y[1000:])["accuracy"]
    assert 0.42 < acc < 0.58


def test_probe_refuses_features_of_another_width_and_a_single_class():
    head = sentiment.train_probe(np.eye(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="width 3"):
        sentiment.probe_predict(head, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="two classes"):
        sentiment.train_probe(np.eye(3), [1, 1, 1])


def test_cosine_fidelity_known_values():
    X = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert sentiment.cosine_fidelity(X, X) == pytest.approx(1.0)
    assert sentiment.cosine_fidelity(-X, X) == pytest.approx(-1.0)
    assert sentiment.cosine_fidelity(X[:, ::-1], X) == pytest.approx((0 + 0 + 1) / 3)
    assert sentiment.cosine_fidelity(np.zeros_like(X), X) == 0.0  # a dead encoder scores 0


def test_mean_pooling_ignores_padding(tiny_dirs):
    lm = models.load_model(str(tiny_dirs["bert"]))
    short, long = "good movie", "the plot of this long film was very bad and the acting was bad"
    alone = sentiment.mean_pooled(lm.model, lm.tokenizer, [short])
    batched = sentiment.mean_pooled(lm.model, lm.tokenizer, [long, short])
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)
    assert not np.allclose(batched[0], batched[1])


# --------------------------------------------------------------------------- zero-shot
def test_zero_shot_benchmark_is_a_row_per_harness_task(tiny_dirs):
    lm = models.load_model(str(tiny_dirs["llama"]))
    bp = EvalConfig(sentiment_examples=8, seed=0, zeroshot_tasks=["lab_sentiment"])
    assert bp.zeroshot_tasks == ("lab_sentiment",)  # a list from a parameter file becomes a tuple
    out = benchmarks.run_benchmark("zero-shot", lm, bp)
    rows = benchmarks.metric_rows(out)
    assert [(r["metric"], r["task"], r["n"]) for r in rows] == [("zero-shot accuracy", "lab_sentiment", 8)]
    acc, n = rows[0]["value"], rows[0]["n"]
    assert round(acc * n) == pytest.approx(acc * n)  # a share of the 8 reviews
    # lm-eval's standard error of a mean of 0/1 scores (sample variance), not a bootstrap
    assert rows[0]["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert rows[0]["harness_version"] == zeroshot.harness_version()
    # the task list and the harness version are part of the cache key
    key = benchmarks.bench_params("zero-shot", bp)
    assert key["zeroshot_tasks"] == ["lab_sentiment"] and key["harness"] == zeroshot.harness_version()
    # a benchmark without tasks keeps one row per metric, the task columns empty
    [plain] = benchmarks.metric_rows({"metrics": {"perplexity": 12.0}})
    assert (plain["metric"], plain["value"], plain["task"], plain["harness_version"]) == ("perplexity", 12.0, "", "")
    assert math.isnan(plain["stderr"]) and math.isnan(plain["n"])


def test_bad_zeroshot_tasks_fail_with_one_clear_line():
    with pytest.raises(ValueError, match="^zeroshot_tasks: no zero-shot task named"):
        EvalConfig(zeroshot_tasks=[])


# --------------------------------------------------------------------------- speech
def test_normalizer_applies_the_same_rules_to_both_sides():
    ref = "It's mainly a holiday celebration - toys for Mr. Smith!"
    hyp = "it is mainly a holiday celebration, toys for mister smith"
    assert asr.normalize(ref) == asr.normalize(hyp)
    assert asr.wer([ref], [hyp])["wer"] == 0.0
    assert asr.wer([ref], ["it is mainly a holiday"])["deletions"] == 5


def test_whisper_wer_path_on_the_tiny_model(tiny_dirs):
    lm = models.load_model(str(tiny_dirs["whisper"]))
    assert asr.decoder_prompt(lm.tokenizer, lm.model.config) == [lm.model.config.decoder_start_token_id]
    out = asr.wer_benchmark(lm, n_utterances=2, max_new_tokens=8)
    assert out["n"] == 2 and out["reference_words"] > 0
    assert 0.0 <= out["wer"] < math.inf


@pytest.mark.slow
def test_real_whisper_transcribes_a_synthesized_sentence():
    from lab_utils.core import data

    lm = models.load_model("whisper-tiny-en")
    assert asr.decoder_prompt(lm.tokenizer, lm.model.config) == [50257, 50362]
    text = "The government will publish the new budget next week."
    hyp = asr.transcribe(lm.model, lm.feature_extractor, lm.tokenizer, data.speech([text]))
    assert asr.wer([text], hyp)["wer"] < 0.5, hyp


# --------------------------------------------------------------------------- denoising
def test_text_infilling_masks_thirty_percent_in_poisson_spans():
    ids = list(range(100, 200))
    rng = np.random.default_rng(3)
    out, masked = denoising.text_infilling(ids, mask_id=4, rng=rng)
    assert masked.sum() == 30
    runs = int(masked[0]) + int(np.sum(masked[1:] & ~masked[:-1]))
    inserted = out.count(4) - runs  # zero-length spans add a mask without removing anything
    assert inserted >= 0
    assert len(out) == len(ids) - 30 + runs + inserted
    kept = [t for t in out if t != 4]
    assert kept == [t for t, m in zip(ids, masked, strict=True) if not m]
    again, _ = denoising.text_infilling(ids, 4, rng=np.random.default_rng(3))
    assert again == out  # the same corruption for every model


def test_denoising_on_the_tiny_bart(tiny_dirs):
    from tiny_models import WORDS

    lm = models.load_model(str(tiny_dirs["bart"]))
    sents = [" ".join(WORDS[i:i + 12]) for i in range(0, 40, 5)]
    out = denoising.denoising(lm.model, lm.tokenizer, sents)
    assert out["tokens"] == sum(len(lm.tokenizer(s)["input_ids"]) for s in sents)
    assert out["masked_tokens"] == sum(round(0.3 * len(lm.tokenizer(s, add_special_tokens=False)["input_ids"]))
                                       for s in sents)
    # a random tiny model is near uniform over its 64-word vocabulary
    assert 10 < out["perplexity"] < 300 and 10 < out["infill_perplexity"] < 300
    assert denoising.split_sentences(" = Title = \nOne two three four five six seven eight. "
                                     "Nine ten eleven twelve thirteen fourteen fifteen sixteen.")[1] \
        .startswith("Nine")


# --------------------------------------------------------------------------- runner
def test_settings_put_dense_first_and_nm_at_its_own_sparsity():
    s = benchmarks.settings(["magnitude", "wanda"], ["unstructured", "2:4"], [0.7, 0.5])
    assert s[0] == benchmarks.Setting("dense", "unstructured", 0.0)
    assert len(s) == 1 + 2 * 2 + 2
    assert {x.sparsity for x in s if x.pattern == "2:4"} == {0.5}
    assert [x.sparsity for x in s if x.method == "wanda" and x.pattern == "unstructured"] == [0.5, 0.7]


@pytest.mark.parametrize("kind,method,seqlen", [("llama", "magnitude", 16), ("llama", "wanda", 16),
                                                ("llama", "wanda", None), ("whisper", "wanda", 16)])
def test_checkpoint_key_matches_the_pruning_engine(tiny_dirs, eval_cache, kind, method, seqlen):
    name = str(tiny_dirs[kind])
    spec = models.resolve(name)
    cfg = benchmarks.BenchmarkConfig(nsamples=2, seqlen=seqlen, seed=0)
    for setting in (benchmarks.Setting("dense", "unstructured", 0.0),
                    benchmarks.Setting(method, "unstructured", 0.5)):
        m = "magnitude" if setting.is_dense else setting.method
        _, report = checkpoints.pruned_model(name, PruneConfig(m, setting.sparsity, nsamples=2, seqlen=seqlen, seed=0))
        assert benchmarks.checkpoint_key(spec, setting, cfg) == report.key


SMALL = EvalConfig(eval_windows=2, eval_seqlen=16, sentiment_examples=8, probe_train_examples=40,
                   probe_test_examples=12, wer_utterances=2, denoise_sentences=4)


@pytest.mark.slow  # worker processes evaluate every setting (make test-fast leaves it out)
def test_benchmark_table_has_every_setting_and_a_cached_rerun_loads_nothing(tiny_dirs, external, cluster_cache,
                                                                             monkeypatch):
    from lab_utils.experiments import executor

    names = [str(tiny_dirs[k]) for k in ("llama", "bert", "bart")]
    cfg = benchmarks.BenchmarkConfig(nsamples=2, seqlen=16, bench=SMALL, size_formats=("dense", "bitmask+zstd"))
    # the session's cluster (two one-thread workers) for the three models' jobs
    with executor.open_executor(external.address, announce=False) as local:
        df, sizes = benchmarks.benchmark_table(names, ["magnitude", "wanda"], ["unstructured", "2:4"], [0.5],
                                               cfg, executor=local)
    per_model = {"decoder-only": 2, "encoder-only": 3, "encoder-decoder": 2}  # metrics (tasks) per setting
    n_settings = 1 + 2 * 2
    for name in names:
        g = df[df.model == name]
        assert len(g) == n_settings * per_model[g.family.iloc[0]]
        assert g.iloc[0].method == "dense" and g.index[0] == df.index[df.model == name][0]
        assert set(zip(g.method, g.pattern, g.requested_sparsity, strict=True)) == {
            (s.method, s.pattern, s.sparsity) for s in benchmarks.settings(["magnitude", "wanda"],
                                                                          ["unstructured", "2:4"], [0.5])}
    assert (df[df.method == "dense"].relative_change.dropna() == 0).all()
    sparse = df[df.method != "dense"]
    assert np.allclose(sparse.actual_sparsity, sparse.requested_sparsity, atol=0.02)
    assert len(sizes) == n_settings * len(names)
    assert (sizes[sizes.requested_sparsity > 0].file_bytes < sizes[sizes.requested_sparsity > 0].dense_file_bytes).all()
    path = files.write_csv(df, "benchmarks.csv", float_format="%.6g")
    assert pd.read_csv(path).shape == df.shape

    def no_loading(*a, **k):
        raise AssertionError("a cached rerun must not load or prune a model")

    monkeypatch.setattr(checkpoints, "pruned_model", no_loading)
    df2, sizes2 = benchmarks.benchmark_table(names, ["magnitude", "wanda"], ["unstructured", "2:4"], [0.5],
                                             cfg)
    pd.testing.assert_frame_equal(df, df2)
    pd.testing.assert_frame_equal(sizes, sizes2)


def test_probe_head_is_trained_on_the_dense_encoder_only(tiny_dirs, eval_cache, monkeypatch):
    calls = []
    real = sentiment.train_probe
    monkeypatch.setattr(sentiment, "train_probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = benchmarks.BenchmarkConfig(nsamples=2, seqlen=16, bench=SMALL)
    # every setting in this process, where the count sees a head trained for a pruned one too
    df, _ = benchmarks.benchmark_table([str(tiny_dirs["bert"])], ["magnitude"], ["unstructured"], [0.3, 0.6], cfg,
                                       executor="serial")
    assert len(calls) == 1
    fid = df[df.metric == "embedding fidelity"].set_index("requested_sparsity").value
    assert fid[0.0] == pytest.approx(1.0) and fid[0.6] < 1.0


def test_hub_encoders_use_glue_sst2_train_and_validation(monkeypatch):
    import datasets

    from lab_utils.core import data

    fake = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": [f"{k} {i}" for i in range(4)],
                                                                "label": [0, 1, 0, 1]})
                                 for k in ("train", "validation", "test")})
    monkeypatch.setattr(data, "sst2", lambda: fake)
    spec = models.resolve("bert-large", check_hub=False)
    train, test = benchmarks.sentiment_splits(spec)
    assert train["text"][0] == "train 0" and test["text"][0] == "validation 0"
    local = models.ModelSpec("x", models.ENCODER_ONLY, "x", "local", "sentiment-probe", "/x")
    train, test = benchmarks.sentiment_splits(local)
    assert len(test) == len(data.movie_reviews()["test"])


def test_bad_benchmark_sizes_fail_with_one_clear_line():
    with pytest.raises(ValueError, match="^eval_windows must be a positive integer, got 0$"):
        EvalConfig(eval_windows=0)
    with pytest.raises(ValueError, match="denoise_mask_ratio.*fraction"):
        EvalConfig(denoise_mask_ratio=1.0)
    values = {"nsamples": 16, "seqlen": 256, "seed": 0}
    with pytest.raises(params.ParamError, match="^size_formats: 'bitmask-int8' is lossy"):
        params.benchmark_config({**values, "size_formats": ["bitmask-int8"]})
    cfg = params.benchmark_config({**values, "size_formats": ["bitmask+zstd"]})
    assert cfg.size_formats == ("dense", "bitmask+zstd")


# --------------------------------------------------------------------------- summary
def _table(values: dict) -> pd.DataFrame:
    """A hand-made tidy table: {(method, pattern, sparsity): perplexity}."""
    rows = [{"model": "m", "label": "M", "family": "decoder-only", "method": meth, "pattern": pat,
             "requested_sparsity": sp, "actual_sparsity": sp, "benchmark": "perplexity",
             "metric": "perplexity", "value": v, "seconds": 0.0, "prune_seconds": 0.0, "key": "k"}
            for (meth, pat, sp), v in values.items()]
    return benchmarks.add_dense(pd.DataFrame(rows))


def test_reach_and_paragraph_follow_the_numbers():
    base = {("dense", "unstructured", 0.0): 10.0, ("magnitude", "unstructured", 0.3): 10.5,
            ("magnitude", "unstructured", 0.5): 14.0, ("wanda", "unstructured", 0.3): 10.2,
            ("wanda", "unstructured", 0.5): 10.9, ("magnitude", "2:4", 0.5): 30.0, ("wanda", "2:4", 0.5): 20.0}
    reach = benchmarks_view.reach_table(_table(base)).set_index("method")
    assert reach.loc["magnitude", "max_sparsity_within"] == 0.3  # 14.0 is 40% above dense
    assert reach.loc["wanda", "max_sparsity_within"] == 0.5  # 10.9 is within 10%
    text = benchmarks_view.family_paragraph(_table(base), "decoder-only")
    assert "magnitude up to 30%" in text and "wanda up to 50%" in text
    assert "at 50% unstructured, wanda" in text and "at 2:4, wanda" in text
    flipped = dict(base)
    flipped[("magnitude", "2:4", 0.5)] = 15.0
    flipped[("wanda", "unstructured", 0.3)] = 12.0
    text = benchmarks_view.family_paragraph(_table(flipped), "decoder-only")
    assert "at 2:4, magnitude" in text and "wanda up to 0%" not in text and "wanda up to 50%" in text
    flipped[("wanda", "unstructured", 0.5)] = 11.5
    assert "wanda at none of them" in benchmarks_view.family_paragraph(_table(flipped), "decoder-only")


def test_two_zero_shot_tasks_stay_apart_in_every_summary():
    acc = {("dense", "unstructured", 0.0): (0.80, 0.60), ("wanda", "unstructured", 0.5): (0.79, 0.40),
           ("magnitude", "unstructured", 0.5): (0.60, 0.59)}
    rows = [{"model": "m", "label": "M", "family": "decoder-only", "method": meth, "pattern": pat,
             "requested_sparsity": sp, "actual_sparsity": sp, "benchmark": "zero-shot",
             "metric": "zero-shot accuracy", "task": task, "value": v[k], "stderr": 0.03}
            for (meth, pat, sp), v in acc.items() for k, task in enumerate(("lab_sentiment", "boolq"))]
    df = benchmarks.add_dense(pd.DataFrame(rows))
    assert df.set_index(["method", "task"]).dense_value[("wanda", "boolq")] == 0.60
    reach = benchmarks_view.reach_table(df).set_index(["task", "method"]).max_sparsity_within
    assert reach[("lab_sentiment", "wanda")] == 0.5 and reach[("boolq", "wanda")] == 0.0
    assert reach[("lab_sentiment", "magnitude")] == 0.0 and reach[("boolq", "magnitude")] == 0.5
    t = benchmarks_view.summary_table(df).set_index("metric")
    assert t.loc["zero-shot accuracy (lab_sentiment)", "dense"] == "80.0%"
    assert t.loc["zero-shot accuracy (boolq)", "dense"] == "60.0%"
    assert t.loc["zero-shot accuracy (lab_sentiment)", "best at 50%"].startswith("wanda (79.0%")
    assert t.loc["zero-shot accuracy (boolq)", "best at 50%"].startswith("magnitude (59.0%")
    assert "at 50% unstructured, wanda" in benchmarks_view.family_paragraph(df, "decoder-only")
    assert list(benchmarks_view.wide_table(df, "m").columns) == ["zero-shot accuracy (lab_sentiment)",
                                                                 "zero-shot accuracy (boolq)"]


def test_figures_are_written_deterministically(tmp_output):
    base = {("dense", "unstructured", 0.0): 10.0, ("magnitude", "unstructured", 0.5): 14.0,
            ("wanda", "unstructured", 0.5): 11.0, ("wanda", "2:4", 0.5): 20.0}
    df = _table(base)
    a = benchmarks_view.metric_figure(df, "m").read_bytes()
    b = benchmarks_view.metric_figure(df, "m").read_bytes()
    assert a == b and a[:4] == b"\x89PNG"
    sizes = df[df.metric == "perplexity"][["model", "method", "pattern", "requested_sparsity"]].assign(
        format="bitmask+zstd", file_bytes=[100, 60, 61, 59], dense_file_bytes=120)
    assert benchmarks_view.size_figure(df, sizes, "m").is_file()


# --------------------------------------------------------------------------- notebook 04 (smoke run)
@pytest.mark.slow  # the smoke report
def test_smoke_run_writes_a_row_for_every_requested_setting(smoke_report):
    out, proc = smoke_report
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = yaml.safe_load(open("params/smoke.yaml"))
    p = {**{k: v for k, v in data.items() if k != "notebooks"}, **data["notebooks"]["04_benchmarks"]}
    df = pd.read_csv(out / "results" / "benchmarks.csv")
    want = benchmarks.settings(p["methods"], p["patterns"], p["sparsities"])
    for model in p["models"]:
        g = df[df.model == model]
        assert g.iloc[0].method == "dense"
        got = set(zip(g.method, g.pattern, g.requested_sparsity.round(6), strict=True))
        assert got == {(s.method, s.pattern, round(s.sparsity, 6)) for s in want}
        assert g.value.notna().all()
    z = df[df.benchmark == "zero-shot"]  # the decoder's: a row per lm-eval task and setting
    assert set(z.task) == {"lab_sentiment"} and len(z) == len(want)
    assert (z.n == p["sentiment_examples"]).all() and (z.stderr > 0).all()
    assert set(z.harness_version) == {zeroshot.harness_version()}


def test_speed_sentence_follows_the_rows():
    base = {"model": "m", "label": "Tiny", "dense_tokens_per_s": 1000.0, "threads": 2, "repeats": 3,
            "load_avg": 1.0, "flop_limit": 2.0, "layers": 4}
    rows = pd.DataFrame([
        base | {"sparsity": 0.5, "csr_layers": 0, "fell_back": False, "checked_speedup": math.nan,
                "sparse_aware_tokens_per_s": 1000.0, "sparse_aware_speedup": 1.0},
        base | {"sparsity": 0.8, "csr_layers": 0, "fell_back": True, "checked_speedup": 0.93,
                "sparse_aware_tokens_per_s": 1000.0, "sparse_aware_speedup": 1.0},
        base | {"sparsity": 0.9, "csr_layers": 3, "fell_back": False, "checked_speedup": 1.2,
                "sparse_aware_tokens_per_s": 1250.0, "sparse_aware_speedup": 1.25}])
    text = benchmarks_view.speed_sentence(rows)
    assert "at 50% no layer's CSR form beats its dense matmul" in text
    assert "at 80% the CSR plan ran at 0.93x dense end to end in a first timing, so the sparse-aware" in text
    assert "1,250 vs 1,000 tokens/s (1.25x, 3 of 4 layers in CSR" in text


def test_speed_table_is_measured_once_then_read_back(tiny_dirs, eval_cache, monkeypatch):
    from lab_utils.experiments import speed

    name = str(tiny_dirs["llama"])
    timing = speed.Timing(tokens=8, warmup=0, repeats=1)
    first = throughput.speed_table(name, [0, 0.9], timing)
    assert list(first.sparsity) == [0.9]  # 0 is the dense model itself: nothing to time
    assert (first.sparse_aware_speedup > 0).all() and (first.layers == 14).all()
    assert first.fell_back.dtype == bool

    def no_timing(*a, **k):
        raise AssertionError("a cached rerun must not time anything")

    monkeypatch.setattr(speed, "forward_sweep", no_timing)
    monkeypatch.setattr(speed, "layer_speed", no_timing)
    again = throughput.speed_table(name, [0.9, 0], timing)
    pd.testing.assert_frame_equal(again, first)


def test_the_notebook_table_formats_each_value_for_its_own_metric():
    df = pd.DataFrame([{"key": "k", "label": "M", "metric": "perplexity", "task": "", "value": 1509.1,
                        "dense_value": 113.12, "stderr": math.nan},
                       {"key": "k", "label": "M", "metric": "zero-shot accuracy", "task": "t", "value": 0.5,
                        "dense_value": 0.875, "stderr": 0.129}])
    t = benchmarks_view.display_table(df, "sweep")
    assert list(t.value) == ["1,509", "50.0%"] and list(t.stderr) == ["", "12.9%"]
    assert list(t.metric) == ["perplexity (sweep)", "zero-shot accuracy"] and "key" not in t
