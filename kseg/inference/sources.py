"""What `kseg predict` can run: every model file `kseg train` and
`kseg export` write.

- a `.keras` file (`model.keras`, `checkpoints/best.keras`, `last.keras`);
- a run directory (its `model.keras`);
- a SavedModel: a version folder (`saved_models/NAME/3`) or a TF Serving
  model folder (`saved_models/NAME`, its highest version);
- a `.tflite` file (fixed input size: images run by windows of that size; a
  PANet file's are fitted into it);
- a `.onnx` file (ONNX Runtime: any size, or the fixed size it was exported
  for, run like a `.tflite` file's; a PANet file's images are fitted into
  it).

`open_model(path)` returns a `ModelSource` whose `model` is called like a
kseg Keras model on float32 RGB batches in 0–255 and returns `{"logits"}`
(for exports: the log of their probabilities, whose softmax is the
probabilities), so `kseg.inference.predict` runs all of them the same way.
An exported instance model comes as a
`kseg.inference.sources.InstanceSavedModel` (PANet SavedModel, whose
signature returns an `instance_map`), a
`kseg.export.tflite.TFLiteInstanceSegmenter` (PANet `.tflite` file) or a
`kseg.export.onnx.ONNXInstanceSegmenter` (PANet `.onnx` file), which
`predict_instances` runs like the Keras PANet. The prediction functions take
the `ModelSource` itself as well as its `model` (`as_model`).
"""

import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

MODEL_FILE = "model.keras"
MODEL_KINDS = (
    "a .keras file, a `kseg train` run directory, a SavedModel folder, "
    "a .tflite file or a .onnx file"
)


class ModelSource(NamedTuple):
    """A model to predict with.

    Attributes:
        model: callable `(images float32 (N, h, w, 3), training=False) ->
            {"logits": (N, h, w, C)}`.
        kind: `"keras"`, `"saved_model"`, `"tflite"` or `"onnx"`.
        path: the file or folder loaded.
        input_size: `(H, W)` the model only takes (TFLite, fixed-size
            ONNX), else `None`.
    """

    model: object
    kind: str
    path: Path
    input_size: tuple | None


