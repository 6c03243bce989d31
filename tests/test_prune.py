"""The pruning driver on tiny models of every family (random weights: plumbing,
exact counts and the order of calibration, not quality)."""

import copy
import json
import os
import subprocess
import sys
import types
from dataclasses import asdict

import pytest
import torch

from lab_utils.core import files
from lab_utils.core import sparsify as sp
from lab_utils.core.models import ModelSpec, load_model, prunable_layers
from lab_utils.core.sparsify import SparsityError
from lab_utils.engine import calibration, checkpoints, config, prune

CAL = dict(nsamples=4, seqlen=32)
SGPT = config.PruneConfig("sparsegpt", 0.5, **CAL)


def prune_as(lm, *args, **settings):
    """The engine on ``lm`` with the settings of a ``PruneConfig``."""
    return prune.prune_model(lm, config.PruneConfig(*args, **settings))


def layer_sparsity(model):
    return {pl.name: (pl.component, pl.side, sp.sparsity(pl.weight)) for pl in prunable_layers(model)}


# --------------------------------------------------------------------------- decoder-only
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_wanda_prunes_every_decoder_layer_exactly_per_row(tiny_dirs, kind):
    lm = load_model(str(tiny_dirs[kind]))
    report = prune_as(lm, "wanda", 0.5, **CAL)
    layers = prunable_layers(lm.model)
    assert len(report.layers) == len(layers) > 0
    for pl in layers:  # GPT-2's Conv1D too: out x in view, rows of `in` weights
        W = pl.weight
        assert ((W == 0).sum(dim=1) == int(W.shape[1] * 0.5)).all(), pl.name
    assert report.actual_sparsity == pytest.approx(0.5, abs=1e-9)
    assert 0 < report.actual_sparsity_total < report.actual_sparsity  # embeddings stay dense
    assert report.seconds > 0 and report.peak_memory_bytes > report.start_memory_bytes * 0.5
    assert report.nm_verified is None
    # every block matrix seen, and the report (the CLI's line) says so and what it counted
    assert report.coverage == 1.0 and report.left_out == [] and report.experts == report.experts_fallback == 0
    assert {"coverage", "actual_sparsity_over"} <= report.summary().keys()


