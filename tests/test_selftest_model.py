"""The tone-coded self-test models, decoded through sherpa-onnx's real API."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sherpa_onnx

from capsd.models import EMBEDDED_MODEL_DIR
from capsd.selftest.build import build_paraformer, build_zipformer_ctc, main
from capsd.selftest.tones import DIGIT_TOKENS, digit_tokens, synth, token_digits

pytestmark = pytest.mark.unit

DIGITS = "1111 2233 90876 55"  # repeats, a silent slot, every digit
TOLERANCE_S = 0.04
Result = Any  # sherpa_onnx does not export OfflineRecognitionResult


def paraformer(model_dir: Path) -> sherpa_onnx.OfflineRecognizer:
    return sherpa_onnx.OfflineRecognizer.from_paraformer(
        paraformer=str(model_dir / "model.int8.onnx"),
        tokens=str(model_dir / "tokens.txt"),
        num_threads=1,
    )


def decode(recognizer: sherpa_onnx.OfflineRecognizer, samples: np.ndarray) -> Result:
    stream = recognizer.create_stream()
    stream.accept_waveform(16000, samples)
    recognizer.decode_stream(stream)
    return stream.result


def assert_exact(result: Result, digits: str, starts: list[float]) -> None:
    assert token_digits(result.tokens) == digits.replace(" ", "")
    assert len(result.timestamps) == len(starts)
    np.testing.assert_allclose(result.timestamps, starts, atol=TOLERANCE_S)


@pytest.fixture(scope="module")
def embedded() -> sherpa_onnx.OfflineRecognizer:
    return paraformer(EMBEDDED_MODEL_DIR)


def test_synth_places_tones_in_slots() -> None:
    samples, starts = synth("1 2", tone_s=0.3, gap_s=0.2, lead_s=0.2)
    assert samples.dtype == np.float32
    assert len(samples) == round((0.2 + 3 * 0.5) * 16000)
    assert starts == pytest.approx([0.2, 1.2])
    assert not samples[:3200].any() and not samples[8000:19200].any()
    assert np.array_equal(samples, synth("1 2")[0])


def test_digits_map_to_chinese_numeral_tokens_and_back() -> None:
    assert digit_tokens("0395") == ["零", "三", "九", "五"]
    assert token_digits(DIGIT_TOKENS) == "0123456789"


def test_the_builder_reproduces_the_shipped_model_files(tmp_path: Path) -> None:
    build_paraformer(tmp_path)
    for name in ("model.int8.onnx", "tokens.txt"):
        assert (tmp_path / name).read_bytes() == (EMBEDDED_MODEL_DIR / name).read_bytes(), name


def test_the_embedded_paraformer_decodes_tones_exactly(embedded: sherpa_onnx.OfflineRecognizer) -> None:
    samples, starts = synth(DIGITS)
    result = decode(embedded, samples)
    assert_exact(result, DIGITS, starts)
    assert result.text == "".join(digit_tokens(DIGITS.replace(" ", "")))


def test_embedded_paraformer_decodes_a_minute(embedded: sherpa_onnx.OfflineRecognizer) -> None:
    digits = "".join(str(d) for d in np.random.default_rng(7).integers(0, 10, 120))
    samples, starts = synth(digits)
    assert_exact(decode(embedded, samples), digits, starts)


def test_a_paraformer_batch_decodes_as_each_stream_alone(embedded: sherpa_onnx.OfflineRecognizer) -> None:
    cases = ["12", "3333333", "", "98 7"]
    streams = []
    for digits in cases:
        stream = embedded.create_stream()
        stream.accept_waveform(16000, synth(digits)[0])
        streams.append(stream)
    embedded.decode_streams(streams)
    for digits, stream in zip(cases, streams, strict=True):
        assert_exact(stream.result, digits, synth(digits)[1])


@pytest.mark.parametrize("cut", [(3000, 20000), (12345, 50001), (0, 1), (0, 0)])
def test_segment_cut_mid_tone_does_not_fail(embedded: sherpa_onnx.OfflineRecognizer, cut: tuple[int, int]) -> None:
    samples, _ = synth(DIGITS)
    result = decode(embedded, samples[cut[0] : cut[1]])
    assert set(result.tokens) <= set(DIGIT_TOKENS)


def test_silence_and_noise_decode_to_nothing(embedded: sherpa_onnx.OfflineRecognizer) -> None:
    noise = np.random.default_rng(0).standard_normal(5 * 16000) * 0.3
    for samples in (np.zeros(5 * 16000), noise):
        result = decode(embedded, samples.astype(np.float32))
        assert (result.text, result.tokens, result.timestamps) == ("", [], [])


def test_the_zipformer_ctc_model_decodes_tones_exactly_and_silence_to_nothing(tmp_path: Path) -> None:
    build_zipformer_ctc(tmp_path)
    recognizer = sherpa_onnx.OfflineRecognizer.from_zipformer_ctc(
        model=str(tmp_path / "model.int8.onnx"), tokens=str(tmp_path / "tokens.txt"), num_threads=1
    )
    samples, starts = synth(DIGITS)
    assert_exact(decode(recognizer, samples), DIGITS, starts)
    assert decode(recognizer, np.zeros(16000, np.float32)).tokens == []
    assert decode(recognizer, np.zeros(0, np.float32)).tokens == []


def test_heavy_paraformer_gives_the_same_tokens(tmp_path: Path, embedded: sherpa_onnx.OfflineRecognizer) -> None:
    build_paraformer(tmp_path, heavy=True)
    samples, _ = synth("1123581")
    light, heavy = decode(embedded, samples), decode(paraformer(tmp_path), samples)
    assert (heavy.tokens, heavy.timestamps) == (light.tokens, light.timestamps)


def test_paraformer_with_weights_decodes_exactly(tmp_path: Path, embedded: sherpa_onnx.OfflineRecognizer) -> None:
    build_paraformer(tmp_path, weights_mib=8)
    recognizer = paraformer(tmp_path)
    samples, starts = synth(DIGITS)
    result = decode(recognizer, samples)
    assert_exact(result, DIGITS, starts)
    light = decode(embedded, samples)
    assert (result.tokens, result.timestamps) == (light.tokens, light.timestamps)
    assert decode(recognizer, np.zeros(16000, np.float32)).tokens == []


def test_weights_are_in_the_file_and_the_same_on_every_run(tmp_path: Path) -> None:
    main(["--weights-mb", "3", str(tmp_path / "a")])
    build_paraformer(tmp_path / "b", weights_mib=3)
    model = (tmp_path / "a" / "model.int8.onnx").read_bytes()
    assert model == (tmp_path / "b" / "model.int8.onnx").read_bytes()
    light = (EMBEDDED_MODEL_DIR / "model.int8.onnx").stat().st_size
    assert len(model) - light == pytest.approx(3 * 2**20, rel=0.01)


REFUSED = [
    ["--weights-mb", "-1", "x"],
    ["--kind", "zipformer_ctc", "--weights-mb", "2", "x"],
    ["--ship", "--weights-mb", "2"],
]


@pytest.mark.parametrize("argv", REFUSED)
def test_weights_option_refuses_what_it_cannot_build(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
