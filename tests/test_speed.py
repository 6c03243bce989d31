import math

import pandas as pd
import pytest
import torch
from tiny_models import build_tiny

from lab_utils.core import formats, measure
from lab_utils.core.models import prunable_layers
from lab_utils.experiments import speed
from lab_utils.presentation import speed_view


def prune(model, sparsity_ratio, seed=0):
    for i, pl in enumerate(prunable_layers(model)):
        pl.set_weight(pl.weight * (speed.sparse_weight(pl.shape, sparsity_ratio, seed + i) != 0))
    return model


def test_sparse_weight_has_exact_zeros_per_row():
    W = speed.sparse_weight((5, 40), 0.75, seed=1)
    assert ((W == 0).sum(dim=1) == 30).all()
    assert torch.equal(W, speed.sparse_weight((5, 40), 0.75, seed=1))


@pytest.mark.parametrize("bias", [True, False])
def test_csr_linear_matches_dense(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10, bias=bias)
    lin.weight.data = speed.sparse_weight((10, 24), 0.6)
    csr = speed.CSRLinear.from_module(lin)
    assert csr.nnz == int((lin.weight != 0).sum())
    assert torch.equal(csr.weight_csr.to_dense(), lin.weight.data)
    x = torch.randn(2, 3, 24)
    y = csr(x)
    assert y.shape == (2, 3, 10) and y.is_contiguous()
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-6)
    y.view(6, 10)  # the next layer may view() it


def test_csr_linear_from_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(7, 12)  # nx=12 inputs, nf=7 outputs; weight stored 12 x 7
    conv.weight.data = speed.sparse_weight((7, 12), 0.5).t().contiguous()
    x = torch.randn(4, 12)
    torch.testing.assert_close(speed.CSRLinear.from_module(conv)(x), conv(x), rtol=1e-5, atol=1e-6)


def tiny_inputs(kind):
    ids = torch.tensor([[1, 5, 9, 12, 20, 7]])
    if kind == "whisper":  # 2 x max_source_positions log-mel frames
        return {"input_features": torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0)),
                "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids} | ({"decoder_input_ids": ids[:, :3]} if kind == "bart" else {})