def test_sparsegpt_nm_on_llama_is_verified(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    before = {pl.name: pl.weight.clone() for pl in prunable_layers(lm.model)}
    report = prune_as(lm, "sparsegpt", 0.5, "4:8", **CAL)
    assert report.nm_verified is True and report.nm_violations == 0
    assert report.actual_sparsity == pytest.approx(0.5)
    # SparseGPT updates the kept weights, it does not only mask them
    after = {pl.name: pl.weight for pl in prunable_layers(lm.model)}
    updated = sum(int(((after[n] != 0) & (after[n] != W)).sum()) for n, W in before.items())
    assert updated > 0.25 * sum(W.numel() for W in before.values())


def test_global_magnitude_reaches_the_global_target(tiny_dirs):
    lm = load_model(str(tiny_dirs["gpt2"]))
    report = prune_as(lm, "magnitude", 0.6, scope="global")
    total = sum(r["numel"] for r in report.layers)
    assert sum(r["zeros"] for r in report.layers) == int(total * 0.6)
    assert len({round(r["sparsity"], 3) for r in report.layers}) > 1  # not uniform per layer


def test_batched_statistics_equal_one_sample_at_a_time(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    batches = calibration.calibration_batches(lm, 6, 16, batch_tokens=16 * 6)
    single = calibration.calibration_batches(lm, 6, 16, batch_tokens=16)
    assert len(batches) == 1 and len(single) == 6
    block = lm.model.model.layers[0]
    layers = prune.find_layers(block)
    for kind in ("norm", "hessian"):
        a = calibration.collect_statistics(block, layers, calibration.capture_inputs(lm.model, block, batches, "decoder"), kind)
        b = calibration.collect_statistics(block, layers, calibration.capture_inputs(lm.model, block, single, "decoder"), kind)
        for name in layers:
            assert a[name]["count"] == b[name]["count"] == 96
            assert torch.allclose(a[name]["sum"], b[name]["sum"], rtol=1e-4, atol=1e-5), name


def test_layers_reading_one_input_share_their_statistics_group(tiny_dirs):
    """q/k/v read one tensor, gate/up another: the engine computes SparseGPT's inverse once per group,
    and pruning with the shared inverses gives the weights of pruning each layer on its own."""
    lm = load_model(str(tiny_dirs["llama"]))
    block = lm.model.model.layers[0]
    layers = prune.find_layers(block)
    chunks = calibration.capture_inputs(lm.model, block, calibration.calibration_batches(lm, 4, 16), "decoder")
    stats = calibration.collect_statistics(block, layers, chunks, "hessian")
    group = {name.split(".")[-1]: st["input"] for name, st in stats.items()}
    assert group["q_proj"] == group["k_proj"] == group["v_proj"] != group["o_proj"]
    assert group["gate_proj"] == group["up_proj"] not in (group["o_proj"], group["down_proj"])
    cfg = config.PruneConfig("sparsegpt", 0.5, nsamples=4, seqlen=16)
    alone, shared = copy.deepcopy(block), copy.deepcopy(block)
    inverses: dict = {}
    for i, name in enumerate(layers):
        a = {k: v.clone() if torch.is_tensor(v) else v for k, v in stats[name].items()}
        b = {k: v.clone() if torch.is_tensor(v) else v for k, v in stats[name].items()}
        prune.prune_layer(alone.get_submodule(name), cfg, 0.5, a, i)
        prune.prune_layer(shared.get_submodule(name), cfg, 0.5, b, i, inverses=inverses)
    assert len(inverses) == len(set(group.values())) < len(layers)
    for (n, p), q in zip(alone.named_parameters(), shared.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_owl_allocates_non_uniform_block_sparsity_with_the_same_mean(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    report = prune_as(lm, "wanda", 0.5, owl=True, **CAL)
    targets = report.block_sparsity["decoder"]
    assert len(targets) == 2 and targets[0] != targets[1]
    assert sum(targets) / 2 == pytest.approx(0.5)
    table = report.layer_table()
    per_block = table.groupby("block").sparsity.mean()
    assert (per_block.idxmax() == int(torch.tensor(targets).argmax()))


# --------------------------------------------------------------------------- encoder-only
def test_encoder_only_prunes_all_layers(tiny_dirs):
    lm = load_model(str(tiny_dirs["bert"]))
    report = prune_as(lm, "sparsegpt", 0.5, **CAL)
    sides = {r["side"] for r in report.layers}
    assert sides == {"encoder"}
    assert all(abs(r["sparsity"] - 0.5) < 0.02 for r in report.layers)
    assert {r["component"] for r in report.layers} >= {"attn.q", "attn.o", "mlp.up", "mlp.down"}


# --------------------------------------------------------------------------- encoder-decoder
@pytest.mark.parametrize("kind,method", [("bart", "wanda"), ("whisper", "sparsegpt")])
def test_encoder_decoder_prunes_both_sides_and_cross_attention_after_the_encoder(
        tiny_dirs, monkeypatch, kind, method):
    lm = load_model(str(tiny_dirs[kind]))
    seen = {}
    capture = calibration.capture_inputs

    def spy(model, block, batches, side):
        # when the decoder's inputs are captured, the encoder must already be pruned
        enc = [sp.sparsity(pl.weight) for pl in prunable_layers(model) if pl.side == "encoder"]
        seen[side] = min(enc)
        return capture(model, block, batches, side)

    monkeypatch.setattr(prune, "capture_inputs", spy)
    report = prune_as(lm, method, 0.5, nsamples=3, seqlen=32)
    assert seen["encoder"] == 0.0 and seen["decoder"] >= 0.49
    table = report.layer_table()
    assert set(table.side) == {"encoder", "decoder"}
    xattn = table[table.component.str.startswith("xattn.")]
    assert set(xattn.component) == {"xattn.q", "xattn.k", "xattn.v", "xattn.o"}
    assert (table.sparsity > 0.45).all() and (xattn.sparsity > 0.45).all()


def test_whisper_calibrates_on_windows_of_packed_sentences(tiny_dirs):
    from lab_utils.core import data

    lm = load_model(str(tiny_dirs["whisper"]))
    batches = calibration.calibration_batches(lm, nsamples=6, seqlen=None, seed=0)
    windows = [b["inputs"]["input_features"] for b in batches]
    assert sum(w.shape[0] for w in windows) == 2  # 6 sentences, 4 to a window
    sentences = data.calibration_sentences(6, 0)
    first = batches[0]["inputs"]["decoder_input_ids"][0]
    mask = batches[0]["masks"]["decoder"][0]
    cfg = lm.model.config
    expect = list(lm.tokenizer(" ".join(sentences[:config.SPEECH_PER_WINDOW])).input_ids)
    if expect[0] != cfg.decoder_start_token_id:
        expect = [cfg.decoder_start_token_id] + expect
    # the first window's decoder is teacher-forced with its four sentences' text
    assert first[mask].tolist() == expect[:cfg.max_target_positions]


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="wanda", sparsity=1.0), r"\[0, 1\)"),
    (dict(method="wanda", sparsity=-0.2), r"\[0, 1\)"),
    (dict(method="magnitude", sparsity=0.5, pattern="4:2"), "N < M"),
    (dict(method="magnitude", sparsity=0.5, pattern="2:2"), "N < M"),
    (dict(method="obs", sparsity=0.5), "unknown method"),
    (dict(method="wanda", sparsity=0.5, nsamples=0), "nsamples"),
    (dict(method="sparsegpt", sparsity=0.5, nsamples=0), "nsamples"),
    (dict(method="magnitude", sparsity=0.5, owl=True, nsamples=0), "nsamples"),
    (dict(method="wanda", sparsity=0.5, pattern="2:4", owl=True), "OWL"),
    (dict(method="sparsegpt", sparsity=0.5, scope="row"), "scope"),
])
def test_bad_input_is_one_clear_error(tiny_dirs, kwargs, match):
    lm = load_model(str(tiny_dirs["llama"]))
    with pytest.raises(SparsityError, match=match) as exc:
        prune_as(lm, **kwargs)
    assert "\n" not in str(exc.value)
    assert all(sp.sparsity(pl.weight) == 0 for pl in prunable_layers(lm.model))  # untouched


