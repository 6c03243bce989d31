"""The notebook-03 sweep on tiny models: table, figures, generated conclusions."""


import pandas as pd
import pytest

from lab_utils.experiments import sweep
from lab_utils.presentation import sweep_view

SMALL = dict(nsamples=2, seqlen=16, eval_windows=2, eval_seqlen=16)


def small(models, methods, patterns, sparsities, **kw) -> sweep.SweepConfig:
    return sweep.SweepConfig(models, methods, patterns, sparsities, **{**SMALL, **kw})


@pytest.mark.slow
def test_sweep_table_figure_and_conclusions(tiny_dirs, cache_with_data, tmp_output):
    models = [str(tiny_dirs["llama"]), str(tiny_dirs["bert"])]
    # in this process: the side-by-side test below and test_sweep_executor cover the workers
    df = sweep.sparsity_sweep(small(models, ["magnitude", "wanda"], ["unstructured", "2:4"], [0.3, 0.6]),
                              executor="serial")
    # 2 dense rows + 2 models x 2 methods x (2 sparsities + one 2:4)
    assert len(df) == 2 + 2 * 2 * 3
    pruned = df[df.method != "dense"]
    assert ((pruned.actual - pruned.requested).abs() < 0.02).all()
    assert pruned[pruned.pattern == "2:4"].nm_ok.all()
    llama, bert = df[df.family == "decoder-only"], df[df.family == "encoder-only"]
    assert llama.perplexity.notna().all() and bert.perplexity.isna().all()
    assert (llama[llama.method == "dense"].ppl_vs_dense == 1).all()

    path = sweep_view.plot_perplexity(df, llama.model.iloc[0])
    first = path.read_bytes()
    assert path.name == f"perplexity_vs_sparsity_{llama.model.iloc[0]}.png" and first[:4] == b"\x89PNG"
    assert sweep_view.plot_perplexity(df, llama.model.iloc[0]).read_bytes() == first  # deterministic

    again = sweep.sparsity_sweep(small(models[:1], ["wanda"], ["unstructured"], [0.3, 0.6]), executor="serial")
    assert again[again.method == "wanda"].cached.all()  # calibrated runs come from the cache
    text = sweep_view.conclusions(df)
    assert "N:M" in text and "perplexity (sweep)" in text


@pytest.mark.slow
def test_sweep_side_by_side_gives_the_rows_of_one_process(tiny_dirs, external, cluster_cache, tmp_path,
                                                          monkeypatch):
    import os

    from lab_utils.experiments import executor

    models = [str(tiny_dirs["gpt2"]), str(tiny_dirs["whisper"])]
    cfg = small(models, ["wanda", "sparsegpt"], ["unstructured"], [0.5])
    # the session's cluster (two one-thread workers) for both sweeps: test_sweep_executor
    # starts and closes a local one
    with executor.open_executor(external.address, announce=False) as local:
        side = sweep.sparsity_sweep(cfg, executor=local)
        # a failed configuration is one error naming it
        with pytest.raises(executor.JobError, match=r"pruning .*gpt2 \((wanda|sparsegpt), unstructured, 0.5\) "
                                                     r"failed: SparsityError: seqlen 4096 exceeds"):
            sweep.sparsity_sweep(small(models[:1], ["wanda", "sparsegpt"], ["unstructured"], [0.5], seqlen=4096),
                                 executor=local)
    assert (side[side.method != "dense"].threads == 1).all()  # each built in a one-thread worker
    other = tmp_path / "other-cache"  # the same sweep in this process, into an empty cache
    other.mkdir()
    os.symlink(cluster_cache / "data", other / "data")
    monkeypatch.setenv("LAB_CACHE_DIR", str(other))
    here = sweep.sparsity_sweep(cfg, workers=1)
    timing = ["seconds", "cpu_seconds", "threads", "peak_memory_gib"]
    pd.testing.assert_frame_equal(side.drop(columns=timing), here.drop(columns=timing), rtol=1e-4)


