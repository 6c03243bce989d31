"""The five concepts of notebook 01, on tiny tensors and tiny models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny
from transformers import AutoModelForCausalLM

from lab_utils.core import sparse_file, sparsify
from lab_utils.core.models import count_parameters, load_model, prunable_layers, weight_out_in
from lab_utils.engine import checkpoints
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments import weights
from lab_utils.experiments.concepts import costs, distill, moe, quantize, sparsification, structured
from lab_utils.experiments.concepts.decoder import Decoder, baseline

IDS = torch.randint(7, 60, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --------------------------------------------------------------------------- structured pruning
def _expected_removed(mlp, n_removed: int) -> int:
    """Parameters that removing ``n_removed`` neurons deletes: one row (+bias) of
    every input projection and one column of the output projection each."""
    per = sum(weight_out_in(m).shape[1] + (m.bias is not None) for m in mlp.inputs)
    return (per + weight_out_in(mlp.output).shape[0]) * n_removed


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_structured_pruning_removes_exactly_the_expected_parameters(kind):
    model = build_tiny(kind)
    mlps = structured.mlps(model)
    width = mlps[0].width
    scores = [torch.rand(width, generator=torch.Generator().manual_seed(i)) for i in range(len(mlps))]
    n_drop = round(0.25 * width)
    expected = sum(_expected_removed(m, n_drop) for m in mlps)
    before = count_parameters(model)
    report = structured.prune_neurons_(model, scores, 0.25)
    assert report["removed"] == expected > 0
    assert count_parameters(model) == before - expected
    assert report["width"] == width - n_drop
    assert all(m.width == width - n_drop for m in structured.mlps(model))
    out = _logits(model)
    assert torch.isfinite(out).all()


def test_pruned_llama_saves_and_reloads_with_the_smaller_config(tmp_path):
    model = build_tiny("llama")
    scores = [torch.arange(64.0) for _ in structured.mlps(model)]
    structured.prune_neurons_(model, scores, 0.5)
    assert model.config.intermediate_size == 32
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert count_parameters(again) == count_parameters(model)
    assert torch.allclose(_logits(again), _logits(model), atol=1e-6)


def test_kept_neurons_are_the_highest_scored_and_their_weights_are_unchanged():
    model = build_tiny("llama")
    mlp = structured.mlps(model)[0]
    W_up = mlp.inputs[-1].weight.detach().clone()
    W_down = mlp.output.weight.detach().clone()
    s = torch.tensor([5.0, 1.0, 4.0, 0.5] * 16)
    keep = structured.keep_indices(s, 0.5)
    assert sorted(s[keep].tolist()) == sorted(s.tolist())[32:]
    structured.remove_neurons_(mlp, keep)
    assert torch.equal(mlp.inputs[-1].weight, W_up[keep])
    assert torch.equal(mlp.output.weight, W_down[:, keep])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_removing_neurons_that_never_fire_leaves_the_output_unchanged(kind):
    model = build_tiny(kind)
    mlp = structured.mlps(model)[0]
    with torch.no_grad():
        weight_out_in(mlp.output)[:, :16] = 0  # neurons 0..15 contribute nothing
    ref = _logits(model)
    scores = structured.calibrated_scores(model, IDS)
    assert len(scores) == 2 and scores[0].shape == (mlp.width,)
    assert (scores[0][:16] == 0).all() and (scores[0][16:] > 0).all()
    structured.remove_neurons_(mlp, structured.keep_indices(scores[0], 16 / mlp.width))
    assert mlp.width in (48, 112)
    assert torch.allclose(_logits(model), ref, atol=1e-5)


def test_neuron_scores_are_activation_times_column_norm():
    W = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert torch.allclose(structured.neuron_scores(torch.tensor([2.0, 10.0]), W),
                          torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="width"):
        structured.neuron_scores(torch.ones(3), W)


# --------------------------------------------------------------------------- quantization
def _weights():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 128, generator=g) * 0.05
    W[3] = 0.0  # an all-zero row
    W[5, :32] = 0.7  # a constant group
    W[6] += 3.0  # a row far from zero (the minimum must be stored below it)
    W[7, 10] = 9.0  # an outlier
    return W


def test_int8_per_channel_error_within_half_a_step():
    W = _weights()
    q, scale = sparse_file.quantize_int8(W)  # the int8 codec of the file formats and of QuantLinear
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (sparse_file.dequantize_int8(q, scale) - W).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert scale[3] == 0 and err[3].max() == 0
    # the bound is tight: some weight lands close to half a step away
    assert (err[scale > 0] / (scale[scale > 0, None] / 2)).max() > 0.9


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_groups_error_within_half_a_step(group_size):
    W = _weights()
    codes, step, minimum = quantize.int4_groups(W, group_size)
    assert codes.max() <= 15 and step.dtype == torch.float16 and step.shape == (16, 128 // group_size)
    err = (quantize.dequant_int4(codes, step, minimum) - W).abs()
    bound = (step.float() / 2).repeat_interleave(group_size, dim=1)
    assert (err <= bound * (1 + 1e-4) + 1e-7).all()
    assert (err / bound).max() > 0.9


def test_int4_reproduces_weights_already_on_a_q4_1_grid_exactly():
    # SmolLM2's weights were stored this way: 16 levels per block of 32
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8)
    codes[:, 0], codes[:, 1], codes[:, 32], codes[:, 33] = 0, 15, 0, 15
    step = (torch.rand(8, 2, generator=g) * 0.01 + 1e-3).half()
    minimum = (-torch.rand(8, 2, generator=g) * 0.1).half()
    W = quantize.dequant_int4(codes, step, minimum)
    again = quantize.dequant_int4(*quantize.int4_groups(W, 32))
    assert torch.equal(again, W)
    assert not torch.equal(quantize.dequant_int4(*quantize.int4_groups(W, 64)), W)


def test_pack4_round_trip_and_halves_the_bytes():
    codes = torch.randint(0, 16, (4, 10), dtype=torch.uint8)
    packed = quantize.pack4(codes)
    assert packed.shape == (4, 5) and torch.equal(quantize.unpack4(packed), codes)


def test_bad_group_size_names_the_fix():
    with pytest.raises(quantize.QuantError, match="divide"):
        quantize.int4_groups(torch.zeros(2, 48), 32)
    with pytest.raises(quantize.QuantError, match="even"):
        quantize.int4_groups(torch.zeros(2, 48), 3)
    with pytest.raises(quantize.QuantError, match="group_size"):
        quantize.int4_groups(torch.zeros(2, 48), True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_runs_with_bounded_errors_and_fewer_bytes(kind, scheme):
    model = build_tiny(kind)
    qmodel, table = quantize.quantize_weights(model, scheme, group_size=32)
    assert (table.max_err_over_bound <= 1 + 1e-4).all()
    assert costs.model_bytes(qmodel) < costs.model_bytes(model)
    ref, out = _logits(model), _logits(qmodel)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.05 if scheme == "int8" else 0.3)
    assert type(structured.mlps(model)[0].output).__name__ != "QuantLinear"  # original untouched


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dynamic_int8_runs_with_weights_within_the_bound(kind, tmp_path, tmp_cache):
    model = build_tiny(kind)
    qmodel, table = quantize.dynamic_int8(model)
    assert (table.max_err_over_bound <= 1 + 1e-4).all() and len(table) > 0
    ref, out = _logits(model), _logits(qmodel)
    assert (out - ref).norm() / ref.norm() < 0.05
    tensors = quantize.quantized_tensors(qmodel)
    assert any(t.dtype == torch.int8 for t in tensors.values())
    assert costs.save_tensors(tensors, tmp_path / "q.safetensors") < costs.dense_file_bytes(model)


# --------------------------------------------------------------------------- measurements
def test_model_bytes_counts_tied_weights_once_and_zeros_are_counted(tmp_cache):
    model = build_tiny("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    buffers = sum(b.nbytes for b in model.buffers())  # rotary frequencies
    assert costs.model_bytes(model) == 4 * count_parameters(model) + buffers
    counts = costs.count_zeros(model)
    assert counts["prunable_zeros"] == 0
    pl = structured.mlps(model)[0].output
    with torch.no_grad():
        pl.weight[:, :8] = 0
    counts = costs.count_zeros(model)
    assert counts["prunable_zeros"] == 8 * pl.weight.shape[0]
    size = costs.dense_file_bytes(model)  # tied head stored once, the zeros stored like any value
    assert 4 * count_parameters(model) < size < 4 * count_parameters(model) + 20_000
    assert size == costs.dense_file_bytes(build_tiny("llama"))


def test_sparsification_keeps_parameters_and_dense_file_size_and_adds_zeros(tiny_dirs, tmp_cache):
    lm = load_model(str(tiny_dirs["llama"]))
    sparse, report = checkpoints.pruned_model(lm, PruneConfig("magnitude", 0.5))
    assert report.actual_sparsity == pytest.approx(0.5, abs=0.01)
    assert costs.count_zeros(lm.model)["prunable_zeros"] == 0  # the dense model is untouched
    windows = torch.randint(7, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    table = sparsification.compare(lm.model, sparse.model, windows, windows[:1], reps=1).set_index("model")
    assert table.parameters["dense"] == table.parameters["sparsified"]
    assert table.dense_file_bytes["dense"] == table.dense_file_bytes["sparsified"]
    assert table.memory_bytes["dense"] == table.memory_bytes["sparsified"]
    assert table.prunable_zero_fraction["sparsified"] == pytest.approx(0.5, abs=0.01)
    assert table.bitmask_file_bytes["sparsified"] < table.bitmask_file_bytes["dense"]


def test_mask_table_reports_row_sparsity_and_overlap_of_the_layer_masks():
    # notebook 01's cells on one layer: magnitude, Wanda and 2:4 masks from core.sparsify
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 8, generator=g)
    act_norm_sq = torch.tensor([1e4, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-4])  # input 0 loud, input 7 quiet
    masks = {"magnitude": sparsify.magnitude_mask(W, 0.5), "wanda": sparsify.wanda_mask(W, act_norm_sq, 0.5),
             "2:4": sparsify.wanda_mask(W, act_norm_sq, 0.5, prune_n=2, prune_m=4)}
    t = sparsification.mask_table(masks).set_index("mask")
    assert (t.sparsity == 0.5).all() and (t.row_sparsity_min == 0.5).all() and (t.row_sparsity_max == 0.5).all()
    assert t.share_pruned_by_magnitude["magnitude"] == 1.0
    assert not masks["wanda"][:, 0].any() and masks["wanda"][:, 7].all()  # Wanda keeps the loud input
    shared = (masks["wanda"] & masks["magnitude"]).sum() / masks["wanda"].sum()
    assert t.share_pruned_by_magnitude["wanda"] == pytest.approx(float(shared)) and shared < 1


def test_decoder_demos_are_keyed_by_the_settings_and_run_on_a_tiny_model(tiny_dirs, tmp_cache):
    d = Decoder(str(tiny_dirs["llama"]), seqlen=16, eval_windows=2, eval_seqlen=16, nsamples=2,
                        seed=0, timing_reps=1)
    key = structured.demo.key(d, [0.5])
    assert key == {"decoder": {"model": str(tiny_dirs["llama"]), "seqlen": 16, "eval_windows": 2,
                               "eval_seqlen": 16, "nsamples": 2, "seed": 0, "timing_reps": 1},
                   "sparsities": [0.5]}
    assert "lm" not in d.__dict__  # keying loads nothing
    table, timing = structured.demo(d, [0.5])
    assert table.neurons_removed.tolist() == [0.0, 0.5] and timing["demo"] == "2 structured pruning"
    assert table.perplexity[0] == baseline(d)[0]  # the dense row is the baseline
    again, timing_again = structured.demo(d, [0.5])  # read back, with the times of the run that computed it
    assert again.equals(table) and timing_again == timing


# --------------------------------------------------------------------------- distillation
def test_distillation_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(6, 2)
    assert distill.distillation_loss(logits, logits.clone(), temperature=2.0).item() == \
        pytest.approx(0.0, abs=1e-7)
    assert distill.distillation_loss(logits, logits + torch.tensor([0.0, 1.0])).item() > 1e-3


def test_label_only_loss_is_cross_entropy_and_temperature_must_be_positive():
    s, t, y = torch.randn(6, 2), torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(distill.distillation_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    with pytest.raises(distill.DistillError, match="temperature"):
        distill.distillation_loss(s, t, temperature=0)


def test_truncated_student_keeps_the_first_blocks_and_runs():
    teacher = build_tiny("bert")
    student = distill.truncate_blocks(teacher, 1)
    assert len(student.encoder.layer) == 1 and len(teacher.encoder.layer) == 2
    assert torch.equal(student.encoder.layer[0].output.dense.weight,
                       teacher.encoder.layer[0].output.dense.weight)
    assert count_parameters(student) < count_parameters(teacher)
    assert _logits(student).shape == _logits(teacher).shape
    with pytest.raises(distill.DistillError, match="student_layers"):
        distill.truncate_blocks(teacher, 3)


def test_head_from_probe_predicts_what_the_probe_predicts_and_distilled_student_learns():
    from tiny_models import tiny_tokenizer

    from lab_utils.core.evaluation import sentiment

    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(40, 32, generator=g) + 0.3, torch.randn(40, 32, generator=g) - 0.3])
    feats = feats * torch.linspace(0.1, 5, 32) + 1.0  # features of very different scales and means
    labels = [1] * 40 + [0] * 40
    probe = sentiment.train_probe(feats.numpy(), labels)
    head = distill.head_from_probe(probe)
    pred = head(feats).argmax(-1)
    assert pred.tolist() == sentiment.probe_predict(probe, feats.numpy()).tolist()
    assert distill.accuracy(head(feats), labels) > 0.9
    # a tiny student trained to match a teacher's logits gets closer to them
    tok = tiny_tokenizer()
    texts = ["good movie", "bad plot", "great film", "bad acting", "good story", "bad scene"] * 4
    y = [1, 0, 1, 0, 1, 0] * 4
    student = distill.SentenceClassifier(build_tiny("bert"), torch.nn.Linear(32, 2))
    teacher_logits = torch.tensor([[-2.0, 2.0] if v else [2.0, -2.0] for v in y])
    before = distill.predict_logits(student, tok, texts)
    distill.train_student(student, tok, texts, y, teacher_logits, distill.DistillConfig(steps=30, batch_size=8, lr=3e-3))
    after = distill.predict_logits(student, tok, texts)
    with pytest.raises(distill.DistillError, match="distill_steps"):
        distill.train_student(student, tok, texts, y, teacher_logits, distill.DistillConfig(steps=0))
    assert (after - teacher_logits).norm() < (before - teacher_logits).norm()


# --------------------------------------------------------------------------- MoEfication
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_moefication_with_every_expert_active_reproduces_the_dense_model(kind):
    model = build_tiny(kind)
    experts = moe.split_experts(model, 4)
    ref = _logits(model)
    with moe.moefied(model, experts, top_k=4) as captured:
        out = _logits(model)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert captured.fraction == pytest.approx(1.0, abs=1e-6) and captured.tokens > 0
    with moe.moefied(model, experts, top_k=1) as captured:
        partial = _logits(model)
    assert not torch.allclose(partial, ref, atol=1e-3)
    assert 0 < captured.fraction < 1
    assert torch.equal(_logits(model), ref)  # restored on exit


def test_moe_layer_keeps_exactly_the_top_k_experts_by_output_contribution():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    h = torch.tensor([[1.0, 1.0, 5.0, 0.0, -3.0, 0.0]])
    down = torch.nn.Linear(6, 2, bias=False)
    with torch.no_grad():
        down.weight.fill_(1.0)  # equal column norms: the largest |h| sums win
    layer = moe.MoEOutput(down, labels, 2, "oracle", None, moe.Captured())
    assert layer.expert_mask(h).tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]
    with torch.no_grad():
        down.weight[:, :2] = 10.0  # expert 0's neurons write 10x more into the output
    layer = moe.MoEOutput(down, labels, 2, "oracle", None, moe.Captured())
    assert layer.expert_mask(h).tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


def test_balanced_kmeans_gives_equal_experts_and_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    X = torch.cat([centres[i] + 0.1 * torch.randn(8, 4, generator=g) for i in range(4)])
    labels = moe.balanced_kmeans(X, 4)
    assert torch.bincount(labels).tolist() == [8, 8, 8, 8]
    for i in range(4):  # each true group is one cluster
        assert len(set(labels[8 * i : 8 * i + 8].tolist())) == 1
    with pytest.raises(moe.MoEError, match="divisor"):
        moe.balanced_kmeans(X, 5)
    with pytest.raises(moe.MoEError, match="moe_experts"):
        moe.balanced_kmeans(X, True)


def test_linear_router_recovers_a_linear_target_and_top_k_recall():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    W = torch.randn(6, 3, generator=g)
    W_fit, b_fit = moe.fit_linear_router(x, x @ W + 0.5, ridge=1e-8)
    assert torch.allclose(W_fit, W, atol=1e-4) and torch.allclose(b_fit, torch.full((3,), 0.5), atol=1e-4)
    scores = x @ W
    assert moe.top_k_recall(scores, scores, 1) == 1.0
    assert moe.top_k_recall(-scores, scores, 1) < 0.5


def test_active_fraction_must_be_whole_experts():
    assert moe.active_top_k(0.125, 16) == 2
    with pytest.raises(moe.MoEError, match="multiples"):
        moe.active_top_k(0.1, 16)


def test_moefied_model_has_the_same_parameters():
    model = build_tiny("llama")
    experts = moe.split_experts(model, 4)
    before = copy.deepcopy(model.state_dict())
    with moe.moefied(model, experts, top_k=2):
        assert sum(p.numel() for p in model.parameters()) == count_parameters(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_levels_per_block_detects_a_4bit_grid():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8)
    W = quantize.dequant_int4(codes, torch.full((8, 2), 0.01).half(), torch.full((8, 2), -0.08).half())
    model = build_tiny("llama")
    with torch.no_grad():
        for pl in structured.mlps(model):
            weight_out_in(pl.output).normal_()
    assert weights.levels_per_block(model, 32)["fraction_on_4bit_grid"] < 1
    for pl in prunable_layers(model):
        W_l = pl.weight
        with torch.no_grad():
            W_l.copy_(W.repeat(W_l.shape[0] // 8 + 1, W_l.shape[1] // 64 + 1)[: W_l.shape[0], : W_l.shape[1]])
    levels = weights.levels_per_block(model, 32)
    assert levels["fraction_on_4bit_grid"] == 1 and levels["max_levels"] <= 16


# --------------------------------------------------------------------------- generated prose
def test_prose_flips_with_the_data():
    import pandas as pd

    from lab_utils.presentation import concepts_view

    def table(distilled, labels_only):
        rows = [("teacher", 6, 0.8), ("student, probe only", 2, 0.6),
                ("student, distilled", 2, distilled), ("student, labels only", 2, labels_only)]
        return pd.DataFrame([{"model": m, "layers": n, "parameters": 100 * n, "accuracy": a,
                              "agreement_with_teacher": 0.9, "forward_s": 1.0 / n, "embedding_parameters": 50,
                              "forward_cpu_s": 1.0 / n} for m, n, a in rows])

    assert "distilled student beats" in concepts_view.distillation(table(0.80, 0.70), 1000, 2.0, 1.0, 10, 0)
    assert "label-only student beats" in concepts_view.distillation(table(0.70, 0.80), 1000, 2.0, 1.0, 10, 0)
    assert "within two standard errors" in concepts_view.distillation(table(0.75, 0.751), 1000, 2.0, 1.0, 10, 0)
    fast = pd.Series({"forward_s": 1.0, "forward_cpu_s": 1.0})
    slow = pd.Series({"forward_s": 2.0, "forward_cpu_s": 2.0})
    assert concepts_view._faster(fast, slow).startswith("2.00x faster")
    assert concepts_view._faster(slow, fast).startswith("2.00x slower")