def outputs(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bart", "bert", "whisper"])
def test_fully_converted_model_gives_the_same_outputs(kind):
    model = prune(build_tiny(kind), 0.7)
    inputs = tiny_inputs(kind)
    sparse, plan = speed.to_sparse_aware(model, None, force=True)
    n = len(prunable_layers(model))
    assert plan.use_csr.all() and len(plan) == n
    assert sum(isinstance(m, speed.CSRLinear) for m in sparse.modules()) == n
    assert not any(isinstance(m, speed.CSRLinear) for m in model.modules())  # a copy
    # with autograd on, under no_grad (version counters) and under inference_mode (none) alike
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(outputs(sparse, inputs), outputs(model, inputs), rtol=1e-4, atol=1e-5)
    if kind == "whisper":
        return  # its encoder input is not token ids; the MAC count below is exercised on the others
    macs = speed.linear_macs(sparse, inputs)
    macs_dense = speed.linear_macs(model, inputs)
    assert macs.macs.sum() == macs_dense.macs.sum()  # the CSR layers count their nonzeros
    limit = speed.flop_limit(model, inputs)
    assert limit["sparse_macs"] < limit["dense_macs"] and 1 < limit["limit"] < 1 / 0.3


def test_csr_index_dtype_and_kernel():
    W = speed.sparse_weight((40, 24), 0.8)
    W_csr = speed.to_csr(W)
    assert W_csr.crow_indices().dtype == W_csr.col_indices().dtype == torch.int32
    xT = torch.randn(24, 7)
    for _ in range(3):  # a fresh, unfilled output each call: garbage in it must never leak through
        torch.testing.assert_close(speed.csr_matmul(W_csr, xT), W @ xT, rtol=1e-5, atol=1e-6)


def test_siblings_share_one_transpose_and_outputs_stay_feature_major(monkeypatch):
    model = prune(build_tiny("llama"), 0.7)
    sparse, plan = speed.to_sparse_aware(model, None, force=True)
    modules = {n: m for n, m in sparse.named_modules() if isinstance(m, speed.CSRLinear)}
    layer0 = {n.rsplit(".", 1)[1]: m for n, m in modules.items() if ".layers.0." in n}
    assert {k for k, m in layer0.items() if m.token_major_out} == {"q_proj", "k_proj", "v_proj"}
    copies = []
    real = speed.feature_major
    monkeypatch.setattr(speed, "feature_major",
                        lambda x: copies.append(not x.reshape(-1, x.shape[-1]).t().is_contiguous()) or real(x))
    with torch.no_grad():
        sparse(**tiny_inputs("llama"))
    # per block: q/k/v share one transpose, o one, gate/up one; down reads the
    # MLP product, which is already feature-major, so its "transpose" is free
    blocks = model.config.num_hidden_layers
    assert len(copies) == 4 * blocks and sum(copies) == 3 * blocks


def test_transpose_cache_misses_a_changed_input():
    cache = speed.TransposeCache()
    x = torch.randn(5, 3)
    xT = cache.feature_major(x)
    assert cache.feature_major(x) is xT  # same tensor, unchanged: a hit
    x.mul_(2)  # written in place: its version moves on
    torch.testing.assert_close(cache.feature_major(x), x.t())
    assert cache.feature_major(x.clone()) is not cache.feature_major(x)  # equal values, another tensor


def test_csr_layers_pass_gradients_to_their_inputs():
    lin = torch.nn.Linear(8, 4)
    lin.weight.data = speed.sparse_weight((4, 8), 0.5)
    csr = speed.CSRLinear.from_module(lin, speed.TransposeCache(), token_major_out=False)
    x = torch.randn(3, 8, requires_grad=True)
    csr(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    lin(x_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_csr_linear_feature_major_output_is_a_transposed_view():
    lin = torch.nn.Linear(24, 10)
    lin.weight.data = speed.sparse_weight((10, 24), 0.6)
    csr = speed.CSRLinear.from_module(lin, speed.TransposeCache(), token_major_out=False)
    x = torch.randn(1, 6, 24)
    y = csr(x)
    assert y.shape == (1, 6, 10) and not y.is_contiguous() and y.reshape(6, 10).t().is_contiguous()
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checked, keeps_csr", [(1.3, True), (0.8, False)])
def test_tuning_keeps_the_plan_only_if_it_is_faster_end_to_end(checked, keeps_csr):
    model = prune(build_tiny("llama"), 0.9)
    t = synthetic_table([(s, sp, 3.0) for s in speed.prunable_shapes(model) for sp in (0.5, 0.95)])
    fake = pd.DataFrame({"model": ["dense", "sparse-aware"], "median_s": [1.0, 1 / checked],
                         "speedup": [1.0, checked], "repeats": 1})
    asked = []
    tuned, plan, got = speed.tune_sparse_aware(model, t, lambda ms: asked.append(list(ms)) or fake)
    assert got == checked and asked == [["dense", "sparse-aware"]]
    assert plan.use_csr.all() == keeps_csr and plan.use_csr.any() == keeps_csr
    assert (tuned is model) != keeps_csr  # a fall-back hands back the dense model itself
    # nothing worth converting: nothing to check
    slow = synthetic_table([(s, sp, 0.5) for s in speed.prunable_shapes(model) for sp in (0.5, 0.95)])
    tuned, plan, got = speed.tune_sparse_aware(model, slow, lambda ms: pytest.fail("checked a dense plan"))
    assert tuned is model and not plan.use_csr.any() and math.isnan(got)


def synthetic_table(rows, regime=None):
    """A layer_speed-shaped table from (shape, sparsity, speedup) triples."""
    out = []
    for shape, sp, su in rows:
        o, i = shape
        out.append({"shape": f"{o}x{i}", "out_features": o, "in_features": i, "sparsity": sp,
                    "tokens": 1 if regime == "decode" else 8, "dense_ms": 1.0, "csr_ms": 1.0 / su, "speedup": su}
                   | ({"regime": regime} if regime else {}))
    return pd.DataFrame(out)


def test_crossover_from_a_synthetic_table():
    t = synthetic_table([((8, 8), 0.5, 0.25), ((8, 8), 0.8, 0.5), ((8, 8), 0.9, 2.0), ((8, 8), 0.95, 4.0),
                         ((4, 8), 0.5, 0.5), ((4, 8), 0.9, 0.8),  # never wins
                         ((8, 4), 0.5, 1.5), ((8, 4), 0.9, 3.0),  # always wins
                         ((2, 8), 0.5, 2.0), ((2, 8), 0.7, 0.9), ((2, 8), 0.9, 1.2)])  # noisy: wins, loses, wins
    c = speed.crossover(t).set_index("shape")
    # log-linear between (0.8, 0.5) and (0.9, 2.0): log2 goes -1 -> 1, zero half way.
    assert c.loc["8x8", "crossover_sparsity"] == pytest.approx(0.85)
    assert math.isnan(c.loc["4x8", "crossover_sparsity"])
    assert c.loc["8x4", "crossover_sparsity"] == 0.5
    assert 0.7 < c.loc["2x8", "crossover_sparsity"] < 0.9  # above the last point where it lost
    assert c.loc["8x8", "speedup@0.95"] == pytest.approx(4.0)
    # a margin moves the crossover up: 1.2x is reached later than 1.0x
    assert speed.crossover(t, margin=0.2).set_index("shape").loc["8x8", "crossover_sparsity"] > 0.85


def test_predicted_speedup_interpolates_and_borrows_the_nearest_shape():
    t = synthetic_table([((8, 8), 0.5, 0.25), ((8, 8), 0.9, 4.0), ((100, 100), 0.5, 9.0), ((100, 100), 0.9, 9.0)])
    assert speed.predicted_speedup(t, (8, 8), 0.7) == pytest.approx(1.0)
    assert speed.predicted_speedup(t, (8, 8), 0.99) == pytest.approx(4.0)  # flat beyond
    assert speed.predicted_speedup(t, (4, 16), 0.7) == pytest.approx(1.0)  # 64 weights: like 8x8
    assert speed.predicted_speedup(t, (90, 120), 0.7) == pytest.approx(9.0)


def test_plan_picks_csr_only_where_the_table_says_it_pays():
    model = build_tiny("llama")  # attn 32x32 / 16x32 (k, v), mlp 64x32 and 32x64
    prune(model, 0.9)
    shapes = sorted({pl.shape for pl in prunable_layers(model)})
    rows = []
    for s in shapes:
        wins = s == (64, 32)  # only the mlp up/gate shape gains from CSR
        rows += [(s, 0.5, 0.3), (s, 0.95, 2.0 if wins else 0.8)]
    t = synthetic_table(rows)
    sparse, plan = speed.to_sparse_aware(model, t, margin=0.1)
    chosen = set(plan.loc[plan.use_csr, "shape"])
    assert chosen == {"64x32"}
    assert plan.sparsity.between(0.89, 0.91).all()
    converted = {n for n, m in sparse.named_modules() if isinstance(m, speed.CSRLinear)}
    assert converted == set(plan.loc[plan.use_csr, "name"]) and converted
    # at 50% nothing pays: the sparse-aware model is the dense model
    dense_model = prune(build_tiny("llama"), 0.5)
    _, plan50 = speed.to_sparse_aware(dense_model, t, margin=0.1)
    assert not plan50.use_csr.any()


def test_time_calls_interleaves_and_reports_every_repeat():
    calls = []
    times = measure.time_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             warmup=1, repeats=4)
    assert len(times) == 8 and set(times.name) == {"a", "b"}
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotating order
    assert (times.seconds >= 0).all() and (times.cpu_seconds >= 0).all()
    assert list(measure.median_seconds(times).index) == ["a", "b"]
    assert list(measure.median_seconds(times, "cpu_seconds").index) == ["a", "b"]


def test_num_threads_pins_and_restores():
    before = torch.get_num_threads()
    with measure.num_threads(1):
        assert torch.get_num_threads() == 1
        with measure.num_threads(None):  # None: leave as is
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), measure.num_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_layer_speed_table_shape():
    t = speed.layer_speed([(16, 8), (8, 16)], [0.5, 0.9], speed.Timing(tokens=4, warmup=0, repeats=1))
    assert len(t) == 4 and set(t["shape"]) == {"16x8", "8x16"} and set(t.regime) == {"prefill"}
    assert (t.speedup == t.dense_ms / t.csr_ms).all()
    assert (t.drop_in_speedup == t.dense_ms / t.drop_in_ms).all()
    assert (t.dense_copies == 1).all() and (t.csr_copies == 1).all()


def test_decode_timing_cycles_through_copies_of_each_format():
    timing = speed.Timing(tokens=1, warmup=0, repeats=1, cycle_mib=1)
    assert timing.regime == "decode" and timing.copies(2**20) == 2 and timing.copies(2**18) == 4
    t = speed.layer_speed([(64, 128)], [0.5, 0.9], timing)
    assert set(t.regime) == {"decode"} and (t.tokens == 1).all()
    W = speed.sparse_weight((64, 128), 0.9)
    csr = speed.csr_bytes(speed.to_csr(W))
    assert csr == int((W != 0).sum()) * 8 + 65 * 4  # fp32 values and int32 column indices, 65 row pointers
    row = t.set_index("sparsity").loc[0.9]
    assert row.dense_copies == 2**20 // (64 * 128 * 4) and row.csr_copies == math.ceil(2**20 / csr)
    assert row.byte_limit == pytest.approx(64 * 128 * 4 / csr)
    assert row.dense_gb_s == pytest.approx(64 * 128 * 4 / (row.dense_ms / 1e3) / 1e9)
    with pytest.raises(ValueError, match="Timing.cycle_mib"):
        speed.Timing(cycle_mib=-1)


def test_crossover_and_predictions_per_regime():
    t = pd.concat([synthetic_table([((8, 8), 0.5, 0.5), ((8, 8), 0.9, 2.0)], "prefill"),
                   synthetic_table([((8, 8), 0.5, 1.5), ((8, 8), 0.9, 4.0)], "decode")])
    c = speed.crossover(t).set_index(["regime", "shape"])
    assert c.loc[("prefill", "8x8"), "crossover_sparsity"] == pytest.approx(0.7)
    assert c.loc[("decode", "8x8"), "crossover_sparsity"] == 0.5
    wide = speed_view.regimes_table(t).set_index("shape")
    assert wide.loc["8x8", "crossover_prefill"] == pytest.approx(0.7) and wide.loc["8x8", "decode@0.9"] == 4.0
    with pytest.raises(ValueError, match="one regime"):
        speed.predicted_speedup(t, (8, 8), 0.7)
    assert speed.predicted_speedup(t[t.regime == "decode"], (8, 8), 0.9) == pytest.approx(4.0)


def test_token_bytes_by_hand():
    layers, other = [((4, 8), 8)], 100  # one 4 x 8 weight with 8 nonzeros, 100 bytes of the rest
    assert formats.token_bytes("dense", layers, other) == 4 * 8 * 4 + 100
    assert formats.token_bytes("csr", layers, other) == 8 * 4 + 5 * 1 + 8 * 1 + 100  # values, uint8 rows, columns
    assert formats.token_bytes("bitmask", layers, other) == 32 // 8 + 8 * 4 + 100  # one bit per weight, values
    assert formats.token_bytes("dense-int8", layers, other) == 4 * 8 + 4 * 4 + 100  # int8 values, a scale per row
    assert formats.token_bytes("nm", [((4, 8), 16)], 0, pattern="2:4") == 16 * 4 + 16 * 2 // 8  # 2 bits a position


def test_token_reads_count_the_head_once_and_one_embedding_row():
    llama = prune(build_tiny("llama"), 0.75)  # hidden 32, vocab 64, 2 blocks, tied head
    layers, other, bits = formats.token_reads(llama)
    assert bits == 32 and len(layers) == 14
    assert sum(o * i for (o, i), _ in layers) == 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)
    assert sum(n for _, n in layers) == sum(int((pl.weight != 0).sum()) for pl in prunable_layers(llama))
    assert other == (64 * 32 + 5 * 32) * 4  # the tied table read whole by the head; 5 norm vectors
    gpt2 = build_tiny("gpt2")  # wte tied to the head; wpe read one row per token
    _, other, _ = formats.token_reads(gpt2)
    norms_and_biases = sum(p.numel() for n, p in gpt2.named_parameters()
                           if not n.endswith(("wte.weight", "wpe.weight")) and "attn.c_attn.weight" not in n
                           and not n.endswith(("c_proj.weight", "c_fc.weight")))
    assert other == (64 * 32 + 32 + norms_and_biases) * 4


