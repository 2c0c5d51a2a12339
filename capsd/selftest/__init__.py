"""Tone-coded self-test models that sherpa-onnx loads through its real API.

The embedded one ships in `paraformer/`; capsd.models.EMBEDDED_MODEL_DIR is its path.
"""
