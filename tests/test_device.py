"""Devices and dtypes: one line for what cannot run here, what fits on a GPU, and the block-offload
engine forced on the CPU equal, bit for bit, to the in-place engine."""

import copy
import warnings
from pathlib import Path

import pytest
import torch

from lab_utils.core import device as devices
from lab_utils.core.evaluation import perplexity
from lab_utils.core.models import load_model, prunable_layers
from lab_utils.engine import config, prune
from lab_utils.report import params


# --------------------------------------------------------------------------- one line each
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_device_names_what_torch_sees():
    with pytest.raises(devices.DeviceError) as e:
        devices.resolve_device("cuda:1")
    assert "torch sees no CUDA device" in str(e.value) and "cpu" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(params.ParamError, match="torch sees"):
        params.validate({"device": "cuda", "dtype": "auto"})


def test_bad_device_and_dtype_names_and_float16_on_the_cpu():
    for bad, match in [(lambda: devices.resolve_device("gpu"), "not one of auto, cpu"),
                       (lambda: devices.resolve_dtype("half", "cpu"), "not one of auto, float32"),
                       (lambda: devices.resolve_dtype("float16", "cpu"), "not supported on the CPU"),
                       (lambda: config.PruneConfig("wanda", 0.5, dtype="float16"), "not supported on the CPU")]:
        with pytest.raises(devices.DeviceError, match=match) as e:
            bad()
        assert "\n" not in str(e.value)
    with pytest.raises(params.ParamError, match="float16"):
        params.validate({"device": "cpu", "dtype": "float16"})


def test_auto_resolves_to_what_torch_sees():
    dev = devices.resolve_device("auto")
    assert str(dev) in devices.available() or dev.type == "cuda"
    assert devices.resolve_dtype("auto", "cpu") == torch.float32
    assert devices.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert devices.peak_memory("cpu") is None and devices.device_name("cpu")
    assert devices.describe("cpu", "auto")["dtype"] == "float32"


# --------------------------------------------------------------------------- the cache key
def test_cpu_float32_keeps_the_old_keys_and_other_devices_split_them():
    from test_prune import EMBEDDED, LLAMA

    base = config.PruneConfig("wanda", 0.5, "2:4")
    explicit = config.PruneConfig("wanda", 0.5, "2:4", device="cpu", dtype="float32")
    assert explicit == base and base.device == "cpu" and base.dtype == "float32"
    key = config.checkpoint_key(EMBEDDED, base, LLAMA)
    assert key == "6fdfa10039656e48"  # the key test_prune pins for these settings
    bf16 = config.PruneConfig("wanda", 0.5, "2:4", dtype="bfloat16")
    assert config.checkpoint_key(EMBEDDED, bf16, LLAMA) != key
    resolved = config.resolve_config(EMBEDDED, base, LLAMA)
    cuda, cuda0 = copy.copy(resolved), copy.copy(resolved)  # a GPU this machine may lack: set, not checked
    object.__setattr__(cuda, "device", "cuda:1")
    object.__setattr__(cuda0, "device", "cuda")
    assert config.checkpoint_key(EMBEDDED, cuda, LLAMA) == config.checkpoint_key(EMBEDDED, cuda0, LLAMA) != key
    # magnitude runs on the host: the device cannot split its cache
    assert config.PruneConfig("magnitude", 0.5, dtype="bfloat16").dtype == "float32"


# --------------------------------------------------------------------------- offload == in place
def _weights(lm):
    return [pl.weight.clone() for pl in prunable_layers(lm.model)]