def test_magnitude_needs_no_calibration(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    report = prune_as(lm, "magnitude", 0.5, nsamples=0)
    assert report.actual_sparsity == pytest.approx(0.5) and report.nsamples is None


# --------------------------------------------------------------------------- the cache
def test_pruned_model_caches_checkpoints(tiny_dirs, cache_with_data):
    name = str(tiny_dirs["llama"])
    lm1, r1 = checkpoints.pruned_model(name, config.PruneConfig("wanda", 0.5, "2:4", **CAL))
    assert not r1.from_cache and files.verify_dir(r1.checkpoint)
    lm2, r2 = checkpoints.pruned_model(name, config.PruneConfig("wanda", 0.5, "2:4", **CAL))
    assert r2.from_cache and r2.key == r1.key and r2.checkpoint == r1.checkpoint
    for a, b in zip(prunable_layers(lm1.model), prunable_layers(lm2.model), strict=True):
        assert torch.equal(a.weight, b.weight)
    # every argument is in the key
    _, r3 = checkpoints.pruned_model(name, config.PruneConfig("wanda", 0.5, "2:4", nsamples=4, seqlen=32, seed=1))
    assert r3.key != r1.key and not r3.from_cache
    # a damaged checkpoint is not reused
    weights = cache_with_data / "pruned" / os.path.basename(r1.checkpoint) / checkpoints.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    _, r4 = checkpoints.pruned_model(name, config.PruneConfig("wanda", 0.5, "2:4", **CAL))
    assert not r4.from_cache and files.verify_dir(r4.checkpoint)
    # rebuild prunes again and replaces the entry, with the new run's seconds
    _, r5 = checkpoints.pruned_model(name, config.PruneConfig("wanda", 0.5, "2:4", **CAL), rebuild=True)
    assert not r5.from_cache and r5.checkpoint == r4.checkpoint and files.verify_dir(r5.checkpoint)
    _, r6 = checkpoints.pruned_model(name, config.PruneConfig("wanda", 0.5, "2:4", **CAL))
    assert r6.from_cache and r6.seconds == r5.seconds != r4.seconds
    assert r6.coverage == 1.0  # measured again on the loaded model (a report from before lacks it)


def test_sparsity_zero_is_the_dense_model(tiny_dirs, cache_with_data):
    lm, report = checkpoints.pruned_model(str(tiny_dirs["gpt2"]), config.PruneConfig("sparsegpt", 0.0))
    assert report.actual_sparsity == 0.0 and report.checkpoint is None
    assert not (cache_with_data / "pruned").exists()


PROBE = """
import torch
from lab_utils.core.measure import PeakMemory
grew = []
for _ in range(3):
    with PeakMemory() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
    del block
    grew.append(mem.peak - mem.start)
print(max(grew))
"""


def test_peak_memory_sees_an_allocation():
    # In a fresh process. RSS counts file-backed pages too, which the kernel may reclaim while the
    # probe runs (this sandbox runs DAMON proactive reclaim): late in a full run, the pytest process
    # holds enough cold pages that all three tries once saw the 64 MiB block hidden by such a drop.
    # A drop can still hide it once, not thrice.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    assert int(out.stdout.split()[-1]) >= 48 * 2**20


def test_hub_models_calibrate_on_c4_at_their_context(tiny_dirs):
    from lab_utils.core.data import DataError
    from lab_utils.core.evaluation import perplexity

    lm = load_model(str(tiny_dirs["gpt2"]))
    assert config.default_calibration(lm) == "movie-reviews" and perplexity.default_corpus(lm.spec) == "nyt"
    seqlen = config.resolve_config(lm.spec, config.PruneConfig("wanda", 0.5), lm.model.config).seqlen
    assert seqlen == 128  # 512, capped by the tiny model's context
    lm.spec.source = "hub"  # the same model as if it came from the hub (gpt2-medium's path)
    seqlen = config.resolve_config(lm.spec, config.PruneConfig("wanda", 0.5), lm.model.config).seqlen
    assert seqlen == lm.model.config.n_positions
    assert config.default_calibration(lm) == "c4" and perplexity.default_corpus(lm.spec) == "wikitext2"
    with pytest.raises(DataError, match="hub"):  # offline here: a clear error, not a hang
        prune_as(lm, "wanda", 0.5, nsamples=2)
    with pytest.raises(SparsityError, match="exceeds the context"):
        calibration.calibration_batches(lm, 2, 4096, corpus="movie-reviews")


@pytest.mark.slow
def test_separate_process_builds_the_same_checkpoint(tiny_dirs, cache_with_data, monkeypatch):
    import subprocess

    name = str(tiny_dirs["llama"])
    # One child process: built here first, then rebuild=True reaches the child, which prunes
    # again into the same checkpoint folder; the two give the same weights.
    lm1, r1 = checkpoints.pruned_model(name, SGPT)
    lm2, r2 = checkpoints.pruned_model(name, SGPT, separate_process=True, rebuild=True)
    assert not r2.from_cache and r2.key == r1.key and r2.seconds != r1.seconds and r2.peak_memory_bytes > 0
    assert r2.checkpoint == r1.checkpoint and files.verify_dir(r2.checkpoint)
    for a, b in zip(prunable_layers(lm1.model), prunable_layers(lm2.model), strict=True):
        assert torch.equal(a.weight, b.weight)
    # cached now: loaded here, no child
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a child for a cached checkpoint"))
    assert checkpoints.pruned_model(name, SGPT, separate_process=True)[1].from_cache


@pytest.mark.slow
def test_separate_process_failure_names_the_pruning(tiny_dirs, cache_with_data, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "boom"))
    with pytest.raises(SparsityError, match="wanda.*separate process failed: boom"):
        checkpoints.pruned_model(str(tiny_dirs["llama"]), config.PruneConfig("wanda", 0.5, **CAL), separate_process=True)


