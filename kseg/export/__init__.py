"""Deployment: TF Serving SavedModels and TFLite (LiteRT) files.

`export_saved_model` writes `saved_models/<name>/<version>/` with the
`serving_default` (uint8 images) and `serving_bytes` (encoded images)
signatures; `export_tflite` writes a float32, float16 or int8 `.tflite` file
for one fixed input size, run by `TFLiteSegmenter`. `kseg export` is the
command line (`kseg.export.commands`).
"""

from kseg.export.saved_model import (
    BYTES_SIGNATURE,
    CLASS_MAP,
    IMAGE_BYTES,
    IMAGES,
    PROBABILITIES,
    SERVING_SIGNATURE,
    build_serving_module,
    export_saved_model,
    next_version,
    serving_signatures,
)
from kseg.export.tflite import (
    QUANTIZATIONS,
    TFLiteSegmenter,
    convert_function,
    convert_to_tflite,
    export_tflite,
    operator_names,
)

__all__ = [
    "BYTES_SIGNATURE",
    "CLASS_MAP",
    "IMAGES",
    "IMAGE_BYTES",
    "PROBABILITIES",
    "QUANTIZATIONS",
    "SERVING_SIGNATURE",
    "TFLiteSegmenter",
    "build_serving_module",
    "convert_function",
    "convert_to_tflite",
    "export_saved_model",
    "export_tflite",
    "next_version",
    "operator_names",
    "serving_signatures",
]
