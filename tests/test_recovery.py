"""Recovery's experiment side (lab_utils.experiments.recovery, presentation.recovery_view):
training text that no evaluation reads, each family's batches and loss, and the table on
tiny models. The loop and the mask invariant are tested in test_recover.py."""

import math

import pandas as pd
import pytest
import torch

from lab_utils.core import data
from lab_utils.core.data import DataError
from lab_utils.core.evaluation.protocols import EvalConfig
from lab_utils.core.models import load_model
from lab_utils.engine import recover
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments import benchmarks, recovery
from lab_utils.presentation import recovery_view
from lab_utils.report import params


# --------------------------------------------------------------------------- data that cannot leak
def test_training_texts_share_no_sentence_with_any_evaluation():
    texts = recovery.training_texts(0)
    assert len(texts) > 10_000 and len(set(texts)) == len(texts)
    recovery.check_disjoint(texts, 0)  # raises on any overlap
    held_out = recovery.evaluation_texts(0)
    normalized = {recovery._norm(t) for t in texts}
    for sentences in held_out.values():
        assert sentences and not normalized & sentences
    # the WER utterances and the zero-shot / probe test split are among the held-out sentences
    wer = {recovery._norm(s) for s in data.speech_sentences(64)}
    test = {recovery._norm(s) for s in data.movie_reviews(seed=0)["test"]["text"]}
    assert wer <= held_out["NYT editorials (perplexity, WER)"]
    assert test <= held_out["movie-review test split (zero-shot, probe)"]


@pytest.mark.parametrize("leak", ["nyt", "movie test"])
def test_an_evaluated_sentence_in_the_training_text_is_refused(leak):
    sentence = data.nyt_sentences()[3][1] if leak == "nyt" else data.movie_reviews(seed=0)["test"]["text"][5]
    with pytest.raises(DataError, match="training sentence"):
        recovery.check_disjoint([*recovery.training_texts(0)[:50], "  " + sentence.upper()], 0)


# --------------------------------------------------------------------------- what is recovered
def test_settings_are_written_as_the_tables_name_them():
    assert recovery.parse_setting("wanda 50%") == benchmarks.Setting("wanda", "unstructured", 0.5)
    assert recovery.parse_setting("wanda 0.7") == benchmarks.Setting("wanda", "unstructured", 0.7)
    assert recovery.parse_setting("sparsegpt 2:4") == benchmarks.Setting("sparsegpt", "2:4", 0.5)
    for bad, match in [("wanda", "METHOD SPARSITY"), ("obs 50%", "unknown method"), ("wanda 0%", "prunes nothing")]:
        with pytest.raises(ValueError, match=match):
            recovery.parse_setting(bad)


def test_the_plan_runs_every_setting_with_the_first_loss_and_the_ablations_on_the_first_setting():
    p = recovery.RecoveryPlan(["wanda 50%", "sparsegpt 2:4"], ["kd", "next-token", "lora"])
    assert [r.name for r in p.recoveries] == ["wanda 50% + kd", "sparsegpt 2:4 + kd", "wanda 50% + next-token",
                                              "wanda 50% + lora"]
    assert p.config("lora").lora_rank == 8 and p.config("kd").lora_rank is None
    assert recovery.RecoveryPlan([], ["kd"]).recoveries == []
    for changes, match in [({"losses": ["mse"]}, "not a recovery loss"), ({"losses": ["kd", "kd"]}, "twice"),
                           ({"settings": ["wanda 50%", "wanda 0.5"]}, "twice"), ({"lr": 0}, "lr"),
                           ({"settings": ["wanda"]}, "METHOD SPARSITY")]:
        with pytest.raises(ValueError, match=match):
            recovery.RecoveryPlan(**changes)


def test_the_gap_is_measured_in_log_perplexity_and_in_the_metric_otherwise():
    assert recovery.gap_recovered("perplexity", 10.0, 100.0, math.sqrt(1000.0)) == pytest.approx(0.5)
    assert recovery.gap_recovered("embedding fidelity", 1.0, 0.8, 0.95) == pytest.approx(0.75)
    assert recovery.gap_recovered("WER", 0.1, 0.3, 0.4) == pytest.approx(-0.5)  # worse than pruned
    assert math.isnan(recovery.gap_recovered("WER", 0.1, 0.1, 0.1))


