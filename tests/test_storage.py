import math

import pandas as pd
import pytest
import torch
from tiny_models import KINDS, build_tiny

from lab_utils.core import formats, sparse_file
from lab_utils.core.models import prunable_layers
from lab_utils.experiments import file_sizes as st
from lab_utils.presentation import file_sizes_view


def prune_2_4(model):
    """Zero the 2 smallest of every 4 weights by multiplying with the mask, so
    negative weights leave -0.0 behind (as a masked multiply does in practice)."""
    for pl in prunable_layers(model):
        W = pl.weight
        groups = W.reshape(W.shape[0], -1, 4)
        drop = groups.abs().argsort(dim=-1)[..., :2]
        mask = torch.ones_like(groups).scatter_(-1, drop, 0.0)
        pl.set_weight((groups * mask).reshape(W.shape))
    return model


def prune_random(model, sparsity_ratio, seed=0):
    g = torch.Generator().manual_seed(seed)
    for pl in prunable_layers(model):
        W = pl.weight
        pl.set_weight(W * (torch.rand(W.shape, generator=g) >= sparsity_ratio))
    return model


def model_inputs(kind):
    ids = torch.tensor([[1, 5, 9, 12, 20, 7, 3, 2]])
    if kind == "bart":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if kind == "whisper":
        g = torch.Generator().manual_seed(0)
        return {"input_features": torch.randn(1, 80, 3000, generator=g), "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def outputs(model, kind):
    with torch.no_grad():
        out = model(**model_inputs(kind))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def canonical_bits(t):
    """Bit pattern with -0.0 turned into +0.0 (-0.0 + 0.0 == +0.0 in IEEE):
    the sign of a pruned zero is the one thing a sparse layout does not keep."""
    t = t + 0.0
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.fixture(scope="module")
def tiny_pruned():
    return {kind: prune_2_4(build_tiny(kind)) for kind in KINDS}


ALL_FORMATS = [formats.Format(layout, precision, zstd).name for zstd in (False, True)
               for precision in formats.PRECISIONS for layout in formats.LAYOUTS]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_round_trip_every_format(kind, tiny_pruned, tmp_path):
    model = tiny_pruned[kind]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any((v == 0).any() and (torch.signbit(v) & (v == 0)).any() for v in state.values()), \
        "the test model should contain -0.0 entries"
    prunable = {f"{pl.name}.weight": pl for pl in prunable_layers(model)}
    ref = outputs(model, kind)
    for fmt in ALL_FORMATS:
        f = formats.parse_format(fmt)
        path = sparse_file.save_sparse(model, tmp_path / f"{kind}.lab", fmt, pattern="2:4")
        back = sparse_file.load_sparse(path)  # rebuilt from the header, no template
        assert type(back) is type(model)
        loaded = back.state_dict()
        assert set(loaded) == set(state)
        for name, t in state.items():
            got = loaded[name]
            assert got.dtype == t.dtype and got.shape == t.shape, (fmt, name)
            if name in prunable and not f.lossless:
                pl = prunable[name]
                want = sparse_file.quantized_weight(pl.weight, f.precision)
                W = next(p for p in prunable_layers(back) if p.name == pl.name).weight
                assert torch.equal(canonical_bits(W), canonical_bits(want)), (fmt, name)
                assert not torch.equal(W, pl.weight), (fmt, name)  # lossy by design
            else:
                assert torch.equal(canonical_bits(got), canonical_bits(t)), (fmt, name)
        if f.lossless:
            assert torch.equal(outputs(back, kind), ref), fmt


def test_dense_file_is_a_plain_safetensors_checkpoint(tiny_pruned, tmp_path):
    from safetensors.torch import load_file

    model = tiny_pruned["gpt2"]
    path = sparse_file.save_sparse(model, tmp_path / "dense.safetensors", "dense")
    raw = load_file(str(path))
    for name, t in model.state_dict().items():
        if name in raw:  # tied copies are stored once
            assert torch.equal(raw[name], t)  # Conv1D weights keep their in x out layout


def test_load_into_a_template_and_reject_another_architecture(tiny_pruned, tmp_path):
    model = tiny_pruned["llama"]
    path = sparse_file.save_sparse(model, tmp_path / "m.lab", "csr+zstd")
    template = build_tiny("llama", seed=1)
    assert not torch.equal(template.lm_head.weight, model.lm_head.weight)
    back = sparse_file.load_sparse(path, model=template)
    assert back is template
    assert torch.equal(template.lm_head.weight, model.lm_head.weight)
    assert template.lm_head.weight.data_ptr() == template.model.embed_tokens.weight.data_ptr()
    with pytest.raises(formats.StorageError, match="holds a LlamaForCausalLM"):
        sparse_file.load_sparse(path, model=build_tiny("gpt2"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("fmt", ["dense", "dense-fp16", "dense-int8", "csr", "csr-int8", "bitmask",
                                 "bitmask-fp16", "nm", "nm-int8"])
def test_measured_sizes_equal_the_arithmetic(kind, fmt, tmp_path):
    model = build_tiny(kind)
    pattern = "2:4" if fmt.startswith("nm") else "unstructured"
    if pattern == "2:4":
        prune_2_4(model)
    else:
        prune_random(model, 0.7)
    path = sparse_file.save_sparse(model, tmp_path / "m.lab", fmt, pattern=pattern)
    table = sparse_file.file_table(path)
    info = sparse_file.read_header(path)
    expected_total = info.header_bytes
    for pl in prunable_layers(model):
        name = f"{pl.name}.weight"
        nnz = int((pl.weight != 0).sum())
        parts = formats.format_bytes(fmt, pl.shape, nnz, value_bits=32, pattern=pattern)
        measured = table[table.name == name].set_index("component")["bytes"].to_dict()
        assert measured == parts, (name, measured, parts)
        expected_total += sum(parts.values())
    others = table[table.kind == "other"]
    state = model.state_dict()
    for _, row in others.iterrows():
        assert row["bytes"] == state[row["name"]].numel() * state[row["name"]].element_size()
    expected_total += int(others["bytes"].sum())
    assert path.stat().st_size == expected_total
    row = st.size_row(path)
    assert row["file_bytes"] == path.stat().st_size
    assert row["bits_per_weight"] == pytest.approx(8 * row["prunable_bytes"] / row["prunable_numel"])


def test_smallest_index_dtype_that_fits(tmp_path):
    assert formats.index_dtype(255).itemsize == 1 and formats.index_dtype(256).itemsize == 2
    assert formats.index_dtype(65535).itemsize == 2 and formats.index_dtype(65536).itemsize == 4
    W = torch.zeros(3, 300)
    W[0, 299] = 1.0
    W[2, 5] = -2.0
    parts = sparse_file.encode_weight(W, "csr")
    assert parts["col_indices"].dtype == torch.uint16  # 300 inputs: 299 does not fit a byte
    assert parts["crow_indices"].dtype == torch.uint8  # 2 nonzeros
    assert parts["crow_indices"].tolist() == [0, 1, 1, 2]
    assert torch.equal(sparse_file.decode_weight(parts, "csr", (3, 300), torch.float32), W)


def test_nm_positions_pack_into_log2_m_bits():
    W = torch.zeros(2, 8)
    W[0, [1, 3, 4, 7]] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2:4 per group of 4
    W[1, [0, 6]] = torch.tensor([5.0, 6.0])  # a group with a single nonzero is fine
    parts = sparse_file.encode_weight(W, "nm", pattern="2:4")
    assert parts["values"].numel() == 8 and parts["positions"].numel() == 2  # 8 x 2 bits
    assert torch.equal(sparse_file.decode_weight(parts, "nm", (2, 8), torch.float32, "2:4"), W)
    for bits, count in [(1, 13), (3, 11), (5, 9)]:
        v = torch.randint(0, 2**bits, (count,)).numpy()
        assert (sparse_file.unpack_bits(sparse_file.pack_bits(v, bits), bits, count) == v).all()
    with pytest.raises(formats.StorageError, match="not 2:4 sparse"):
        sparse_file.encode_weight(torch.ones(2, 8), "nm", pattern="2:4")


def test_entropy_floor_known_cases():
    assert formats.binary_entropy(0.5) == 1.0
    assert formats.binary_entropy(0.0) == 0.0 and formats.binary_entropy(1.0) == 0.0
    assert formats.binary_entropy(0.1) == pytest.approx(0.4689955935892812)
    assert formats.entropy_floor_bits(0.5, 32) == 17.0  # (1-s)*b + H(s) at s = 0.5
    assert formats.entropy_floor_bits(1.0, 32) == 32.0 and formats.entropy_floor_bits(0.0, 32) == 0.0
    assert formats.nm_floor_bits(2, 4, value_bits=0) == pytest.approx(math.log2(6) / 4)
    assert formats.nm_floor_bits(2, 4, 16) == pytest.approx(8 + math.log2(6) / 4)
    # 2:4 fixes where the zeros may go: less mask information than unstructured 50%.
    assert formats.nm_floor_bits(2, 4, 32) < formats.entropy_floor_bits(0.5, 32)
    assert formats.floor_bytes([((4, 8), 16)], 32) == pytest.approx(32 * 17 / 8)


def test_value_entropy_counts_sign_and_exponent_only():
    assert formats.value_entropy_bits(torch.tensor([1.0, 1.5, 1.25, 1.75])) == 23  # one sign, one exponent
    assert formats.value_entropy_bits(torch.tensor([1.0, -1.0, 1.5, -1.5])) == 24  # two signs, equally often
    assert formats.value_entropy_bits(torch.tensor([1.0, -1.0, 2.0, -2.0])) == 25  # + two exponents
    assert formats.value_entropy_bits(torch.tensor([1.0, 2.0], dtype=torch.float16)) == 11
    model = prune_random(build_tiny("llama"), 0.5)
    floor32 = formats.floor_bytes([(pl.shape, int((pl.weight != 0).sum())) for pl in prunable_layers(model)], 32)
    assert 0.5 * floor32 < formats.value_entropy_floor_bytes(model) < floor32  # few exponents in use


def test_break_even_sparsity():
    shapes = [(1024, 1024)]
    # csr: 4-byte values + 2-byte column indices beat 4 bytes per weight once
    # density < 4/6, i.e. sparsity > 1/3 (a little more for the row pointers).
    s = formats.break_even_sparsity("csr", shapes)
    assert 1 / 3 < s < 1 / 3 + 0.01
    # bitmask: 1 bit per weight plus the values beats 32 bits once s > 1/32.
    assert formats.break_even_sparsity("bitmask", shapes) == pytest.approx(1 / 32, abs=1e-3)
    assert formats.break_even_sparsity("bitmask-int8", shapes) == pytest.approx(1 / 8, abs=1e-3)
    assert formats.break_even_sparsity("dense-fp16", shapes, against="dense") == 0.0
    assert formats.break_even_sparsity("nm", shapes, pattern="2:4") == 0.5
    with pytest.raises(formats.StorageError, match="measured, not predicted"):
        formats.break_even_sparsity("csr+zstd", shapes)


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if how == "truncate-end":
        data = data[:-1]
    elif how == "truncate-header":
        data = data[: 8 + n // 2]
    elif how == "truncate-tiny":
        data = data[:5]
    elif how == "flip-data":
        data[8 + n + (len(data) - 8 - n) // 2] ^= 0x10
    elif how == "flip-header":
        data[8 + n // 3] ^= 0x5A
    elif how == "trailing":
        data += b"\0" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["bitmask", "csr-int8+zstd", "dense"])
@pytest.mark.parametrize("how", ["truncate-end", "truncate-header", "truncate-tiny", "flip-data",
                                 "flip-header", "trailing"])
def test_damaged_file_fails_with_one_clear_error(fmt, how, tiny_pruned, tmp_path):
    path = sparse_file.save_sparse(tiny_pruned["llama"], tmp_path / "m.lab", fmt)
    sparse_file.load_sparse(path)  # intact: loads
    _corrupt(path, how)
    with pytest.raises(formats.StorageError, match="truncated or corrupted|corrupted|not a lab sparse file"):
        sparse_file.load_sparse(path)


def test_bad_requests_fail_clearly_and_leave_no_file(tiny_pruned, tmp_path):
    model = prune_random(build_tiny("llama"), 0.5)
    path = tmp_path / "m.lab"
    with pytest.raises(formats.StorageError, match="not 2:4 sparse"):
        sparse_file.save_sparse(model, path, "nm", pattern="2:4")
    with pytest.raises(formats.StorageError, match="needs an N:M pattern"):
        sparse_file.save_sparse(model, path, "nm")
    with pytest.raises(formats.StorageError, match="unknown format"):
        sparse_file.save_sparse(model, path, "coo")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(formats.StorageError, match="does not exist"):
        sparse_file.load_sparse(path)
    big = build_tiny("llama")
    big.model.layers[0].mlp.up_proj.weight.data[0, 0] = 1e6
    with pytest.raises(formats.StorageError, match="fp16's range"):
        sparse_file.save_sparse(big, path, "csr-fp16")


def test_formats_and_quantization():
    assert formats.parse_format("bitmask-int8+zstd") == formats.Format("bitmask", "int8", True)
    assert formats.parse_format("dense").name == "dense"
    W = torch.tensor([[0.0, 1.0, -0.5], [0.0, 0.0, 0.0]])
    q, scale = sparse_file.quantize_int8(W)
    assert q.tolist() == [[0, 127, -64], [0, 0, 0]] and scale[1] == 0
    assert torch.equal(sparse_file.quantized_weight(W, "int8")[1], torch.zeros(3))


SMALL_FORMATS = ["dense", "csr", "bitmask", "bitmask+zstd", "dense-int8"]


def sized(kind, sparsity_ratio, tmp_path):
    model = prune_random(build_tiny(kind), sparsity_ratio)
    folder = tmp_path / f"files-{sparsity_ratio}"
    t = st.model_sizes(model, SMALL_FORMATS, folder=folder)
    assert list(folder.iterdir()) == []  # measured, then removed
    t.insert(0, "model", kind)
    t.insert(1, "label", kind.upper())
    t.insert(2, "method", "random")
    t.insert(3, "sparsity", sparsity_ratio)
    return t


def test_model_sizes_are_measured_per_format(tmp_path):
    t = sized("llama", 0.9, tmp_path).set_index("format")
    assert list(t.index) == SMALL_FORMATS
    assert (t.nonzero_params < t.params).all()
    assert t.loc["bitmask", "file_bytes"] < t.loc["dense", "file_bytes"]
    assert t.loc["dense", "bits_per_weight"] == 32
    density = t.loc["bitmask", "nnz"] / t.loc["bitmask", "prunable_numel"]
    assert t.loc["bitmask", "bits_per_weight"] == pytest.approx(density * 32 + 1, rel=1e-3)
    assert t.loc["bitmask", "floor_ratio"] == pytest.approx(
        (density * 32 + 1) / formats.entropy_floor_bits(density, 32), rel=1e-3)
    assert t.loc["dense-int8", "value_bits"] == 8
    assert t.loc["bitmask", "value_entropy_floor_bytes"] < t.loc["bitmask", "floor_bytes"]
    assert math.isnan(t.loc["dense-int8", "value_entropy_floor_ratio"])
    # the tensors outside the prunable layers are stored identically in every
    # uncompressed format (zstd compresses them too)
    assert t[~t.zstd].other_bytes.nunique() == 1
    assert t.loc["bitmask+zstd", "other_bytes"] < t.loc["bitmask", "other_bytes"]


def test_best_format_and_break_even_tables(tmp_path):
    sizes = pd.concat([sized("llama", s, tmp_path) for s in (0.0, 0.5, 0.9)], ignore_index=True)
    best = st.best_formats(sizes).set_index("sparsity")
    dense0 = sizes[(sizes.sparsity == 0.0) & (sizes.format == "dense")].prunable_bytes.item()
    assert best.loc[0.0, "prunable_bytes"] <= dense0 and best.loc[0.0, "format"] not in {"csr", "bitmask"}
    assert best.loc[0.9, "format"] in {"bitmask", "bitmask+zstd", "csr"}
    assert (best.bits_per_weight >= 0).all() and "dense-int8" not in set(best.format)
    be = st.break_even_table(sizes).set_index("format")
    assert be.loc["bitmask", "measured_break_even"] == 0.5  # bigger than dense at 0, smaller at 0.5
    assert be.loc["dense-int8", "measured_break_even"] == 0.0
    assert math.isnan(be.loc["dense", "measured_break_even"])
    assert be.loc["bitmask", "predicted_vs_same_precision"] == pytest.approx(1 / 32, abs=0.01)
    assert math.isnan(be.loc["bitmask+zstd", "predicted_vs_same_precision"])  # measured only
    assert be.loc["dense-int8", "predicted_vs_dense_fp32"] == 0.0
    fig = file_sizes_view.size_figure(sizes, "LLAMA", "random")
    assert len(fig.axes) == 2


def test_size_sweep_measures_pruned_models_and_caches(tmp_cache, monkeypatch):
    from lab_utils.core.models import LoadedModel, ModelSpec

    calls = []

    def fake_dense(name):
        spec = ModelSpec(name, "decoder-only", "Tiny", "local", "perplexity", name)
        return LoadedModel(build_tiny("llama"), None, spec)

    def fake_pruned(lm, cfg, **kw):
        calls.append((lm.spec.name, cfg.method, cfg.sparsity, cfg.pattern))
        return LoadedModel(prune_random(build_tiny("llama"), cfg.sparsity), None, lm.spec), None

    monkeypatch.setattr(st.sweep, "load_model", fake_dense)  # the dense model a job prunes copies of
    monkeypatch.setattr(st.checkpoints, "pruned_model", fake_pruned)
    cfg = st.SizeConfig(["tiny"], ["magnitude"], [0.5, 0.8], formats=["dense", "bitmask"])
    # workers=1: measured in this process, where the fake pruning is seen
    first = st.size_sweep(cfg, workers=1)
    assert calls == [("tiny", "magnitude", 0.5, "unstructured"), ("tiny", "magnitude", 0.8, "unstructured")]
    assert len(first) == 4 and set(first.label) == {"Tiny"}
    assert first.actual_sparsity.round(1).tolist() == [0.5, 0.5, 0.8, 0.8]
    again = st.size_sweep(cfg)
    assert len(calls) == 2  # read from the cache, nothing re-pruned or rewritten
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    with pytest.raises(formats.StorageError, match="with a pattern such as"):
        st.size_sweep(st.SizeConfig(["tiny"], ["magnitude"], [0.5], formats=["nm"]))


@pytest.mark.slow
def test_size_sweep_side_by_side_measures_what_one_process_measures(tiny_dirs, external, cluster_cache,
                                                                    tmp_path, monkeypatch):
    cfg = st.SizeConfig([str(tiny_dirs["llama"]), str(tiny_dirs["bert"])], ["magnitude"], [0.0, 0.5, 0.9],
                        formats=["dense", "csr", "bitmask+zstd"])
    # on the session's cluster (two one-thread workers; test_sweep_executor starts and closes a
    # local one), then in this process into another cache
    tables = [st.size_sweep(cfg, executor=external.address)]
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache-here"))
    tables.append(st.size_sweep(cfg, workers=1))
    assert len(tables[0]) == 2 * 3 * 3
    pd.testing.assert_frame_equal(tables[0].drop(columns="save_s"), tables[1].drop(columns="save_s"))


def test_sizes_keys_are_the_keys_of_existing_caches():
    """The keys of ENGINE_VERSION 4 (derived from the whole PruneConfig): a change to the key
    function must not move them."""
    from lab_utils.engine.config import PruneConfig

    size = st.SizeConfig(["smollm2-135m"], formats=["dense", "bitmask"], zstd_level=3)
    wanda = PruneConfig("wanda", 0.5, "unstructured", nsamples=8, seqlen=64, seed=0)
    magnitude = PruneConfig("magnitude", 0.7, "unstructured", nsamples=8)
    assert st.sizes_key("smollm2-135m", wanda, size) == "79bbc46e73e13ceb"
    assert st.sizes_key("smollm2-135m", magnitude, size) == "f762c6d0fb0c9408"


def test_size_conclusions_follow_the_numbers(tmp_path):
    sizes = pd.concat([sized("llama", s, tmp_path) for s in (0.0, 0.5, 0.9)], ignore_index=True)
    text = file_sizes_view.size_conclusions(sizes)
    best90 = st.best_formats(sizes).set_index("sparsity").loc[0.9, "format"]
    assert text.startswith("**LLAMA** (random): the smallest lossless file is")
    assert f"**{best90}** " in text and "smaller than the dense fp32 file at 90%" in text
    assert "the floor" in text and "from 50% to 95%" in text
    t = file_sizes_view.size_summary_table(sizes)
    assert t.iloc[0]["at"] == "90%" and "x)" in t.iloc[0]["best lossless MiB (x smaller)"]
    # make bitmask+zstd absurdly big: it can no longer be the winner anywhere
    worse = sizes.copy()
    worse.loc[worse.format == "bitmask+zstd", "prunable_bytes"] *= 100
    assert "**bitmask+zstd**" not in file_sizes_view.size_conclusions(worse)


def test_bits_table_has_a_column_per_format_and_the_floors(tmp_path):
    sizes = pd.concat([sized("llama", s, tmp_path) for s in (0.5, 0.9)], ignore_index=True)
    t = st.bits_table(sizes)
    assert list(t.columns) == SMALL_FORMATS + ["floor fp32", "floor int8"]
    assert t.loc[("LLAMA", "random", 0.9), "floor fp32"] < t.loc[("LLAMA", "random", 0.9), "bitmask"]
    assert t.loc[("LLAMA", "random", 0.5), "floor fp32"] == pytest.approx(17, abs=0.3)


def test_round_trip_report_on_a_loaded_model(tiny_dirs, tmp_path):
    from lab_utils.core.models import load_model

    lm = load_model(str(tiny_dirs["llama"]))
    prune_random(lm.model, 0.6)
    rt = st.round_trip(lm, ["bitmask+zstd", "csr", "bitmask-int8"], folder=tmp_path).set_index("format")
    assert rt.weights_as_expected.all()
    assert rt.loc["bitmask+zstd", "outputs_identical"] and rt.loc["csr", "outputs_identical"]
    assert not rt.loc["bitmask-int8", "outputs_identical"]  # int8 is lossy by design
    assert list(tmp_path.iterdir()) == []


def test_round_trip_conclusion_reports_failures():
    rt = pd.DataFrame([{"format": "csr", "weights_as_expected": True, "outputs_identical": True,
                        "max_abs_output_diff": 0.0},
                       {"format": "bitmask", "weights_as_expected": False, "outputs_identical": False,
                        "max_abs_output_diff": 0.5},
                       {"format": "csr-int8", "weights_as_expected": True, "outputs_identical": False,
                        "max_abs_output_diff": 0.25}])
    text = file_sizes_view.round_trip_conclusion(rt, "M", 0.5)
    assert "1 of 2 lossless formats" in text and "bitmask did not" in text
    assert "lossy ones (csr-int8) gave back exactly the rounded weights" in text and "0.25" in text
