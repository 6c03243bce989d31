"""The arithmetic behind benchmarks/: the compute floor of calibrated pruning."""

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
    assert flops["wanda"] == 10 * (3 * (per_token - last) + 2 * per_token)
    # X^T X once for the input that a and b share (d = 4), once for c's (d = 8)
    assert flops["sparsegpt"] == flops["wanda"] + 10 * 3 * (2 * 16 + 2 * 64)
