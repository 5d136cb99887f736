"""Deployment: TF Serving SavedModels, TFLite (LiteRT) and ONNX files.

`export_saved_model` writes `saved_models/<name>/<version>/` with the
`serving_default` (uint8 images) and `serving_bytes` (encoded images)
signatures; `export_tflite` writes a float32, float16 or int8 `.tflite` file
for one fixed input size, run by `TFLiteSegmenter`; `export_onnx` writes an
`.onnx` file (dynamic batch and size), run by `ONNXSegmenter`. `kseg export` is the
command line (`kseg.export.commands`).
"""

_EXPORTS = {
    **dict.fromkeys(
        (
            "BYTES_SIGNATURE",
            "CLASS_MAP",
            "IMAGE_BYTES",
            "IMAGES",
            "PROBABILITIES",
            "SERVING_SIGNATURE",
            "build_serving_module",
            "export_saved_model",
            "next_version",
            "serving_signatures",
        ),
        "kseg.export.saved_model",
    ),
    **dict.fromkeys(
        (
            "QUANTIZATIONS",
            "TFLiteSegmenter",
            "convert_function",
            "convert_to_tflite",
            "export_tflite",
            "operator_names",
        ),
        "kseg.export.tflite",
    ),
    **dict.fromkeys(
        ("ONNXSegmenter", "convert_to_onnx", "export_onnx"), "kseg.export.onnx"
    ),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # PEP 562: TensorFlow loads on first use, so that the command line builds
    # its parser without it.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kseg.export' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
