"""Word error rate of Whisper on synthesized NYT prose.

* Text: the first NYT editorial sentences of 6-24 words, spoken by espeak-ng
  (:func:`lab_utils.core.data.speech`, 16 kHz, cached); the engine calibrates
  on movie-review speech, so the two never overlap.
* Decoding: greedy through ``generate`` from ``<|startoftranscript|><|notimestamps|>``
  (an ``.en`` model has no language or task token).
* Scoring: both sides through the Whisper paper's English normalizer as
  transformers ships it (its British-to-American table lives on the hub, so it
  is empty here: NYT prose is American already), then jiwer's corpus WER.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch

from lab_utils.core import data
from lab_utils.core.device import model_device
from lab_utils.core.metrics import load_metric
from lab_utils.core.progress import tqdm
from lab_utils.core.speech import SAMPLE_RATE

PROMPT_TOKENS = ("<|startoftranscript|>", "<|notimestamps|>")
# Tokens decoded per sentence at most. The default 64 sentences (6-24 words)
# take 19 tokens on average and 32 at most; 48 leaves half as much again, and
# a pruned model that loops stops here instead of filling the decoder's 448
# positions (a batch runs until its longest transcription ends).
MAX_NEW_TOKENS = 48


@lru_cache(maxsize=1)
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def normalize(text: str) -> str:
    """The text as WER compares it (same function for reference and hypothesis)."""
    return _normalizer()(text)


def decoder_prompt(tokenizer, config) -> list[int]:
    """``<|startoftranscript|><|notimestamps|>`` as token ids. A tokenizer
    without Whisper's special tokens (a tiny test model) starts from the
    config's ``decoder_start_token_id`` alone."""
    ids = []
    for tok in PROMPT_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.append(int(tid))
    if not ids:
        ids = [int(config.decoder_start_token_id)]
    return ids


@torch.no_grad()
def transcribe(model, feature_extractor, tokenizer, audio: list[np.ndarray], batch_size: int = 16,
               max_new_tokens: int = MAX_NEW_TOKENS, device: str | torch.device | None = None) -> list[str]:
    """Greedy transcriptions of 16 kHz clips (each under 30 s), computed on
    ``device`` (default: where the model reads its inputs)."""
    from transformers import GenerationConfig

    model.eval()
    device = device or model_device(model)
    dtype = next(model.parameters()).dtype  # the features in the model's dtype (bfloat16 on a GPU)
    prompt = decoder_prompt(tokenizer, model.config)
    # Whisper's decoder has max_target_positions slots, the prompt included.
    budget = min(max_new_tokens, model.config.max_target_positions - len(prompt))
    gen = GenerationConfig.from_model_config(model.config) if model.generation_config is None \
        else GenerationConfig(**model.generation_config.to_dict())
    gen.update(max_new_tokens=budget, max_length=None, num_beams=1, do_sample=False)
    texts = []
    for i in tqdm(range(0, len(audio), batch_size), desc="transcribe", leave=False):
        clips = audio[i:i + batch_size]
        feats = feature_extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        start = torch.tensor([prompt] * len(clips), dtype=torch.long, device=device)
        out = model.generate(feats.to(device, dtype), decoder_input_ids=start, generation_config=gen)
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.strip() for t in texts]


def wer(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus WER after normalizing both sides. A reference that normalizes to
    nothing (no words) is dropped with its hypothesis, and counted."""
    refs, hyps = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r.strip()]
    out = load_metric("wer").compute(predictions=[hyps[i] for i in keep], references=[refs[i] for i in keep])
    out["dropped_empty_references"] = len(refs) - len(keep)
    return out


def wer_benchmark(lm, n_utterances: int = 64, batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                  per_window: int = 1, voice: str = "en-us",
                  device: str | torch.device | None = None) -> dict:
    """WER of a loaded Whisper model on ``n_utterances`` synthesized NYT sentences.

    ``per_window`` > 1 packs that many consecutive sentences into one clip
    (at most 30 s, 0.5 s of silence between them), the length of segment
    Whisper was trained on: the encoder, which always reads 30 s, then runs
    once per clip instead of once per sentence. WER is pooled over all words
    either way; ``max_new_tokens`` applies per sentence.
    """
    if lm.feature_extractor is None:
        raise ValueError(f"{lm.spec.name} has no feature extractor: the WER benchmark needs a speech "
                         f"model (Whisper); a text encoder-decoder uses the denoising benchmark")
    texts = data.speech_sentences(n_utterances)
    audio = data.speech(texts, voice=voice)
    refs, clips = data.pack(texts, audio, per_window)
    t0 = time.perf_counter()
    hyps = transcribe(lm.model, lm.feature_extractor, lm.tokenizer, clips, batch_size,
                      max_new_tokens * max(1, per_window), device)
    out = wer(refs, hyps)
    out.update(n=len(texts), clips=len(clips), per_window=per_window, seconds=time.perf_counter() - t0,
               max_new_tokens=max_new_tokens,
               examples=[{"reference": r, "hypothesis": h} for r, h in zip(refs[:3], hyps[:3], strict=True)])
    return out