def open_model(path):
    """Loads any model `kseg train` or `kseg export` wrote (see the module
    docstring); raises `FileNotFoundError` / `ValueError` naming the path and
    what it expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return _keras(path / MODEL_FILE)
        if (path / "saved_model.pb").is_file():
            return _saved_model(path)
        versions = sorted(
            (int(child.name), child)
            for child in path.iterdir()
            if child.name.isdigit() and (child / "saved_model.pb").is_file()
        )
        if versions:
            return _saved_model(versions[-1][1])
        if (path / "recipe.yaml").is_file():
            raise ValueError(
                f"the run {path} has no {MODEL_FILE} yet (not finished): pass "
                f"{path / 'checkpoints' / 'best.keras'} or resume the run"
            )
        raise ValueError(
            f"{path} is neither a kseg run directory ({MODEL_FILE}) nor a "
            "SavedModel (saved_model.pb, or version folders holding one)"
        )
    if path.suffix == ".tflite":
        return _tflite(path)
    if path.suffix == ".onnx":
        return _onnx(path)
    if path.suffix != ".keras" and not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a model file kseg runs: pass {MODEL_KINDS} "
            f"(its suffix {path.suffix or '(none)'!r} is none of .keras, "
            ".tflite, .onnx)"
        )
    return _keras(path)


def as_model(model):
    """The model of a `ModelSource` (what `open_model` returns); any other
    model as it is."""
    return model.model if isinstance(model, ModelSource) else model


def _keras(path):
    from kseg.models import load_model

    return ModelSource(load_model(path), "keras", path, None)


class _SavedModelRunner:
    """A kseg SavedModel's `serving_default` as a kseg-model-like callable."""

    task = "semantic"

    def __init__(self, path):
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(str(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load the SavedModel {path}: {error}") from None
        if "serving_default" not in loaded.signatures:
            raise ValueError(f"the SavedModel {path} has no serving_default signature")
        self._loaded = loaded
        self._signature = loaded.signatures["serving_default"]

    def __call__(self, images, training=False):
        pixels = np.clip(np.round(np.asarray(images)), 0, 255).astype(np.uint8)
        outputs = call_signature(self._signature, images=pixels)
        if "probabilities" not in outputs:
            raise ValueError(
                "the SavedModel's serving_default returns no 'probabilities' "
                "(not a kseg segmentation export)"
            )
        probabilities = np.asarray(outputs["probabilities"], np.float32)
        return {"logits": np.log(np.maximum(probabilities, 1e-30))}


def call_signature(signature, **inputs):
    """Calls a SavedModel signature; a request the export refuses (its pixel
    cap, a bad shape) becomes a `ValueError` carrying the export's message."""
    import tensorflow as tf

    try:
        return signature(**inputs)
    except tf.errors.InvalidArgumentError as error:
        lines = [line for line in error.message.splitlines() if line.strip()]
        reason = next(
            (line.strip() for line in lines if "assertion failed" in line), lines[0]
        )
        raise ValueError(f"the SavedModel refused the image: {reason}") from None


class InstanceSavedModel:
    """An exported PANet SavedModel's `serving_default` as a detector:
    `detect(image)` returns its detections in image pixels."""

    task = "instance"

    def __init__(self, loaded, signature):
        self._loaded = loaded
        self._signature = signature

    def detect(self, image):
        """`{"boxes", "scores", "classes", "masks"}` of the first
        `num_detections` detections of one uint8 `(H, W, 3)` image."""
        import tensorflow as tf

        outputs = call_signature(
            self._signature, images=tf.constant(np.asarray(image)[None])
        )
        count = int(outputs["num_detections"][0])
        return {
            key: np.asarray(outputs[key][0, :count])
            for key in ("boxes", "scores", "classes", "masks")
        }


def _saved_model(path):
    runner = _SavedModelRunner(path)
    if "instance_map" in runner._signature.structured_outputs:
        # An exported instance model (PANet): `predict_instances` runs it.
        runner = InstanceSavedModel(runner._loaded, runner._signature)
    return ModelSource(runner, "saved_model", path, None)


class _ExportRunner:
    """A kseg `.tflite` or `.onnx` semantic file (its runner `segmenter`:
    uint8 images → `{"probabilities"}`) as a kseg-model-like callable.
    Other sizes than a file's fixed one (test-time scales) are resized to it
    and the probabilities back (bilinear, half-pixel centres, as the
    SavedModel does for a fixed-size model)."""

    task = "semantic"

    def __init__(self, segmenter):
        self._segmenter = segmenter
        self.input_size = segmenter.input_size

    def __call__(self, images, training=False):
        import cv2

        images = np.asarray(images, np.float32)
        height, width = images.shape[1:3]
        resized = self.input_size is not None and (height, width) != tuple(
            self.input_size
        )
        if resized:
            # cv2's INTER_LINEAR samples at half-pixel centres: kseg's resize.
            size = (self.input_size[1], self.input_size[0])
            images = np.stack(
                [cv2.resize(i, size, interpolation=cv2.INTER_LINEAR) for i in images]
            )
        pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
        probabilities = self._segmenter(pixels)["probabilities"]
        if resized:
            probabilities = np.stack(
                [
                    cv2.resize(
                        p, (width, height), interpolation=cv2.INTER_LINEAR
                    ).reshape(height, width, -1)
                    for p in probabilities
                ]
            )
        return {"logits": np.log(np.maximum(probabilities, 1e-30))}


def _tflite(path):
    from kseg.export.tflite import (
        TFLiteInstanceSegmenter,
        TFLiteSegmenter,
        is_instance_file,
    )

    try:
        segmenter = TFLiteSegmenter(path)
    except ValueError as error:
        raise ValueError(f"cannot load the TFLite file {path}: {error}") from None
    runner = _ExportRunner(segmenter)
    if is_instance_file(segmenter.output_names):
        # An exported instance model (PANet): `predict_instances` runs it.
        runner = TFLiteInstanceSegmenter(path)
    return ModelSource(runner, "tflite", path, runner.input_size)


def _onnx(path):
    try:
        from kseg.export.onnx import (
            ONNXInstanceSegmenter,
            ONNXSegmenter,
            is_instance_file,
        )

        segmenter = ONNXSegmenter(path)
    except ImportError as error:
        raise ImportError(f"cannot run the ONNX file {path}: {error}") from None
    except Exception as error:  # ONNX Runtime's own errors (a damaged file)
        raise ValueError(f"cannot load the ONNX file {path}: {error}") from None
    if is_instance_file(segmenter.output_names):
        # An exported instance model (PANet): `predict_instances` runs it.
        runner = ONNXInstanceSegmenter(path)
    elif "probabilities" in segmenter.output_names:
        runner = _ExportRunner(segmenter)
    else:
        raise ValueError(
            f"the ONNX file {path} is not a kseg export: its outputs are "
            f"{segmenter.output_names}"
        )
    return ModelSource(runner, "onnx", path, runner.input_size)
