"""The GPU benchmark's comparison code, run CPU against the CPU's offload path
on a tiny model (its asserts run on every test run), and its checks can fail."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_gpu  # noqa: E402


def test_cpu_against_the_offload_path_passes_the_criteria():
    table = bench_gpu.compare_devices(bench_gpu.TINY, "cpu", nsamples=4, seqlen=32, offload_b=True)
    assert len(table) == len(bench_gpu.SETTINGS)
    assert (table.mask_agreement == 1.0).all() and (table.error_rel_diff == 0).all()
    assert (table.error_a > 0).all()


def test_the_checks_fail_on_a_different_pruning():
    dense = bench_gpu.build_model(bench_gpu.TINY)
    tokens = bench_gpu.random_tokens(bench_gpu.TINY, 4, 32, seed=1)
    held = bench_gpu.random_tokens(bench_gpu.TINY, 2, 32, seed=2)
    a, _ = bench_gpu.prune_copy(dense, "wanda", "unstructured", tokens)
    b, _ = bench_gpu.prune_copy(dense, "wanda", "unstructured", tokens, dtype="bfloat16")
    c, _ = bench_gpu.prune_copy(dense, "sparsegpt", "unstructured", tokens)
    row = bench_gpu.compare(dense, a, c, "wanda", "unstructured", held)  # another method's mask
    assert row["mask_agreement"] < 0.99
    with pytest.raises(AssertionError, match="masks differ"):
        bench_gpu.check(row)
    row = bench_gpu.compare(dense, a, b, "sparsegpt", "unstructured", held)  # a bf16 forward: close, not equal
    assert 0.9 < row["mask_agreement"] <= 1.0


@pytest.mark.slow
def test_the_smollm2_literals_match_its_config():
    import json

    from lab_utils.core.models import embedded_model_dir

    folder, _ = embedded_model_dir("smollm2-135m")  # converted from its PyPI package when not cached
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in bench_gpu.SMOLLM2_135M.items():
        if k == "rope_theta":
            assert cfg.get("rope_parameters", cfg).get("rope_theta", cfg.get("rope_theta")) == v
        else:
            assert k in cfg and cfg[k] == pytest.approx(v), k
