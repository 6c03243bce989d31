"""Tiny models of every architecture the lab supports, built from configs and
saved with ``save_pretrained`` so they load through the same code path as a
hub id or a local folder. Random weights: for plumbing, not for quality."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a an of to in and is was it that for on with as by at from this be are not but "
         "movie film good bad great plot story acting scene time people long new year city "
         "state government week president said day made make just like very more most").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "[CLS]", "[SEP]"]


def tiny_tokenizer():
    """A word-level tokenizer with a few dozen words and the usual specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", mask_token="<mask>",
                                   cls_token="[CLS]", sep_token="[SEP]")


VOCAB = len(SPECIALS) + len(dict.fromkeys(WORDS))


def tiny_config(kind: str):
    import transformers as tf

    common = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if kind == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=128, tie_word_embeddings=True, **common)
    if kind == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=128, vocab_size=64,
                             pad_token_id=0)
    if kind == "bart":
        return tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=2, decoder_attention_heads=2,
                             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                             decoder_start_token_id=2, forced_eos_token_id=2, **common)
    if kind == "whisper":
        return tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=2, decoder_attention_heads=2,
                                encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                                max_source_positions=1500, max_target_positions=64,
                                vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                decoder_start_token_id=1, suppress_tokens=[],
                                begin_suppress_tokens=[])
    raise ValueError(kind)


KINDS = ("gpt2", "llama", "bert", "bart", "whisper")


def build_tiny(kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(kind)
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "bert": tf.BertModel,
           "bart": tf.BartForConditionalGeneration,
           "whisper": tf.WhisperForConditionalGeneration}[kind]
    return cls(cfg).eval()


def save_tiny(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Build, save (safetensors + tokenizer [+ feature extractor]) and return the folder."""
    from transformers import WhisperFeatureExtractor

    path = Path(path)
    build_tiny(kind, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if kind == "whisper":
        WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- the zoo
# Tiny random models of many architectures (two blocks, width 32, even sizes everywhere, so half
# of any row or matrix is a whole number), for the engine's block view: (family, model class,
# config class, config). MoE models have four experts, two per token.
_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
_ENC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=128)
_MOE = dict(_DEC, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=128, decoder_start_token_id=2)
ZOO = {
    "llama": ("decoder-only", "LlamaForCausalLM", "LlamaConfig", _DEC),
    "qwen2": ("decoder-only", "Qwen2ForCausalLM", "Qwen2Config", _DEC),
    "qwen3": ("decoder-only", "Qwen3ForCausalLM", "Qwen3Config", dict(_DEC, head_dim=8)),
    "gemma2": ("decoder-only", "Gemma2ForCausalLM", "Gemma2Config", dict(_DEC, head_dim=8)),
    "phi3": ("decoder-only", "Phi3ForCausalLM", "Phi3Config", _DEC),
    "olmo2": ("decoder-only", "Olmo2ForCausalLM", "Olmo2Config", _DEC),
    "gpt_neox": ("decoder-only", "GPTNeoXForCausalLM", "GPTNeoXConfig",
                 {k: v for k, v in _DEC.items() if k != "num_key_value_heads"}),
    "falcon": ("decoder-only", "FalconForCausalLM", "FalconConfig",
               dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": ("decoder-only", "BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "opt": ("decoder-only", "OPTForCausalLM", "OPTConfig",
            dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=32)),
    "gpt2": ("decoder-only", "GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=128)),
    "mixtral": ("decoder-only", "MixtralForCausalLM", "MixtralConfig",
                dict(_DEC, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("decoder-only", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  dict(_MOE, shared_expert_intermediate_size=64)),
    "qwen3_moe": ("decoder-only", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(_MOE, head_dim=8)),
    "olmoe": ("decoder-only", "OlmoeForCausalLM", "OlmoeConfig", dict(_MOE, intermediate_size=32)),
    "gpt_oss": ("decoder-only", "GptOssForCausalLM", "GptOssConfig",
                dict(_DEC, intermediate_size=32, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=16)),
    "t5": ("encoder-decoder", "T5ForConditionalGeneration", "T5Config",
           dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    "bart": ("encoder-decoder", "BartForConditionalGeneration", "BartConfig", _SEQ2SEQ),
    "switch_transformers": ("encoder-decoder", "SwitchTransformersForConditionalGeneration",
                            "SwitchTransformersConfig",
                            dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                 num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=4,
                                 num_experts=4, expert_capacity=256, decoder_start_token_id=0)),
    "bert": ("encoder-only", "BertModel", "BertConfig", _ENC),
    "distilbert": ("encoder-only", "DistilBertModel", "DistilBertConfig",
                   dict(dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=128)),
    "electra": ("encoder-only", "ElectraModel", "ElectraConfig", dict(_ENC, embedding_size=32)),
    "deberta_v2": ("encoder-only", "DebertaV2Model", "DebertaV2Config",
                   dict(_ENC, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16)),
    "albert": ("encoder-only", "AlbertModel", "AlbertConfig", dict(_ENC, embedding_size=16)),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "switch_transformers")


def build_zoo(name: str, seed: int = 0, **changes):
    """A tiny model of architecture ``name`` of :data:`ZOO` (``changes`` to its config), its
    matrices drawn from N(0, 0.02) whatever its own initialization (some zero a router or a
    projection), with ``config.architectures`` set as ``save_pretrained`` would."""
    import transformers as tf

    family, model_cls, config_cls, kwargs = ZOO[name]
    config = getattr(tf, config_cls)(**{"vocab_size": 64, "pad_token_id": 0, **kwargs, **changes})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model, family


def zoo_batches(model, family: str, nsamples: int = 8, seqlen: int = 32, seed: int = 0) -> list[dict]:
    """Calibration batches of random token ids, as the engine's ``calibration_batches`` makes
    them (an encoder-decoder model's decoder reads the window shifted right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (nsamples, seqlen), generator=g)
    inputs = {"input_ids": ids}
    if family == "encoder-decoder":
        start = torch.full((nsamples, 1), model.config.decoder_start_token_id)
        inputs["decoder_input_ids"] = torch.cat([start, ids[:, :-1]], dim=1)
    return [{"inputs": inputs, "masks": {}}]
