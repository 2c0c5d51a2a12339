"""Tone-coded self-test models that sherpa-onnx loads through its real API."""

from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).parent / "paraformer"
