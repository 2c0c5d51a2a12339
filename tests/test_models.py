import inspect
from pathlib import Path

import numpy as np
import pytest
import sherpa_onnx

from capsd import models

pytestmark = pytest.mark.unit

M = Path("/models/m")

# type -> (constructor, the file keyword arguments for the official release directory)
EXPECTED: dict[str, tuple[str, dict[str, str]]] = {
    "paraformer": (
        "from_paraformer",
        {"paraformer": f"{M}/model.int8.onnx", "tokens": f"{M}/tokens.txt"},
    ),
    "sense_voice": (
        "from_sense_voice",
        {"model": f"{M}/model.int8.onnx", "tokens": f"{M}/tokens.txt"},
    ),
    "fire_red_asr": (
        "from_fire_red_asr",
        {
            "encoder": f"{M}/encoder.int8.onnx",
            "decoder": f"{M}/decoder.int8.onnx",
            "tokens": f"{M}/tokens.txt",
        },
    ),
    "zipformer_ctc": (
        "from_zipformer_ctc",
        {"model": f"{M}/model.int8.onnx", "tokens": f"{M}/tokens.txt"},
    ),
    "whisper": (
        "from_whisper",
        {
            "encoder": f"{M}/tiny-encoder.int8.onnx",
            "decoder": f"{M}/tiny-decoder.int8.onnx",
            "tokens": f"{M}/tiny-tokens.txt",
        },
    ),
}

OPTIONS: dict[str, dict[str, object]] = {
    "sense_voice": {"language": "auto", "use_itn": False},
    "whisper": {"language": "", "task": "transcribe"},
}


def test_every_type_is_tested() -> None:
    assert set(models.MODEL_TYPES) == set(EXPECTED)


@pytest.mark.parametrize("type_name", EXPECTED)
def test_a_release_directory_gives_the_constructor_its_files_and_options(type_name: str) -> None:
    files = models.resolve_files(type_name, M, {})
    name, kwargs = models.constructor_kwargs(type_name, files, num_threads=3)

    constructor, file_kwargs = EXPECTED[type_name]
    common = {"num_threads": 3, "provider": "cpu", "debug": False}
    assert name == constructor
    assert kwargs == file_kwargs | common | OPTIONS.get(type_name, {})


@pytest.mark.parametrize("type_name", EXPECTED)
def test_kwargs_are_accepted_by_installed_sherpa_onnx(type_name: str) -> None:
    files = models.resolve_files(type_name, M, {})
    name, kwargs = models.constructor_kwargs(type_name, files, num_threads=1)

    signature = inspect.signature(getattr(sherpa_onnx.OfflineRecognizer, name))
    signature.bind(**kwargs)  # raises TypeError on an unknown or missing keyword
    for key, value in kwargs.items():
        default = signature.parameters[key].default
        if default is not inspect.Parameter.empty:
            assert type(value) is type(default), key


def test_each_model_type_names_its_file_keys() -> None:
    assert models.file_keys("paraformer") == ("model", "tokens")
    assert models.file_keys("whisper") == ("encoder", "decoder", "tokens")


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown model type 'nemo'.*paraformer"):
        models.file_keys("nemo")


def test_file_overrides_resolve_relative_to_the_model_dir_or_as_absolute() -> None:
    files = models.resolve_files(
        "whisper",
        M,
        {"encoder": "base-encoder.onnx", "tokens": "/shared/base-tokens.txt"},
    )
    assert files == {
        "encoder": M / "base-encoder.onnx",
        "decoder": M / "tiny-decoder.int8.onnx",
        "tokens": Path("/shared/base-tokens.txt"),
    }
    _, kwargs = models.constructor_kwargs("whisper", files, num_threads=1)
    assert kwargs["encoder"] == f"{M}/base-encoder.onnx"
    assert kwargs["tokens"] == "/shared/base-tokens.txt"


def test_override_of_unknown_file_is_refused() -> None:
    with pytest.raises(ValueError, match="no file encoder"):
        models.resolve_files("paraformer", M, {"encoder": "x.onnx"})


def write_model(directory: Path, tokens: str) -> dict[str, Path]:
    (directory / "model.int8.onnx").write_bytes(b"onnx")
    (directory / "tokens.txt").write_text(tokens)
    return models.resolve_files("paraformer", directory, {})


def test_check_files_accepts_good_files(tmp_path: Path) -> None:
    files = write_model(tmp_path, "<blank> 0\n</s> 1\n")
    assert models.check_files("paraformer", files) == []


def test_check_files_reports_missing_files(tmp_path: Path) -> None:
    files = models.resolve_files("fire_red_asr", tmp_path, {})
    problems = models.check_files("fire_red_asr", files)
    assert problems == [
        f"encoder file {tmp_path}/encoder.int8.onnx does not exist",
        f"decoder file {tmp_path}/decoder.int8.onnx does not exist",
        f"tokens file {tmp_path}/tokens.txt does not exist",
    ]


def test_check_files_reports_empty_file(tmp_path: Path) -> None:
    files = write_model(tmp_path, "</s> 1\n")
    files["model"].write_bytes(b"")
    assert models.check_files("paraformer", files) == [f"model file {tmp_path}/model.int8.onnx is empty"]


def test_a_directory_where_a_model_file_should_be_is_reported(tmp_path: Path) -> None:
    files = write_model(tmp_path, "</s> 1\n")
    files["model"] = tmp_path
    assert models.check_files("paraformer", files) == [f"model file {tmp_path} is not a regular file"]


def test_paraformer_tokens_need_end_of_sentence(tmp_path: Path) -> None:
    files = write_model(tmp_path, "<blank> 0\n<s> 1\n")
    assert models.check_files("paraformer", files) == [
        f"tokens file {tmp_path}/tokens.txt lacks </s>, which paraformer needs"
    ]


def test_ctc_tokens_without_a_blank_are_reported(tmp_path: Path) -> None:
    files = write_model(tmp_path, "a 0\nb 1\n</s> 2\n")
    assert models.check_files("zipformer_ctc", files) == [
        f"tokens file {tmp_path}/tokens.txt lacks <blk> or <eps> or <blank>," + " which zipformer_ctc needs"
    ]
    for blank in ("<blk>", "<eps>", "<blank>"):
        files["tokens"].write_text(f"{blank} 0\na 1\n")
        assert models.check_files("zipformer_ctc", files) == []


def test_types_without_special_tokens_read_no_symbols(tmp_path: Path) -> None:
    files = write_model(tmp_path, "a 0\n")
    assert models.check_files("sense_voice", files) == []


SELFTEST_FILES = models.resolve_files("paraformer", models.EMBEDDED_MODEL_DIR, {})


@pytest.mark.skipif(
    not all(path.is_file() for path in SELFTEST_FILES.values()),
    reason=f"the embedded self-test model is not built yet ({models.EMBEDDED_MODEL_DIR})",
)
def test_selftest_model_loads_and_decodes_silence() -> None:
    assert models.check_files("paraformer", SELFTEST_FILES) == []
    recognizer = models.create_recognizer("paraformer", SELFTEST_FILES, num_threads=1)

    stream = recognizer.create_stream()
    stream.accept_waveform(16000, np.zeros(16000, dtype=np.float32))
    recognizer.decode_stream(stream)
    assert stream.result.text == ""