# --------------------------------------------------------------------------- each family's batches and loss
CFG = recover.RecoveryConfig("kd", steps=3, batch_size=2, seqlen=16, lr=1e-2)


def test_each_family_yields_its_steps_of_batches_that_its_model_reads(tiny_dirs):
    for kind, task in [("llama", recovery.DecoderTask()), ("bert", recovery.EncoderTask()),
                       ("whisper", recovery.WhisperTask(per_clip=1))]:
        lm = load_model(str(tiny_dirs[kind]))
        assert type(recovery.task_for(str(tiny_dirs[kind]))) is type(task)
        batches = list(task.batches(lm, CFG))
        assert len(batches) == CFG.steps
        again = list(task.batches(lm, CFG))  # the same batches on every call: a resumed run replays them
        assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again, strict=True) for k in a)
        with torch.no_grad():
            out = lm.model(**batches[0])
        loss_fn = task.step_loss or recover.default_step_loss
        assert float(loss_fn(out, out, batches[0], CFG)) == pytest.approx(0.0, abs=1e-5)  # a model matches itself
    assert recovery.task_for(str(tiny_dirs["bart"])) is None  # no recovery task for a text encoder-decoder
    assert not recovery.supports(recovery.EncoderTask(), "next-token")


def test_an_encoder_step_holds_the_decoders_tokens_per_step_of_sentences(tiny_dirs):
    lm = load_model(str(tiny_dirs["bert"]))
    for batch in recovery.EncoderTask().batches(lm, CFG):
        real = batch["attention_mask"].sum(1)
        budget = CFG.batch_size * CFG.seqlen  # 32 tokens: several short sentences, not batch_size of them
        assert int(real.sum()) >= budget > int(real[:-1].sum()) and (real <= CFG.seqlen).all()


def test_plan_defaults_are_notebook_04s():
    nb = params.defaults(params.declared("04_benchmarks"))
    plan = recovery.RecoveryPlan()
    for name in ("steps", "batch_size", "seqlen", "lr", "schedule", "temperature", "hidden_weight", "lora_rank"):
        assert getattr(plan, name) == nb[f"recovery_{name}"], name
    assert plan.dtype == nb["recovery_dtype"] == "auto"


# --------------------------------------------------------------------------- the table, end to end
SMALL = EvalConfig(eval_windows=2, eval_seqlen=16, probe_train_examples=40, probe_test_examples=12,
                   zeroshot_tasks=("lab_sentiment",), sentiment_examples=4)


def test_a_tiny_recovery_lowers_its_loss_keeps_the_sparsity_and_fills_every_column(tiny_dirs, eval_cache,
                                                                                     monkeypatch):
    # perplexity alone: the zero-shot harness's import would take most of the test's time
    monkeypatch.setattr(benchmarks, "benchmarks_for", lambda spec, config=None: ["perplexity"])
    cfg = benchmarks.BenchmarkConfig(nsamples=2, seqlen=16, bench=SMALL)
    plan = recovery.RecoveryPlan(["magnitude 50%"], ["kd", "lora"], steps=8, batch_size=4, seqlen=32, lr=1e-2,
                                 lora_rank=4)
    table, history = recovery.recovery_table([str(tiny_dirs["llama"])], plan, cfg)
    assert list(table.columns) == recovery.COLUMNS and list(history.columns) == recovery.HISTORY_COLUMNS
    assert list(table.loss) == ["kd", "lora"] and (table.metric == "perplexity").all()
    assert (table.sparsity_before == table.sparsity_after).all() and (table.sparsity_after > 0.45).all()
    assert table.plain_merge_sparsity.isna().tolist() == [True, False]
    assert table.plain_merge_sparsity.iloc[1] < 0.01  # the plain merge fills the pruned weights
    kd = history[history.loss == "kd"].train_loss
    assert len(kd) == 8 and kd.iloc[-2:].mean() < kd.iloc[:2].mean()
    # the pruned value is notebook 04's own: the benchmark table's, read from its cache
    bench, _ = benchmarks.evaluate_model(str(tiny_dirs["llama"]), [benchmarks.Setting("dense", "unstructured", 0.0),
                                                                   recovery.parse_setting("magnitude 50%")],
                                         cfg, executor="serial")
    ppl = [r["value"] for r in bench if r["metric"] == "perplexity"]
    assert (table.dense.iloc[0], table.pruned.iloc[0]) == (ppl[0], ppl[1])
    # a rerun trains nothing and gives the same table
    again, _ = recovery.recovery_table([str(tiny_dirs["llama"])], plan, cfg)
    pd.testing.assert_frame_equal(table.drop(columns="seconds"), again.drop(columns="seconds"))
    shown = recovery_view.display_table(table, "sweep")
    assert list(shown.columns) == ["model", "setting", "loss", "benchmark", "dense", "pruned", "recovered",
                                   "gap recovered", "sparsity before", "sparsity after", "plain LoRA merge",
                                   "steps", "tokens", "seconds"]
    assert "closed" in recovery_view.finding(table, "sweep") and recovery_view.headline(table, "sweep")
    assert recovery_view.figure(table, history, "sweep").is_file()