@pytest.mark.parametrize("check_speedup", [1.5, 0.5])
def test_generation_on_a_tiny_model(tiny_dirs, cache_with_data, monkeypatch, check_speedup):
    name = str(tiny_dirs["llama"])
    model = prune(build_tiny("llama"), 0.9)
    wins = synthetic_table([(s, sp, 3.0) for s in speed.prunable_shapes(model) for sp in (0.5, 0.95)], "decode")
    real = speed.generation_speed

    def timed(models, prompt, gen):  # the real generations, a deterministic clock
        t, ids = real(models, prompt, gen)
        tps = [10.0, 10.0 * check_speedup][:len(t)]
        return t.assign(tokens_per_s=tps, speedup=[v / tps[0] for v in tps]), ids

    monkeypatch.setattr(speed, "generation_speed", timed)
    gen = speed.Generation(new_tokens=5, prompt_tokens=6, warmup=0, repeats=1, stream_mib=1)
    t = speed.generation_sweep(name, "magnitude", [0.9], wins, gen)
    assert list(t.format) == list(speed.GENERATION_FORMATS)
    r = t.set_index("format").loc["csr"]
    kept = check_speedup > 1
    assert r.csr_layers == (r.layers if kept else 0) == (14 if kept else 0) and r.fell_back != kept
    assert r.speedup == pytest.approx(check_speedup if kept else 1.0) and r.checked_speedup == check_speedup
    assert r.tokens_per_s_dense == 10.0 and r.stream_gb_s > 0 and r.prompt_tokens == 6
    # the same pruned weights dense and in CSR: the same logits, and the same text but for a near tie
    assert r.logits_agree and r.logits_max_abs_diff < 1e-4
    assert r.texts_equal or r.divergence_margin < 1e-3
    assert 1 < r.byte_limit < 10 and (r.run_byte_limit > 1) == kept
    assert t.set_index("format").loc["bitmask", "byte_limit"] > 1
    # where the decode table says CSR loses, no layer is converted and nothing is checked
    loses = wins.assign(speedup=0.5)
    t = speed.generation_sweep(name, "magnitude", [0.9], loses, gen).set_index("format")
    assert t.loc["csr", "csr_layers"] == 0 and math.isnan(t.loc["csr", "checked_speedup"])
    assert t.loc["csr", "speedup"] == 1.0 and t.loc["csr", "run_byte_limit"] == 1.0


