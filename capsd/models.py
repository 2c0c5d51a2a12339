"""Model types capsd can load, as data: files, defaults and sherpa-onnx constructors.

Default file names are those of the official sherpa-onnx release directories
(https://github.com/k2-fsa/sherpa-onnx/releases/tag/asr-models), so pointing `[model] dir`
at an unpacked release is enough. Any file may be overridden in `[model]` by its key.

sherpa-onnx does not raise on every bad model: a CTC tokens file without a blank token makes
it call exit() inside the constructor, so the worker process vanishes with code 255. Files are
therefore checked here, cheaply, before anything is loaded.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The tone-coded self-test model shipped in the package: the default when [model] dir is "".
EMBEDDED_MODEL_DIR = Path(__file__).parent / "selftest" / "paraformer"


@dataclass(frozen=True)
class ModelType:
    """How one kind of model is found on disk and handed to sherpa-onnx."""

    constructor: str
    """Name of the `sherpa_onnx.OfflineRecognizer` class method that builds it."""
    files: Mapping[str, str]
    """Config key -> default file name, in the order the constructor takes them."""
    keywords: Mapping[str, str] = field(default_factory=dict)
    """Config key -> constructor keyword, where the two differ."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Fixed keyword arguments for this type."""
    required_tokens: tuple[str, ...] = ()
    """tokens.txt must contain at least one of these, or sherpa-onnx fails on load."""


# Other whisper sizes (base, small, ...): override encoder, decoder and tokens.
_WHISPER_SIZE = "tiny"

MODEL_TYPES: dict[str, ModelType] = {
    # sherpa-onnx-paraformer-zh-2023-09-14; the decoder stops at </s> and raises
    # IndexError without it.
    "paraformer": ModelType(
        constructor="from_paraformer",
        files={"model": "model.int8.onnx", "tokens": "tokens.txt"},
        keywords={"model": "paraformer"},
        required_tokens=("</s>",),
    ),
    # sherpa-onnx-sense-voice-zh-en-ja-ko-yue-2024-07-17; the blank id comes from the model's
    # metadata. No ITN: capsd formats numbers itself ([format] num).
    "sense_voice": ModelType(
        constructor="from_sense_voice",
        files={"model": "model.int8.onnx", "tokens": "tokens.txt"},
        options={"language": "auto", "use_itn": False},
    ),
    # sherpa-onnx-fire-red-asr-large-zh_en-2025-02-16; special ids come from metadata.
    "fire_red_asr": ModelType(
        constructor="from_fire_red_asr",
        files={
            "encoder": "encoder.int8.onnx",
            "decoder": "decoder.int8.onnx",
            "tokens": "tokens.txt",
        },
    ),
    # sherpa-onnx-zipformer-ctc-zh-int8-2025-07-03; the CTC greedy decoder exits the
    # process when tokens.txt has none of these (offline-recognizer-ctc-impl.h).
    "zipformer_ctc": ModelType(
        constructor="from_zipformer_ctc",
        files={"model": "model.int8.onnx", "tokens": "tokens.txt"},
        required_tokens=("<blk>", "<eps>", "<blank>"),
    ),
    # sherpa-onnx-whisper-tiny; language "" lets a multilingual model detect it.
    "whisper": ModelType(
        constructor="from_whisper",
        files={
            "encoder": f"{_WHISPER_SIZE}-encoder.int8.onnx",
            "decoder": f"{_WHISPER_SIZE}-decoder.int8.onnx",
            "tokens": f"{_WHISPER_SIZE}-tokens.txt",
        },
        options={"language": "", "task": "transcribe"},
    ),
}


def model_type(type_name: str) -> ModelType:
    try:
        return MODEL_TYPES[type_name]
    except KeyError:
        allowed = ", ".join(MODEL_TYPES)
        raise ValueError(f"unknown model type {type_name!r}; allowed: {allowed}") from None


def file_keys(type_name: str) -> tuple[str, ...]:
    """The `[model]` keys that name this type's files."""
    return tuple(model_type(type_name).files)


def resolve_files(type_name: str, model_dir: Path, overrides: Mapping[str, str]) -> dict[str, Path]:
    """Paths of the model's files: defaults inside `model_dir`, or overrides.

    An override is a path relative to `model_dir` or an absolute path.
    """
    spec = model_type(type_name)
    unknown = sorted(set(overrides) - set(spec.files))
    if unknown:
        raise ValueError(
            f"model type {type_name!r} has no file {', '.join(unknown)}; its files are {', '.join(spec.files)}"
        )
    return {key: model_dir / overrides.get(key, default) for key, default in spec.files.items()}


def check_files(type_name: str, files: Mapping[str, Path]) -> list[str]:
    """Problems that would make sherpa-onnx fail or kill the process; [] when fine."""
    required = model_type(type_name).required_tokens
    problems = []
    for key, path in files.items():
        if problem := _check_file(key, path):
            problems.append(problem)
        elif key == "tokens" and required and _read_symbols(path).isdisjoint(required):
            wanted = " or ".join(required)
            problems.append(f"tokens file {path} lacks {wanted}, which {type_name} needs")
    return problems


def _check_file(key: str, path: Path) -> str | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"{key} file {path} does not exist"
    except OSError as e:
        return f"{key} file {path}: {e.strerror}"
    if not path.is_file():
        return f"{key} file {path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{key} file {path} is not readable"
    if info.st_size == 0:
        return f"{key} file {path} is empty"
    return None


def _read_symbols(tokens: Path) -> set[str]:
    """The symbols of a tokens.txt (`<symbol> <id>` per line)."""
    with tokens.open(encoding="utf-8", errors="replace") as f:
        return {fields[0] for line in f if len(fields := line.split()) > 1}


def constructor_kwargs(type_name: str, files: Mapping[str, Path], num_threads: int) -> tuple[str, dict[str, Any]]:
    """The `OfflineRecognizer` class method and the keyword arguments to call it with."""
    spec = model_type(type_name)
    kwargs: dict[str, Any] = {spec.keywords.get(key, key): str(files[key]) for key in spec.files}
    kwargs |= {"num_threads": num_threads, "provider": "cpu", "debug": False}
    kwargs |= spec.options
    return spec.constructor, kwargs


def create_recognizer(type_name: str, files: Mapping[str, Path], num_threads: int) -> Any:
    """Load the model. Run `check_files` first: some bad files kill the process."""
    import sherpa_onnx  # heavy (~17 MB RSS); only worker processes need it

    name, kwargs = constructor_kwargs(type_name, files, num_threads)
    return getattr(sherpa_onnx.OfflineRecognizer, name)(**kwargs)