def test_a_pruned_checkpoint_of_the_benchmarks_is_the_one_recovered(tiny_dirs, eval_cache):
    cfg = benchmarks.BenchmarkConfig(nsamples=2, seqlen=16, bench=SMALL)
    setting = recovery.parse_setting("magnitude 50%")
    assert benchmarks.prune_config(setting, cfg) == PruneConfig("magnitude", 0.5, nsamples=2, seqlen=16)


def test_one_step_shows_a_plain_step_reviving_pruned_weights_and_the_masked_step_keeping_them(tiny_dirs, eval_cache):
    cfg = benchmarks.BenchmarkConfig(nsamples=2, seqlen=16, bench=SMALL)
    plan = recovery.RecoveryPlan(["magnitude 50%"], ["kd"], steps=4, batch_size=2, seqlen=16, lr=1e-2)
    t = recovery.one_step(str(tiny_dirs["llama"]), plan, cfg).set_index("model state")
    assert t["moved off 0"].tolist()[0] == 0 and t["moved off 0"].iloc[1] > 0 and t["moved off 0"].iloc[2] == 0
    assert (t["pruned weights"] > 0).all()
    assert recovery.one_step(str(tiny_dirs["llama"]), recovery.RecoveryPlan([], ["kd"]), cfg).empty


@pytest.mark.parametrize("name, bad", [("recovery_settings", ["wanda"]), ("recovery_losses", ["mse"]),
                                       ("recovery_lr", 0.0), ("recovery_steps", 0), ("recovery_lora_rank", 0),
                                       ("recovery_schedule", "step"), ("recovery_hidden_weight", -1.0),
                                       ("recovery_dtype", "float8")])
def test_a_bad_recovery_parameter_is_refused_naming_it(name, bad):
    defaults = params.defaults(params.declared("04_benchmarks"))
    with pytest.raises(params.ParamError, match=rf"^{name}: "):
        params.check_values({**defaults, name: bad}, "04_benchmarks", params.declared("04_benchmarks"),
                            check_hub=False)


def test_recovery_dtype_auto_follows_the_notebooks_dtype_and_auto_there_is_the_engines():
    defaults = params.defaults(params.declared("04_benchmarks"))
    auto = recover.dtype_name(recover.training_dtype("auto", "cpu"))  # bfloat16 where this CPU runs it natively
    assert params.recovery_plan(defaults).config("kd").dtype == auto
    assert params.recovery_plan({**defaults, "dtype": "float32"}).config("kd").dtype == "float32"
    assert params.recovery_plan({**defaults, "dtype": "float32", "recovery_dtype": "bfloat16"}).dtype == "bfloat16"


def test_the_finding_says_when_training_moved_a_model_away_from_dense():
    row = {"model": "m", "label": "Enc", "family": "encoder-only", "method": "wanda", "pattern": "unstructured",
           "requested": 0.5, "loss": "kd", "metric": "embedding fidelity", "dense": 1.0, "pruned": 0.86,
           "recovered": 0.84, "gap_recovered": (0.84 - 0.86) / (1.0 - 0.86), "sparsity_before": 0.5,
           "sparsity_after": 0.5, "plain_merge_sparsity": float("nan"), "steps": 8, "tokens": 800,
           "seconds": 2.0, "key": "k"}
    worse = recovery_view.finding(pd.DataFrame([row]))
    assert "widened the gap by 14%" in worse and "made Enc worse" in worse and "closed -" not in worse
    better = recovery_view.finding(pd.DataFrame([{**row, "recovered": 0.93, "gap_recovered": 0.5}]))
    assert "closed 50% of the gap" in better and "worse" not in better