def test_formats_check_reports_the_first_divergence_with_its_margin():
    dense = build_tiny("llama")
    other = build_tiny("llama")
    torch.manual_seed(1)
    for p in other.parameters():  # another model: its greedy text parts from the first
        p.data.normal_()
    prompt = torch.tensor([[1, 5, 9, 12]])
    c = speed.compare_formats(dense, other, prompt, 6)
    assert not c["logits_agree"] and not c["texts_equal"]
    k = c["first_divergence"]
    d, s = c["ids"]["dense"][0, 4 + k], c["ids"]["sparse"][0, 4 + k]
    assert d != s and c["divergence_margin"] > 0
    assert torch.equal(c["ids"]["dense"][0, :4 + k], c["ids"]["sparse"][0, :4 + k])


def test_model_shapes_from_the_config_alone(tiny_dirs):
    shapes = speed.model_shapes(str(tiny_dirs["llama"]))
    assert shapes == speed.prunable_shapes(build_tiny("llama")) == [(16, 32), (32, 32), (32, 64), (64, 32)]


def test_speed_conclusions_follow_the_numbers():
    t = synthetic_table([((8, 8), 0.5, 0.25), ((8, 8), 0.9, 2.0), ((4, 8), 0.5, 0.5), ((4, 8), 0.9, 0.8)])
    t["threads"], t["load_avg"] = 2, 1.0
    text = speed_view.speed_conclusions(t)
    assert "for 1 of 2 layer shapes" in text and "never for 4x8" in text
    t.loc[t["shape"] == "8x8", "speedup"] = 0.5
    assert "CSR never beats the dense matmul" in speed_view.speed_conclusions(t)
    fwd = pd.DataFrame([{"label": "Tiny", "tokens": 8, "sparsity": 0.9, "sparse_aware_speedup": 1.3,
                         "sparse_aware_is_dense": False, "csr_layers": 3, "layers": 4, "all_csr_speedup": 0.8,
                         "checked_speedup": 1.25, "fell_back": False, "flop_limit": 2.5, "unprunable_share": 0.2}])
    text = speed_view.speed_conclusions(t, fwd)
    assert "1.30x dense (3 of 4 layers in CSR) against a multiply-add limit of 2.50x" in text
    assert "2 threads" in speed_view.timing_conditions(t)
    fwd = fwd.assign(sparse_aware_speedup=1.0, sparse_aware_is_dense=True, csr_layers=0, checked_speedup=0.9,
                     fell_back=True)
    assert "ran at 0.90x dense in a first timing, so it falls back" in speed_view.speed_conclusions(t, fwd)


