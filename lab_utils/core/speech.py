"""Text to 16 kHz speech with the espeak-ng library shipped by ``espeakng-loader``.

No system espeak-ng is needed: the wheel carries ``libespeak-ng.so`` and its
voice data, driven here through ctypes. Whisper expects 16 kHz mono float32
in [-1, 1]; espeak-ng speaks at 22050 Hz, so the samples are resampled with a
polyphase filter (160/441 is 16000/22050 in lowest terms).
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16_000
_SYNC = 2  # AUDIO_OUTPUT_SYNCHRONOUS: samples arrive through the callback
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_lock = threading.Lock()


class SpeechError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def _engine(voice: str = "en-us"):
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - installed by make
        raise SpeechError("espeakng-loader is not installed: run `make report` or `make test` "
                          "(they install requirements-models.txt)") from e
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    rate = lib.espeak_Initialize(_SYNC, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        raise SpeechError(f"espeak_Initialize failed ({rate})")
    chunks: list[np.ndarray] = []

    def on_samples(wav, n, _events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = keep synthesizing

    callback = _CALLBACK(on_samples)  # keep a reference: ctypes does not
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise SpeechError(f"espeak-ng has no voice {voice!r}")
    return lib, rate, chunks, callback


def synthesize(text: str, voice: str = "en-us") -> np.ndarray:
    """Speak ``text``; return float32 samples at 16 kHz."""
    from scipy.signal import resample_poly

    with _lock:  # one synthesizer, one callback buffer
        lib, rate, chunks, _ = _engine(voice)
        chunks.clear()
        data = text.encode("utf-8")
        buf = ctypes.create_string_buffer(data)
        err = lib.espeak_Synth(buf, len(data) + 1, 0, 0, 0, 0, None, None)
        if err != 0:
            raise SpeechError(f"espeak_Synth failed with code {err}")
        lib.espeak_Synchronize()
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    audio = pcm.astype(np.float32) / 32768.0
    g = np.gcd(SAMPLE_RATE, rate)
    return resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