# --------------------------------------------------------------------------- the config and its key
# Keys of ENGINE_VERSION 4 (derived from the whole PruneConfig): a change to the key function must
# not move them, or every cached checkpoint would be rebuilt.
EMBEDDED = ModelSpec("smollm2-135m", "decoder-only", "SmolLM2", "embedded", "perplexity", "smollm2-135m")
HUB = ModelSpec("gpt2-medium", "decoder-only", "GPT-2", "hub", "perplexity", "gpt2-medium")
LOCAL = ModelSpec("/tmp/some/model", "decoder-only", "m", "local", "perplexity", "/tmp/some/model")
LLAMA = types.SimpleNamespace(model_type="llama", max_position_embeddings=2048)
WHISPER = types.SimpleNamespace(model_type="whisper", max_target_positions=448)


@pytest.mark.parametrize("spec,hf,settings,key", [
    (EMBEDDED, LLAMA, dict(method="wanda", sparsity=0.5, pattern="2:4"), "6fdfa10039656e48"),
    (HUB, LLAMA, dict(method="wanda", sparsity=0.5, pattern="2:4"), "2b48a1894ef2bb0d"),
    (LOCAL, WHISPER, dict(method="sparsegpt", sparsity=0.6, nsamples=8, seqlen=128, seed=1),
     "b5814e909dcec8a8"),
    (HUB, LLAMA, dict(method="magnitude", sparsity=0.5), "7d929f764e52c0f7"),
    (LOCAL, LLAMA, dict(method="random", sparsity=0.3, scope="global", seed=3), "d4f7068315d66cd7"),
    (EMBEDDED, LLAMA, dict(method="wanda", sparsity=0.7, owl=True, nsamples=16, calibration="c4"),
     "3f76e605f18304a2"),
    (HUB, WHISPER, dict(method="magnitude", sparsity=0.5, owl=True), "d3ad4977177a4f38"),
    # the dense model: keyed by the name as written, also for a local folder
    (HUB, LLAMA, dict(method="sparsegpt", sparsity=0.0), "6b3417ec76d8c1c1"),
    (LOCAL, LLAMA, dict(method="sparsegpt", sparsity=0.0), "1b00d856a6e0ffcc"),
])
def test_checkpoint_keys_are_the_keys_of_existing_caches(spec, hf, settings, key):
    assert config.checkpoint_key(spec, config.PruneConfig(**settings), hf) == key
    assert config.ENGINE_VERSION == 4


