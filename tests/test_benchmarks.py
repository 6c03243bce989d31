"""The arithmetic behind benchmarks/: the compute floor of calibrated pruning."""

import pytest

from benchmarks import bench_sparsify
from lab_utils.core.models import load_model


def test_block_linears_follow_the_call_order_and_shared_inputs(tiny_dirs):
    calls = bench_sparsify.block_linears(load_model(str(tiny_dirs["llama"])))
    names = [c["name"] for c in calls]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    inputs = {c["name"]: c["input"] for c in calls}
    assert inputs["self_attn.q_proj"] == inputs["self_attn.k_proj"] == inputs["self_attn.v_proj"]
    assert inputs["mlp.gate_proj"] == inputs["mlp.up_proj"] != inputs["self_attn.q_proj"]
    shapes = {c["name"]: (c["out"], c["in"]) for c in calls}
    # hidden 32, 4 heads of 8, 2 key/value heads, intermediate 64
    assert shapes["self_attn.k_proj"] == (16, 32) and shapes["mlp.down_proj"] == (32, 64)


def test_block_linears_read_conv1d_as_in_by_out(tiny_dirs):
    calls = bench_sparsify.block_linears(load_model(str(tiny_dirs["gpt2"])))
    assert (calls[0]["in"], calls[0]["out"]) == (32, 96)  # c_attn: q, k and v in one matrix


def test_calibration_flops_count_two_passes_and_one_hessian_per_input():
    linears = [{"name": "a", "in": 4, "out": 8, "input": 1}, {"name": "b", "in": 4, "out": 2, "input": 1},
               {"name": "c", "in": 8, "out": 4, "input": 2}]
    per_token = 2 * (32 + 8 + 32)  # 144
    last = 2 * 32
    flops = bench_sparsify.calibration_flops(linears, n_blocks=3, tokens=10)
    assert flops["wanda"] == flops["linear"] == 10 * (3 * (per_token - last) + 2 * per_token)
    # X^T X once for the input that a and b share (d = 4), once for c's (d = 8): its upper triangle
    assert flops["sparsegpt"] == flops["wanda"] + 10 * 3 * (4 * 5 + 8 * 9)


def test_calibration_flops_count_causal_attention_in_every_pass():
    linears = [{"name": "a", "in": 4, "out": 8, "input": 1}]
    # two windows of 5 tokens, width 6: per window Q K^T and A V over the 15 (query, key)
    # pairs of the lower triangle, 2 * 6 operations each; in 3 statistics passes and 2 outputs passes
    flops = bench_sparsify.calibration_flops(linears, n_blocks=3, tokens=10, seqlen=5, attention_width=6)
    assert flops["attention"] == 2 * 2 * (2 * 6 * 15) * (3 + 2)
    assert flops["wanda"] == flops["linear"] + flops["attention"]
    assert flops["sparsegpt"] - flops["wanda"] == 10 * 3 * 4 * 5
    # the reference drivers: 3 blocks, each run whole twice
    assert flops["reference_wanda"] == 10 * 3 * 2 * (2 * 4 * 8 + 2 * 6 * 6)
    assert flops["reference_sparsegpt"] == flops["reference_wanda"] + 10 * 3 * 2 * 4 * 4


def test_attention_width_is_heads_times_head_size():
    from types import SimpleNamespace

    assert bench_sparsify.attention_width(SimpleNamespace(num_attention_heads=9, head_dim=64, hidden_size=576)) == 576
    assert bench_sparsify.attention_width(SimpleNamespace(num_attention_heads=8, head_dim=256, hidden_size=1024)) == 2048
    assert bench_sparsify.attention_width(SimpleNamespace(hidden_size=32)) == 32


def test_profile_categories_follow_the_operator_and_its_stage():
    from benchmarks.bench_profile import category

    fwd = ("lab::prune", "lab::statistics_pass")
    assert category("aten::linear", fwd, "wanda") == "linear layers"
    assert category("aten::scaled_dot_product_attention", ("lab::prune", "lab::propagate"), "wanda") == "attention"
    assert category("aten::mul", fwd, "wanda") == "norms and elementwise"
    assert category("aten::mm", (*fwd, "lab::statistics_update"), "sparsegpt") == "statistics"
    assert category("aten::_to_copy", (*fwd, "lab::statistics_update"), "sparsegpt") == "copies between stages"
    layer = ("lab::prune", "lab::prune_layer")
    assert category("aten::kthvalue", layer, "wanda") == "mask selection"
    assert category("aten::topk", layer, "sparsegpt") == "mask selection"
    assert category("aten::addr_", layer, "sparsegpt") == "SparseGPT column loop"
    assert category("aten::linalg_cholesky_ex", (*layer, "lab::sparsegpt_inverse"), "sparsegpt") == "SparseGPT inverse"
    assert category("aten::copy_", ("lab::prune", "lab::copies"), "wanda") == "copies between stages"
    assert category("aten::embedding", ("lab::prune",), "wanda") == "outside the stages"


def test_profile_accounts_for_the_whole_pruning_time(tiny_dirs):
    from benchmarks import bench_profile

    dense = load_model(str(tiny_dirs["llama"]))
    args = bench_profile.parse_args(["--nsamples", "4", "--seqlen", "16", "--threads", "1"])
    for method, own in (("wanda", "mask selection"), ("sparsegpt", "SparseGPT column loop")):
        table, meta = bench_profile.profile_one(dense, method, args)
        assert list(table.index) == bench_profile.CATEGORIES
        assert (table.seconds >= 0).all()
        assert table.loc["linear layers", "seconds"] > 0 and table.loc[own, "seconds"] > 0
        # the categories partition the engine's clock (the profiler's clock differs by microseconds)
        assert abs(table.seconds.sum() - meta["wall_s"]) <= 0.05 * meta["wall_s"] + 0.01


def test_block_forward_floor_times_one_block_against_its_floor(tiny_dirs):
    alone = bench_sparsify.block_forward_floor(load_model(str(tiny_dirs["llama"])), seqlen=16, threads=1,
                                               repeats=2)
    assert alone["tokens"] % 16 == 0 and alone["tokens"] > 0
    assert alone["forward_s"] > 0 and alone["floor_s"] > 0
    assert alone["ratio"] == alone["forward_s"] / alone["floor_s"]
    # the floor counts the block's layers and its causal attention over the slice, at the rate printed
    lm = load_model(str(tiny_dirs["llama"]))
    per_token = sum(2 * c["in"] * c["out"] for c in bench_sparsify.block_linears(lm))
    per_token += 2 * bench_sparsify.attention_width(lm.model.config) * 17
    flops = alone["floor_s"] * alone["gflops_per_s"] * 1e9
    assert flops == pytest.approx(alone["tokens"] * per_token, rel=1e-9)
