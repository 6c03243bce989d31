import pytest
import torch
from tiny_models import build_tiny
from torch import nn

from lab_utils.core import models


def test_every_preset_resolves_or_names_the_hub():
    for name, preset in models.PRESETS.items():
        if preset.source == "embedded":
            spec = models.resolve(name)
            assert spec.family == preset.family and spec.label == preset.label
        else:
            # Tests run with HF_HUB_OFFLINE=1: a hub preset must fail with one clear message.
            with pytest.raises(models.HubUnavailableError, match="embedded preset"):
                models.resolve(name)
            assert models.resolve(name, check_hub=False).location == preset.hub_id


def test_unknown_model_is_one_clear_error():
    with pytest.raises(models.ModelError, match="not a preset"):
        models.resolve("no-such-model-xyz")
    with pytest.raises(models.ModelError, match="not a preset"):
        models.resolve("./not/a/folder/")


def test_hub_error_comes_before_any_download(monkeypatch):
    # Without the hub, a hub model fails on the reachability check, never
    # reaching transformers' retries (how long that takes is for benchmarks/).
    def download(*args, **kwargs):
        raise AssertionError("tried to load from the hub")

    monkeypatch.setattr(models, "load_pretrained_dir", download)
    monkeypatch.setattr(models, "_in_hub_cache", lambda hub_id: False)
    models.hub_reachable.cache_clear()
    with pytest.raises(models.HubUnavailableError, match="embedded preset"):
        models.load_model("gpt2-medium")


def test_set_module_replaces_by_dotted_name():
    model = build_tiny("llama")
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "." in n)
    new = nn.Identity()
    models.set_module(model, name, new)
    assert model.get_submodule(name) is new
    models.set_module(model, "lm_head", new)
    assert model.lm_head is new


def test_default_seqlen_is_the_context_for_hub_presets_else_capped():
    from types import SimpleNamespace

    long, short = SimpleNamespace(n_positions=2048), SimpleNamespace(max_target_positions=128)
    assert models.context_length(long) == 2048 and models.context_length(short) == 128
    assert models.context_length(SimpleNamespace()) == models.DEFAULT_SEQLEN == 512
    hub = models.resolve("gpt2-medium", check_hub=False)
    embedded = models.resolve("smollm2-135m", check_hub=False)
    assert models.default_seqlen(hub, long) == 2048
    assert models.default_seqlen(embedded, long) == 512
    assert models.default_seqlen(embedded, short) == 128


@pytest.mark.parametrize("kind,family,cls_name", [
    ("gpt2", models.DECODER_ONLY, "GPT2LMHeadModel"),
    ("llama", models.DECODER_ONLY, "LlamaForCausalLM"),
    ("bert", models.ENCODER_ONLY, "BertModel"),
    ("bart", models.ENCODER_DECODER, "BartForConditionalGeneration"),
    ("whisper", models.ENCODER_DECODER, "WhisperForConditionalGeneration"),
])
def test_tiny_local_models_load_like_hub_ids(tiny_dirs, kind, family, cls_name):
    lm = models.load_model(str(tiny_dirs[kind]))
    assert lm.spec.source == "local" and lm.family == family
    assert type(lm.model).__name__ == cls_name
    assert lm.tokenizer("the movie").input_ids
    if kind == "whisper":
        assert lm.feature_extractor is not None


def test_conv1d_and_linear_give_the_same_orientation():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=6, nx=4)  # in 4 -> out 6, weight stored 4 x 6
    lin = nn.Linear(4, 6)
    lin.weight.data.copy_(conv.weight.data.t())
    assert models.weight_out_in(conv).shape == models.weight_out_in(lin).shape == (6, 4)
    assert torch.equal(models.weight_out_in(conv), models.weight_out_in(lin))
    # the view writes through to the Conv1D's own storage
    models.weight_out_in(conv)[2, 3] = 7.0
    assert conv.weight.data[3, 2] == 7.0


def test_layer_view_gpt2_sees_conv1d():
    model = build_tiny("gpt2")
    layers = models.prunable_layers(model)
    comps = sorted({pl.component for pl in layers})
    assert comps == ["attn.o", "attn.qkv", "mlp.down", "mlp.up"]
    assert len(layers) == 4 * model.config.n_layer
    qkv = next(pl for pl in layers if pl.component == "attn.qkv")
    assert qkv.shape == (3 * model.config.n_embd, model.config.n_embd)  # out x in


def test_layer_view_encoder_decoder_sides_and_cross_attention():
    model = build_tiny("bart")
    layers = models.prunable_layers(model)
    sides = {pl.side for pl in layers}
    assert sides == {"encoder", "decoder"}
    cross = [pl for pl in layers if pl.component.startswith("xattn.")]
    assert len(cross) == 4 * model.config.decoder_layers
    assert all(pl.side == "decoder" for pl in cross)
    assert not any(pl.component == "other" for pl in layers)


def test_layer_view_bert_components():
    model = build_tiny("bert")
    comps = [pl.component for pl in models.prunable_layers(model) if pl.block == 0]
    assert comps == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]


def test_family_inference_from_config(tiny_dirs):
    for kind, fam in [("gpt2", models.DECODER_ONLY), ("bert", models.ENCODER_ONLY),
                      ("bart", models.ENCODER_DECODER)]:
        assert models.resolve(str(tiny_dirs[kind])).family == fam
