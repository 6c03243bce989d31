"""Mixtures of experts in the engine: each expert's statistics come from the tokens its router
sends it, an expert without enough tokens is pruned by magnitude (and counted), routers are never
pruned, OWL and the checkpoint include the experts; and a layer type the engine cannot prune is
named in the coverage warning, never skipped in silence."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_zoo, zoo_batches

from lab_utils.core import sparsify as sp
from lab_utils.core.models import LoadedModel, ModelSpec, find_layers, prunable_layers
from lab_utils.engine import calibration, checkpoints, prune
from lab_utils.engine.config import PruneConfig


def loaded(model, family="decoder-only", name="tiny-moe"):
    return LoadedModel(model, None, ModelSpec(name, family, name, "local", "perplexity", name))


def run(model, method="wanda", pattern="unstructured", family="decoder-only", **settings):
    cfg = PruneConfig(method, 0.5, pattern, nsamples=8, seqlen=32, **settings)
    return prune.prune_model(loaded(model, family), cfg, batches=zoo_batches(model, family))


def test_one_expert_routing_calibrates_that_expert_and_prunes_the_others_by_magnitude():
    """Mixtral with its router forced to send every token to expert 0: expert 0's Wanda masks
    are those of the norms of every calibration token (its gate_up reads the block's MoE input,
    its down_proj its own activations); experts 1-3 got none, so they are pruned by magnitude,
    and the report counts them."""
    model, _ = build_zoo("mixtral", num_hidden_layers=1, num_experts_per_tok=1)
    moe = model.model.layers[0].mlp

    def to_expert_0(_module, _args, out):
        logits = out[0]
        n = logits.shape[0]
        return logits, torch.ones(n, 1, dtype=out[1].dtype), torch.zeros(n, 1, dtype=torch.long)

    handle = moe.gate.register_forward_hook(to_expert_0)
    seen = {}

    def keep_input(_module, args):
        seen["x"] = args[0].clone()

    capture = moe.experts.register_forward_pre_hook(keep_input)
    batches = zoo_batches(model, "decoder-only")
    with torch.no_grad():
        model(**batches[0]["inputs"])  # the dense model: what the experts read
    capture.remove()
    dense = copy.deepcopy(moe.experts)
    report = prune.prune_model(loaded(model), PruneConfig("wanda", 0.5, nsamples=8, seqlen=32), batches=batches)
    handle.remove()
    assert report.experts == 4 and report.experts_fallback == 3

    X = seen["x"].float()
    assert X.shape[0] == 8 * 32  # every calibration token went to expert 0
    gate, up = F.linear(X, dense.gate_up_proj[0]).chunk(2, dim=-1)
    H = F.silu(gate) * up
    for param, inputs in (("gate_up_proj", X), ("down_proj", H)):
        W0, pruned = getattr(dense, param)[0], getattr(moe.experts, param)
        expect = sp.wanda_mask(W0, (inputs * inputs).sum(dim=0) / inputs.shape[0], 0.5, scope="row")
        assert torch.equal(pruned[0] == 0, expect), param
        assert not torch.equal(expect, sp.magnitude_mask(W0, 0.5, scope="row"))  # the statistics mattered
        for e in (1, 2, 3):  # no tokens: magnitude, row by row
            We = getattr(dense, param)[e]
            assert torch.equal(pruned[e] == 0, sp.magnitude_mask(We, 0.5, scope="row")), (param, e)


def test_the_fallback_applies_to_the_experts_routed_fewer_than_min_expert_tokens(monkeypatch):
    """One Mixtral block, its router left alone: the experts that fall back are those its
    router (counted here on the dense model) sends fewer than MIN_EXPERT_TOKENS tokens."""
    model, _ = build_zoo("mixtral", num_hidden_layers=1)
    routed = torch.zeros(4, dtype=torch.long)

    def count(_module, _args, out):
        routed.add_(torch.bincount(out[2].flatten(), minlength=4))

    handle = model.model.layers[0].mlp.gate.register_forward_hook(count)
    with torch.no_grad():
        model(**zoo_batches(model, "decoder-only")[0]["inputs"])
    handle.remove()
    assert routed.sum() == 8 * 32 * 2  # two experts per token
    for threshold in (int(routed.min()) + 1, prune.MIN_EXPERT_TOKENS, 10**6):
        monkeypatch.setattr(prune, "MIN_EXPERT_TOKENS", threshold)
        report = run(copy.deepcopy(model), "sparsegpt")
        assert report.experts == 4
        assert report.experts_fallback == int((routed < threshold).sum()), threshold
    assert report.experts_fallback == 4


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss", "switch_transformers"])
def test_routers_and_gates_are_never_pruned(arch):
    model, family = build_zoo(arch)
    routers = {n: p.clone() for n, p in model.named_parameters()
               if re.search(r"(^|\.)(gate|router|shared_expert_gate)\.", n)}
    assert routers
    names = [pl.name for pl in prunable_layers(model)]
    assert not [n for n in names if re.search(r"(^|\.)(gate|router|shared_expert_gate)(\.|$)", n)]
    report = run(model, "sparsegpt", "2:4", family)
    assert report.nm_verified and report.coverage == 1.0
    for n, p in model.named_parameters():
        if n in routers:
            assert torch.equal(p, routers[n]), n


def test_owl_allocates_over_the_experts_too():
    model, _ = build_zoo("qwen3_moe")
    report = run(model, owl=True)
    targets = report.block_sparsity["decoder"]
    assert targets[0] != targets[1]
    table = report.layer_table()
    experts = table[table.name.str.contains(r"experts\.\w+\[\d+\]$")]
    assert len(experts) == 2 * 4 * 2  # blocks x experts x (gate_up, down)
    for block, rows in experts.groupby("block"):
        assert (rows.target == targets[block]).all()
        assert rows.sparsity.mean() == pytest.approx(targets[block], abs=1 / 32)  # whole weights per row of 32


def test_offload_and_forward_slices_keep_the_experts_masks(monkeypatch):
    """Offloading moves the fused experts and back: the same weights, bit for bit. Forward
    slices change how many tokens each expert multiplies at once, so SparseGPT's updates may
    move in the last bits; the masks stay."""
    dense, _ = build_zoo("olmoe")
    pruned = []
    for offload, tokens in ((False, 10**9), (True, 10**9), (False, 32)):
        monkeypatch.setattr(calibration, "CPU_FORWARD_TOKENS", tokens)
        model = copy.deepcopy(dense)
        cfg = PruneConfig("sparsegpt", 0.5, nsamples=8, seqlen=32)
        prune.prune_model(loaded(model), cfg, offload=offload, batches=zoo_batches(model, "decoder-only"))
        pruned.append({pl.name: pl.weight.clone() for pl in prunable_layers(model)})
    whole, offloaded, sliced = pruned
    assert whole.keys() == offloaded.keys() == sliced.keys()
    for name, W in whole.items():
        assert torch.equal(W, offloaded[name]), name
        assert torch.equal(W == 0, sliced[name] == 0) and torch.allclose(W, sliced[name], atol=1e-6), name


def test_a_checkpoint_holds_every_expert(tmp_path):
    model, _ = build_zoo("gpt_oss")
    run(model)
    checkpoints.save_checkpoint(model, tmp_path)
    fresh, _ = build_zoo("gpt_oss", seed=1)
    checkpoints.load_checkpoint(fresh, tmp_path)
    for a, b in zip(prunable_layers(model), prunable_layers(fresh), strict=True):
        assert torch.equal(a.weight, b.weight), a.name
    assert any("experts.gate_up_proj[3]" in n for n in find_layers(model.model.layers[0]))


def test_a_layer_type_the_engine_does_not_prune_is_named_in_one_warning():
    """ConvBERT's blocks hold separable convolutions: the engine prunes their linear layers and
    says, in one line, which matrices it left out and what fraction it saw."""
    import transformers as tf

    config = tf.ConvBertConfig(vocab_size=64, hidden_size=32, embedding_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = tf.ConvBertModel(config).eval()
    with pytest.warns(prune.CoverageWarning) as caught:
        report = run(model, family="encoder-only")
    coverage = [w for w in caught if issubclass(w.category, prune.CoverageWarning)]
    assert len(coverage) == 1
    message = str(coverage[0].message)
    assert "\n" not in message and "key_conv_attn_layer.depthwise.weight" in message
    assert report.left_out == ["encoder.layer.*.attention.self.key_conv_attn_layer.depthwise.weight",
                               "encoder.layer.*.attention.self.key_conv_attn_layer.pointwise.weight"]
    assert 0 < report.coverage < prune.MIN_COVERAGE
    assert report.summary()["coverage"] == report.coverage
    assert report.actual_sparsity == pytest.approx(0.5)  # over what it pruned, as actual_sparsity_over says
    assert "routers excluded" in report.summary()["actual_sparsity_over"]