def test_speed_conclusions_state_both_regimes():
    t = pd.concat([synthetic_table([((8, 8), 0.5, 0.25), ((8, 8), 0.9, 2.0)], "prefill"),
                   synthetic_table([((8, 8), 0.5, 0.5), ((8, 8), 0.7, 1.5)], "decode")])
    t["threads"], t["load_avg"], t["dense_copies"], t["csr_copies"] = 2, 1.0, 3, 9
    gen = pd.DataFrame([{"label": "Tiny", "sparsity": sp, "format": f, "new_tokens": 32, "speedup": su,
                         "byte_limit": bl, "run_byte_limit": 1.4, "csr_layers": n, "layers": 4, "fell_back": False,
                         "checked_speedup": 1.1, "dense_of_stream": 0.61, "stream_gb_s": 30.0}
                        for sp, su, n in ((0.7, 1.2, 4), (0.9, 2.5, 4)) for f, bl in (("csr", 1.5), ("bitmask", 2.1))])
    text = speed_view.speed_conclusions(t, None, gen)
    assert "**Prefill** (8-token inputs" in text and "**Generation**" in text
    prefill, decode = text.split("**Generation**")
    assert "from 77% sparsity up" in prefill and "from 63% sparsity up" in decode  # log-linear between points
    assert ("runs at 1.20x at 70% (4 of 4 layers in CSR; 86% of the 1.40x byte limit of the model as run, "
            "1.50x in CSR with the smallest indices, 2.10x as a bitmask)") in text
    assert "2.50x at 90% (" in text and "61% of the 30.0 GB/s" in text
    assert text.count(". ") == 1  # one sentence per regime
    assert "3 dense and 9 CSR copies" in speed_view.timing_conditions(t)
    head = speed_view.speed_headline(t, gen)
    assert head.startswith("Per layer, CSR beats the dense matmul from 77% sparsity on a prompt and from 63% "
                           "sparsity generating one token at a time; greedy generation runs at 1.20x, 2.50x dense")
    assert "(byte limits as run 1.40x, 1.40x)." in head
    # a shape that already wins at the lowest sparsity timed has its crossover there or below;
    # and the dense kernel's one-token rate is stated beside the streaming rate
    decode = synthetic_table([((8, 8), 0.5, 1.2), ((8, 8), 0.7, 1.5), ((4, 8), 0.5, 0.5), ((4, 8), 0.7, 1.5)],
                             "decode").assign(dense_gb_s=[10.2, 9.8, 14.4, 13.6])
    both = pd.concat([t[t.regime == "prefill"], decode]).assign(threads=2, load_avg=1.0)
    text = speed_view.speed_conclusions(both, None, gen)
    assert "for 2 of 2 layer shapes: 1 already at 50%, the lowest sparsity timed, 1 from 63% up" in text
    assert "dense one-token products read their weights at 10–14 GB/s and dense generation at 61%" in text
    assert "from 50% or below (1 of 2 shapes) to 63% generating" in speed_view.speed_headline(both, gen)
    assert "A crossover of 50%, the lowest sparsity timed, means CSR already wins there" in \
        speed_view.timing_conditions(both.assign(dense_copies=3, csr_copies=9))
    assert "lowest sparsity timed" not in speed_view.timing_conditions(t)
    fell = gen.assign(csr_layers=0, fell_back=True, speedup=1.0, run_byte_limit=1.0)
    assert "1.00x at 70% (its CSR plan ran at 1.10x dense in a first timing, so it falls back to dense; byte limit " \
           "1.50x in CSR" in speed_view.speed_conclusions(both, None, fell)
    assert speed_view.speed_headline(t.assign(speedup=0.5)) == (
        "Per layer, CSR beats the dense matmul at no sparsity up to 90% on a prompt and at no sparsity up to 90% "
        "generating one token at a time.")