def test_non_default_owl_and_batch_settings_split_the_cache():
    base = config.PruneConfig("wanda", 0.5, owl=True, seqlen=64)
    key = config.checkpoint_key(EMBEDDED, base, LLAMA)
    same = config.PruneConfig("wanda", 0.5, owl=True, seqlen=64, owl_lambda=config.OWL_LAMBDA,
                              owl_m=config.OWL_M, batch_tokens=config.BATCH_TOKENS)
    assert config.checkpoint_key(EMBEDDED, same, LLAMA) == key
    others = [config.PruneConfig("wanda", 0.5, owl=True, seqlen=64, **kw)
              for kw in (dict(owl_lambda=0.1), dict(owl_m=7), dict(batch_tokens=4096))]
    assert len({key, *(config.checkpoint_key(EMBEDDED, c, LLAMA) for c in others)}) == 4
    # settings a method ignores are dropped, so they cannot split the cache
    mag = config.PruneConfig("magnitude", 0.5, owl_lambda=0.3, batch_tokens=64)
    assert mag.owl_lambda is None and mag.owl_m is None and mag.batch_tokens is None
    with pytest.raises(SparsityError, match="owl_m"):
        config.PruneConfig("wanda", 0.5, owl=True, owl_m=0)
    with pytest.raises(SparsityError, match="batch_tokens"):
        config.PruneConfig("wanda", 0.5, batch_tokens=0)


def test_the_config_survives_the_trip_to_the_child_process():
    cfg = config.resolve_config(EMBEDDED, config.PruneConfig("wanda", 0.6, owl=True, owl_m=6.5), LLAMA)
    back = config.PruneConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and config.checkpoint_key(EMBEDDED, back, LLAMA) == config.checkpoint_key(EMBEDDED, cfg, LLAMA)


