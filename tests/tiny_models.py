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
