"""Devices and dtypes: one line for what cannot run here, and the block-offload
engine forced on the CPU equal, bit for bit, to the in-place engine."""

import copy
import warnings

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


def test_footprint_arithmetic():
    from lab_utils.experiments import footprint

    p = footprint.block_footprint(4096, 11008, method="sparsegpt", nsamples=128, seqlen=2048, act_bytes=2)
    assert p["activations"] == 2 * 128 * 2048 * 4096 * 2
    assert p["statistics"] == (6 * 4096 ** 2 + 11008 ** 2) * 4
    assert p["total"] == sum(v for k, v in p.items() if k != "total")
    table = footprint.footprint_table()
    assert set(table.method) == {"wanda", "sparsegpt"} and len(table) == 6


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