def test_owl_settings_reach_the_engine(tiny_dirs):
    a = prune_as(load_model(str(tiny_dirs["llama"])), "wanda", 0.5, owl=True, nsamples=4, seqlen=32)
    b = prune_as(load_model(str(tiny_dirs["llama"])), "wanda", 0.5, owl=True, nsamples=4, seqlen=32,
                 owl_lambda=0.2)
    spread = [max(r.block_sparsity["decoder"]) - min(r.block_sparsity["decoder"]) for r in (a, b)]
    assert spread[1] > spread[0] > 0  # a larger lambda spreads the blocks' sparsities further


def test_pruned_model_from_a_loaded_model_prunes_a_copy(tiny_dirs, cache_with_data):
    name = str(tiny_dirs["llama"])
    dense = load_model(name)
    assert checkpoints.pruned_model(dense, config.PruneConfig("magnitude", 0.0))[0] is dense
    lm, report = checkpoints.pruned_model(dense, config.PruneConfig("magnitude", 0.6))
    assert lm.model is not dense.model and report.actual_sparsity == pytest.approx(0.6, abs=0.01)
    assert all(sp.sparsity(pl.weight) == 0 for pl in prunable_layers(dense.model))  # untouched
    assert not (cache_with_data / "pruned").exists()  # magnitude: no checkpoint left behind
    # a calibrated pruning by name and from the loaded model: one checkpoint, the same weights
    by_name, r1 = checkpoints.pruned_model(name, config.PruneConfig("wanda", 0.5, **CAL))
    from_dense, r2 = checkpoints.pruned_model(dense, config.PruneConfig("wanda", 0.5, **CAL))
    assert r2.from_cache and r2.key == r1.key
    for a, b in zip(prunable_layers(by_name.model), prunable_layers(from_dense.model), strict=True):
        assert torch.equal(a.weight, b.weight)
    assert all(sp.sparsity(pl.weight) == 0 for pl in prunable_layers(dense.model))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bart", "whisper"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_forward_slices_change_nothing(tiny_dirs, monkeypatch, kind, method):
    """On a CPU a block runs each batch in slices of a few samples (masks, encoder states and
    padding cut along with the hidden states); the pruned weights are those of one call per
    batch, bit for bit (slices of one sample here, against one call for all of them)."""
    pruned = {}
    for tokens in (1, 10**9):
        monkeypatch.setattr(calibration, "CPU_FORWARD_TOKENS", tokens)
        lm = load_model(str(tiny_dirs[kind]))
        prune_as(lm, method, 0.5, nsamples=6, seqlen=16, batch_tokens=16 * 6)
        pruned[tokens] = {pl.name: pl.weight.clone() for pl in prunable_layers(lm.model)}
    assert pruned[1].keys() == pruned[10**9].keys()
    for name, W in pruned[1].items():
        assert torch.equal(W, pruned[10**9][name]), name


def test_slices_cut_only_what_has_the_batch_dimension():
    hidden = torch.randn(4, 8, 3)
    chunk = calibration.Chunk(hidden, (torch.ones(4, 1, 8, 8),),
                              {"position_embeddings": (torch.ones(1, 8, 2), torch.ones(1, 8, 2)),
                               "cache_position": torch.arange(4), "mask": torch.ones(4, 8)},
                              torch.ones(4, 8, dtype=torch.bool))
    parts = calibration.slices(chunk, forward_tokens=16)  # 2 samples of 8 tokens per slice
    assert len(parts) == 2 and torch.equal(torch.cat([p.hidden for p in parts]), hidden)
    assert parts[0].args[0].shape == (2, 1, 8, 8) and parts[1].kwargs["mask"].shape == (2, 8)
    assert parts[0].kwargs["position_embeddings"][0].shape == (1, 8, 2)
    assert parts[0].kwargs["cache_position"].shape == (4,)  # 1-D: shared, never cut
    assert parts[1].token_mask.shape == (2, 8)
    assert calibration.slices(chunk, forward_tokens=0) == [chunk]  # an accelerator: one call
