"""Deployment: TF Serving SavedModels, TFLite (LiteRT) and ONNX files.

`export_saved_model` writes `saved_models/<name>/<version>/` with the
`serving_default` (uint8 images) and `serving_bytes` (encoded images)
signatures; `export_tflite` writes a float32, float16 or int8 `.tflite` file
for one fixed input size, run by `TFLiteSegmenter` (`TFLiteInstanceSegmenter`
for PANet); `export_onnx` writes an
`.onnx` file (dynamic batch and size), run by `ONNXSegmenter`
(`ONNXInstanceSegmenter` for PANet). `kseg export` is the
command line (`kseg.export.commands`).
"""

from kseg.lazy import lazy_exports

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
            "TFLiteInstanceSegmenter",
            "TFLiteSegmenter",
            "convert_function",
            "convert_to_tflite",
            "export_tflite",
            "operator_names",
        ),
        "kseg.export.tflite",
    ),
    **dict.fromkeys(
        ("ONNXInstanceSegmenter", "ONNXSegmenter", "convert_to_onnx", "export_onnx"),
        "kseg.export.onnx",
    ),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
