"""Tone table and audio synthesiser for the tone-coded self-test models.

Digit d is a pure tone at the centre of mel band d, where the self-test models
split the 80 fbank bins 20..79 into 10 bands of 6 bins. The mel scale and its
range (HTK, 20..7600 Hz, 80 bins) are those of sherpa-onnx's own front end.
"""

import math

import numpy as np

from capsd.protocol import RATE

DIGIT_TOKENS = "零一二三四五六七八九"

_LOW_HZ, _HIGH_HZ, _NUM_BINS = 20.0, 7600.0, 80
FIRST_BIN, BINS_PER_BAND = 20, 6
_FADE_S = 0.005  # a click at a tone edge would splatter energy into every band


def _mel(hz: float) -> float:
    return 1127.0 * math.log(1.0 + hz / 700.0)


def _inv_mel(mel: float) -> float:
    return 700.0 * (math.exp(mel / 1127.0) - 1.0)


def _band_centre_hz(digit: int) -> float:
    # Bin k spans mel edges k..k+2 of 82 edges, so its centre is edge k+1; the
    # middle of the band's 6 bins is edge FIRST_BIN + 6d + 3.5.
    step = (_mel(_HIGH_HZ) - _mel(_LOW_HZ)) / (_NUM_BINS + 1)
    edge = FIRST_BIN + BINS_PER_BAND * digit + 3.5
    return _inv_mel(_mel(_LOW_HZ) + edge * step)


TONE_HZ: tuple[float, ...] = tuple(_band_centre_hz(d) for d in range(10))


def digit_tokens(digits: str) -> list[str]:
    """'305' -> ['三', '零', '五']."""
    return [DIGIT_TOKENS[int(d)] for d in digits]


def token_digits(tokens: list[str] | str) -> str:
    """['三', '零', '五'] (or '三零五', or a final result's ['3', '0', '5']) -> '305'."""
    return "".join(t if t.isdigit() and t.isascii() else str(DIGIT_TOKENS.index(t)) for t in tokens)


def synth(
    digits: str,
    *,
    tone_s: float = 0.3,
    gap_s: float = 0.2,
    lead_s: float = 0.2,
    amplitude: float = 0.3,
    rate: int = RATE,
) -> tuple[np.ndarray, list[float]]:
    """Render `digits` ('0'-'9'; ' ' is a silent slot) as float32 mono audio.

    Each character takes one slot of tone_s + gap_s after lead_s of silence;
    the last gap is the trailing silence. Returns the samples and the start
    time in seconds of each tone.
    """
    if bad := set(digits) - set("0123456789 "):
        raise ValueError(f"not a digit or space: {sorted(bad)}")
    slot_s = tone_s + gap_s
    samples = np.zeros(round((lead_s + slot_s * len(digits)) * rate), dtype=np.float64)
    tone_len = round(tone_s * rate)
    t = np.arange(tone_len) / rate
    fade_len = min(round(_FADE_S * rate), tone_len // 2)
    envelope = np.ones(tone_len)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade_len) / fade_len)
    envelope[:fade_len] = ramp
    envelope[tone_len - fade_len :] = ramp[::-1]
    starts: list[float] = []
    for slot, char in enumerate(digits):
        if char == " ":
            continue
        start = round((lead_s + slot * slot_s) * rate)
        tone = np.sin(2 * np.pi * TONE_HZ[int(char)] * t)
        samples[start : start + tone_len] = amplitude * envelope * tone
        starts.append(start / rate)
    return samples.astype(np.float32), starts


def write_wav(path: str, samples: np.ndarray, rate: int = RATE) -> None:
    """16-bit PCM mono WAV, what an operator feeds to `capsctl transcribe`."""
    import wave

    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m capsd.selftest.tones DIGITS OUT.wav   (a WAV the self-test model reads as DIGITS)")
    write_wav(sys.argv[2], synth(sys.argv[1])[0])
