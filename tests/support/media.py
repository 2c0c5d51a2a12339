"""Media files made at test time with PyAV (no binary fixtures): tone-coded audio as an upload."""

from __future__ import annotations

import io

import av
import numpy as np

from capsd.protocol import RATE


def encode(samples: np.ndarray, fmt: str = "wav", codec: str = "pcm_s16le", rate: int = RATE, layout: str = "mono",
           bit_rate: int = 0) -> bytes:  # fmt: skip
    """`samples` (16 kHz mono float32) as a file of container `fmt`, resampled to `rate` and `layout`."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1),
                                           format="flt", layout="mono")  # fmt: skip
        frame.sample_rate = RATE
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(piece))
        container.mux(stream.encode(None))
    return out.getvalue()


FORMATS = {
    "wav": ("wav", "pcm_s16le", RATE, "mono"),
    "flac-44k-stereo": ("flac", "flac", 44100, "stereo"),
    "mp3-48k": ("mp3", "libmp3lame", 48000, "stereo"),
}