@pytest.mark.parametrize("kind", ["llama", "bart", "bert"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_offload_on_the_cpu_equals_the_in_place_engine(tiny_dirs, kind, method):
    cfg = config.PruneConfig(method, 0.5, nsamples=3, seqlen=32)
    default = load_model(str(tiny_dirs[kind]))
    prune.prune_model(default, cfg)
    explicit = load_model(str(tiny_dirs[kind]))
    prune.prune_model(explicit, config.PruneConfig(method, 0.5, nsamples=3, seqlen=32, device="cpu"))
    offloaded = load_model(str(tiny_dirs[kind]))
    host = {id(p): p.data.data_ptr() for p in offloaded.model.parameters()}
    report = prune.prune_model(offloaded, cfg, offload=True)
    assert report.device == "cpu" and report.dtype == "float32" and report.peak_device_memory_bytes is None
    # the pruned weights came back into the host tensors they left
    assert {id(p): p.data.data_ptr() for p in offloaded.model.parameters()} == host
    a, b, c = _weights(default), _weights(explicit), _weights(offloaded)
    assert report.actual_sparsity == pytest.approx(0.5, abs=0.02)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    if kind == "llama":
        windows = torch.randint(7, 60, (4, 32), generator=torch.Generator().manual_seed(0))
        p_in, p_off = (perplexity.perplexity(m.model, windows) for m in (default, offloaded))
        assert p_in == p_off


def test_bfloat16_forward_prunes_to_the_same_counts_with_float32_weights(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    report = prune.prune_model(lm, config.PruneConfig("sparsegpt", 0.5, "2:4", nsamples=3, seqlen=32,
                                                      dtype="bfloat16"), offload=True)
    assert report.nm_verified and report.dtype == "bfloat16"
    assert all(pl.weight.dtype == torch.float32 for pl in prunable_layers(lm.model))


# --------------------------------------------------------------------------- what fits
def test_footprint_arithmetic_on_a_hand_computed_mixture_of_experts():
    from lab_utils.experiments.footprint import BlockShape, block_footprint, expert_footprint

    # hidden 8, an expert's intermediate 4, 2 heads of 6 (q and o 12 wide), 1 kv head, 4 experts, top 2
    shape = BlockShape(8, 4, heads=2, kv_heads=1, blocks=3, head_dim=6, experts=4, experts_per_token=2)
    calib = {"nsamples": 2, "seqlen": 3, "act_bytes": 2, "batch_tokens": 5}
    sgpt = block_footprint(shape, "sparsegpt", **calib)
    # q, o 8x12 each; k, v 8x6 each; 4 experts x 3 x 8x4; router 4x8: 192 + 96 + 384 + 32 = 704 weights
    assert sgpt["weights"] == 704 * 4
    assert sgpt["activations"] == 2 * 2 * 3 * 8 * 2  # input and output, 2 x 3 tokens x 8 wide, 2 bytes
    # Hessians: q, k, v 8x8, o 12x12 = 336; per expert gate, up 8x8, down 4x4 = 144, x 4 = 576
    assert sgpt["statistics"] == (336 + 576) * 4
    # 3 temporaries of 5 tokens x 2 experts x 4; the largest Hessian (o's, 12x12) and its inverse
    assert sgpt["working"] == (3 * 5 * 2 * 4 + 2 * 144) * 4
    assert sgpt["total"] == 2816 + 192 + 3648 + 1632
    wanda = block_footprint(shape, "wanda", **calib)
    assert wanda["statistics"] == (8 + 8 + 8 + 12 + 4 * (8 + 8 + 4)) * 4 and wanda["working"] == 480
    assert wanda["total"] == 2816 + 192 + 464 + 480
    assert expert_footprint(shape, "sparsegpt") == {"weights": 3 * 8 * 4 * 4, "statistics": 144 * 4}
    assert expert_footprint(shape, "wanda") == {"weights": 384, "statistics": 20 * 4}
    with pytest.raises(ValueError, match="'wanda' and 'sparsegpt'"):
        block_footprint(shape, "magnitude")


def test_footprint_counts_the_weights_of_real_blocks_and_a_dense_block_as_before():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    from lab_utils.experiments.footprint import BlockShape, block_footprint

    common = {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1}
    blocks = [(MixtralDecoderLayer(MixtralConfig(**common, intermediate_size=24, num_local_experts=4,
                                                 num_experts_per_tok=2), 0),
               BlockShape(16, 24, heads=4, kv_heads=2, blocks=1, experts=4, experts_per_token=2)),
              (Qwen3MoeDecoderLayer(Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=12, num_experts=4,
                                                   num_experts_per_tok=2), 0),
               BlockShape(16, 12, heads=4, kv_heads=2, blocks=1, head_dim=8, experts=4, experts_per_token=2))]
    for layer, shape in blocks:  # every parameter but the norms, fused 3-D experts included
        numel = sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n)
        assert block_footprint(shape)["weights"] == numel * 4, type(layer).__name__
    p = block_footprint(BlockShape(4096, 11008, heads=32, kv_heads=32, blocks=32), "sparsegpt")
    assert p["activations"] == 2 * 128 * 2048 * 4096 * 2
    assert p["statistics"] == (6 * 4096 ** 2 + 11008 ** 2) * 4
    assert p["working"] == (3 * 8192 * 11008 + 2 * 11008 ** 2) * 4


def test_the_footprint_tables_are_the_ones_benchmarks_readme_shows():
    from transformers import MixtralConfig

    from lab_utils.experiments import footprint

    mixtral, defaults = footprint.MOE_SHAPES["Mixtral-8x7B"], MixtralConfig()  # its defaults are Mixtral-8x7B's
    assert (mixtral.hidden, mixtral.intermediate, mixtral.heads, mixtral.kv_heads, mixtral.blocks, mixtral.experts,
            mixtral.experts_per_token) == (defaults.hidden_size, defaults.intermediate_size,
                                           defaults.num_attention_heads, defaults.num_key_value_heads,
                                           defaults.num_hidden_layers, defaults.num_local_experts,
                                           defaults.num_experts_per_tok)
    dense, moe = footprint.footprint_table(), footprint.footprint_table(footprint.MOE_SHAPES)
    assert len(dense) == 6 and "experts" not in dense and len(moe) == 4
    assert list(moe.tokens_per_expert) == [128 * 2048 * 2 // 8] * 2 + [128 * 2048 * 8 // 128] * 2
    readme = (Path(__file__).resolve().parents[1] / "benchmarks" / "README.md").read_text()
    for table in (dense, moe):
        assert table.to_markdown(index=False) in readme


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_command_line_refuses_a_missing_device_before_loading(capsys):
    from lab_utils.__main__ import main

    assert main(["perplexity", "--model", "no-such-model", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torch sees no CUDA device" in err  # not "unknown model": before any work
    assert main(["prune", "--model", "no-such-model", "--method", "wanda", "--sparsity", "0.5",
                 "--dtype", "float16"]) == 2
    assert "float16" in capsys.readouterr().err


def test_cpu_float32_adds_nothing_to_a_key_another_dtype_does():
    assert devices.resolved("cpu", "auto") == ("cpu", "float32")
    assert devices.engine_kwargs("cpu", "auto") == {}
    assert devices.engine_kwargs("cpu", "bfloat16") == {"device": "cpu", "dtype": "bfloat16"}


def test_the_notebook_04_config_carries_the_resolved_device():
    import ast

    defaults = {n: ast.literal_eval(i["default"]) for n, i in params.declared("04_benchmarks").items()}
    cfg = params.benchmark_config(defaults)
    assert (cfg.device, cfg.dtype) == devices.resolved("auto", "auto") == ("cpu", "float32")
    cfg = params.benchmark_config({**defaults, "dtype": "bfloat16"})
    assert cfg.dtype == "bfloat16"


@pytest.mark.parametrize(("amx", "avx", "expected"), [(True, True, "AMX"), (False, True, "AVX512-BF16"),
                                                      (False, False, None)])
def test_native_bf16_is_detected_not_assumed(monkeypatch, amx, avx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
    assert devices.cpu_bf16() == expected
    if expected is None:
        with pytest.warns(UserWarning, match="without native bfloat16"):
            assert devices.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert devices.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