@pytest.mark.slow
def test_owl_comparison_and_heatmap(tiny_dirs, cache_with_data, tmp_output):
    cfg = small([str(tiny_dirs["bert"]), str(tiny_dirs["llama"])], ["wanda"], ["unstructured"], [0.6])
    layers, summary = sweep.owl_comparison(cfg, "wanda", 0.6)  # on the first decoder-only model
    assert list(summary.allocation) == ["uniform", "OWL"]
    assert summary.actual.sub(0.6).abs().max() < 0.03
    uni = layers[layers.allocation == "uniform"].groupby("block").sparsity.mean()
    owl = layers[layers.allocation == "OWL"].groupby("block").sparsity.mean()
    assert uni.max() - uni.min() < 0.02 < owl.max() - owl.min()
    path = sweep_view.plot_owl_heatmap(layers, summary.model.iloc[0], "wanda", 0.6)
    assert path.is_file() and path.name.endswith("_wanda_60%.png")


def fake_sweep(wanda_ppl):
    rows = [dict(model="M", family="decoder-only", method="dense", pattern="-", requested=0.0,
                 actual=0.0, nm_ok=None, seconds=0.0, perplexity=10.0)]
    for method, ppl in (("magnitude", 50.0), ("wanda", wanda_ppl)):
        rows.append(dict(model="M", family="decoder-only", method=method, pattern="unstructured",
                         requested=0.5, actual=0.5, nm_ok=None, seconds=1.0, perplexity=ppl))
    return pd.DataFrame(rows)


def test_conclusions_follow_the_numbers():
    good = sweep_view.conclusions(fake_sweep(12.0))
    bad = sweep_view.conclusions(fake_sweep(80.0))
    assert "wanda kept the lowest perplexity (sweep) at 50% sparsity (1.2x dense)" in good
    assert "magnitude kept the lowest perplexity (sweep) at 50% sparsity (5.0x dense)" in bad
    assert "within 1.5x of the dense perplexity, wanda reached 50%" in good
    assert "1.5x of the dense" not in bad
    assert "(quick)" in sweep_view.conclusions(fake_sweep(12.0), protocol="quick")
    t = sweep_view.perplexity_table(fake_sweep(12.0).assign(ppl_vs_dense=lambda d: d.perplexity / 10))
    assert list(t.setting) == ["dense", "magnitude 50%", "wanda 50%"] and t["perplexity (sweep)"].iloc[2] == 12.0
    owl = pd.DataFrame([dict(allocation="uniform", method="wanda", requested=0.7, actual=0.7, model="M", perplexity=30.0),
                        dict(allocation="OWL", method="wanda", requested=0.7, actual=0.7, model="M", perplexity=25.0)])
    assert "lowered the perplexity (sweep) of M at 70%" in sweep_view.conclusions(fake_sweep(12.0), owl)
    owl.loc[1, "perplexity"] = 35.0
    assert "raised" in sweep_view.conclusions(fake_sweep(12.0), owl)


def test_settings_put_the_dense_baseline_first_and_expand_patterns():
    got = sweep.settings(["magnitude", "wanda"], ["unstructured", "2:4", "2:4"], [0.6, 0.3, 0.6, 0.0])
    assert got == [("dense", "unstructured", 0.0),
                   ("magnitude", "unstructured", 0.3), ("wanda", "unstructured", 0.3),
                   ("magnitude", "unstructured", 0.6), ("wanda", "unstructured", 0.6),
                   ("magnitude", "2:4", 0.5), ("wanda", "2:4", 0.5)]
    with pytest.raises(ValueError, match="unknown method"):
        sweep.settings(["nope"], ["unstructured"], [0.5])
    with pytest.raises(ValueError, match="outside"):
        sweep.settings(["magnitude"], ["unstructured"], [1.5])


def test_the_sweep_is_keyed_by_its_config_not_by_where_it_runs():
    cfg = small(["m"], ["wanda"], ["unstructured"], [0.5], device="auto", dtype="auto")
    assert (cfg.device, cfg.dtype) == sweep.resolved("auto", "auto")  # resolved before the key
    key = sweep.sparsity_sweep.key(cfg)
    assert key == sweep.sparsity_sweep.key(cfg, executor="serial", workers=2)
    assert key["cfg"]["device"] == cfg.device and key["cfg"]["models"] == ["m"]
    assert sweep.sparsity_sweep.key(small(["m"], ["wanda"], ["unstructured"], [0.5], seed=1)) != key
