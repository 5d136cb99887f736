"""The traced graph of an instance model (PANet) for the file exports
(ONNX, TFLite): uint8 images in, the model's detections out, with the NMS
swapped for one the target format has.

`instance_function(model, batch_size)` is the `tf.function` both convert:
input `images` uint8 `(N, H, W, 3)` at the model's own fixed `(H, W)`,
outputs `DETECTION_OUTPUTS`: `boxes` float32 `(N, D, 4)` `[y1, x1, y2, x2]`
in input pixels, `scores` float32 `(N, D)`, `classes` int32 `(N, D)` (0 for
padding rows), `masks` float32 `(N, D, 28, 28)` (the detected class's mask
probabilities inside its box; all zero for padding rows) and
`num_detections` int32 `(N,)`.

`BatchedNMS` runs kseg's padded NMS, nested `while` loops: tf2onnx
cannot convert them ("Graph has cycles"), and TFLite takes them only from a
frozen graph whose control flow is left unlowered, as `WHILE` ops that made
the quickstart PANet's file 25% slower. Trace the function
inside `swapped_nms(model, nms)` with one of the greedy NMS ops the format
has instead: `CombinedNMS` (ONNX `NonMaxSuppression`), `SelectedNMS`
(TFLite `NON_MAX_SUPPRESSION_V5`). `BatchedNMS` hands its NMS the
candidates in order with distinct rank scores (`>= 1`; 0 for boxes that are
no candidates), so every greedy NMS keeps the same boxes; TensorFlow's ops,
like SPEC, suppress only an IoU greater than the threshold and so take
`BatchedNMS`'s own threshold.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from kseg.data import preprocess_images
from kseg.export.instance_saved_model import DETECTION_OUTPUTS
from kseg.export.saved_model import IMAGES
from kseg.tasks import is_instance_model

# `BatchedNMS` gives its candidates rank scores >= 1 and the rest 0.
RANK_THRESHOLD = 0.5


class CombinedNMS:
    """What `BatchedNMS` reads of its `PaddedNMS` (`confidence`,
    `num_detections`), from TensorFlow's
    `CombinedNonMaxSuppression` with one class, for any batch size; tf2onnx
    converts it to ONNX's `NonMaxSuppression`."""

    # Runs on a batch of unknown size as it is (no map over the images).
    any_batch = True

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, boxes, class_prediction):
        size = self.layer.max_detections
        out = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :],
            tf.reduce_max(class_prediction, axis=-1, keepdims=True),
            max_output_size_per_class=size,
            max_total_size=size,
            iou_threshold=self.layer.iou_threshold,
            score_threshold=RANK_THRESHOLD,
            pad_per_class=False,
            clip_boxes=False,
        )
        return {
            "confidence": out.nmsed_scores,
            "num_detections": out.valid_detections,
        }


class SelectedNMS:
    """What `BatchedNMS` reads of its `PaddedNMS`, from
    TensorFlow's `NonMaxSuppressionV5` (padded), one image at a time over a
    static batch size: TFLite's builtin `NON_MAX_SUPPRESSION_V5`."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, boxes, class_prediction):
        if boxes.shape[0] is None:
            raise ValueError("SelectedNMS needs a static batch size")
        size = self.layer.max_detections
        scores = tf.reduce_max(class_prediction, axis=-1)
        kept_scores, counts = [], []
        for image in range(boxes.shape[0]):
            _, score, count = tf.raw_ops.NonMaxSuppressionV5(
                boxes=boxes[image],
                scores=scores[image],
                max_output_size=size,
                iou_threshold=self.layer.iou_threshold,
                score_threshold=RANK_THRESHOLD,
                soft_nms_sigma=0.0,
                pad_to_max_output_size=True,
            )
            kept_scores.append(score)
            counts.append(count)
        return {
            "confidence": tf.stack(kept_scores),
            "num_detections": tf.stack(counts),
        }


@contextlib.contextmanager
def swapped_nms(model, nms):
    """Within the block, every built `kseg.layers.detection.BatchedNMS` of
    `model` runs `nms(layer)` (`CombinedNMS` or `SelectedNMS`) as its NMS;
    restored afterwards.

    Only the layer instances' `nms` attribute is swapped (a plain callable,
    no state): the model's weights and its saved form are untouched.
    """
    from kseg.layers.nms import BatchedNMS

    # An instance model's NMS layers (and the layers that create them in their
    # `build`) are built on their first call: one call on a blank image of its
    # fixed size builds those inference uses. Semantic models hold no NMS (and
    # may take any size).
    if is_instance_model(model):
        model(np.zeros((1, *model.input_shape[1:]), np.float32), training=False)
    # Private API: Keras <= 3.15 lists the sublayers built in `build` nowhere public.
    layers = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, BatchedNMS) and "nms" in vars(layer)
    ]
    originals = [vars(layer)["nms"] for layer in layers]
    try:
        for layer in layers:
            # Past Keras' attribute tracking: the callable holds no state.
            object.__setattr__(layer, "nms", nms(layer))
        yield
    finally:
        for layer, original in zip(layers, originals, strict=True):
            object.__setattr__(layer, "nms", original)


def instance_input_size(model, input_size=None):
    """The model's own fixed `(H, W)`; `input_size`, if given, must equal it."""
    size = tuple(int(s) for s in model.input_shape[1:3])
    if input_size is not None and tuple(input_size) != size:
        raise ValueError(
            f"An instance segmentation model takes its own fixed input size "
            f"{size}, got input_size={tuple(input_size)}"
        )
    return size


def instance_function(model, input_size=None, batch_size=None):
    """The `tf.function` of `model`'s detections on uint8 images (see the
    module docstring); `batch_size` `None` for a dynamic batch. Trace it
    inside `swapped_nms`."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Exporting needs the TensorFlow backend (KERAS_BACKEND=tensorflow), "
            f"the backend is {keras.backend.backend()!r}"
        )
    size = instance_input_size(model, input_size)

    def detect(images):
        outputs = model(preprocess_images(images), training=False)
        outputs = {
            key: tf.cast(
                outputs[key],
                tf.int32 if key in ("classes", "num_detections") else tf.float32,
            )
            for key in DETECTION_OUTPUTS
        }
        # Padding rows (class 0) have all-zero masks in Keras because
        # PANet picks the class mask with `one_hot(classes - 1)`, and
        # TensorFlow's one-hot of -1 is all zeros; ONNX's OneHot wraps a
        # negative index to the last class instead, which would give padding
        # rows the last class's mask. Zero them explicitly.
        outputs["masks"] = tf.where(
            outputs["classes"][:, :, None, None] > 0, outputs["masks"], 0.0
        )
        return outputs

    return tf.function(
        detect,
        input_signature=[tf.TensorSpec([batch_size, *size, 3], tf.uint8, name=IMAGES)],
        autograph=False,
    )
