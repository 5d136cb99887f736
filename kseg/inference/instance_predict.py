"""Instance segmentation on images of any size: `predict_instances`.

An instance model (PANet) takes a fixed input size. Each image is fitted into
it as the evaluation pipeline fits it (`kseg.data.instance_eval_transform`:
resize so the whole image fits, optionally to a given shorter edge, then zero
padding below and right), the model runs, and its detections go back to the
image: boxes divided by the resize scale and clipped to the image, the 28 × 28
mask probabilities pasted inside the boxes at image resolution
(`kseg.data.instance_transform.paste_mask_crops`: each mask held inside its
box, so memory grows with the boxes, not detections × H × W) — what
`detections_to_coco` does for the COCO evaluation.

An exported PANet SavedModel (`kseg.export`) does the fitting and the box
mapping in its graph; `open_model` wraps it as a
`kseg.inference.sources.InstanceSavedModel`, which `predict_instances` runs
the same way. A PANet `.tflite` file
(`kseg.export.tflite.TFLiteInstanceSegmenter`) or `.onnx` file
(`kseg.export.onnx.ONNXInstanceSegmenter`) takes uint8 images of its fixed
size only: it gets the fitted images, rounded to uint8, like a Keras model.
"""

from typing import NamedTuple

import numpy as np
from keras import ops

from kseg.data.instance_transform import (
    as_pasted_masks,
    boxes_to_image,
    paste_mask_crops,
)
from kseg.inference.defaults import DEFAULT_SCORE_THRESHOLD
from kseg.inference.sources import InstanceSavedModel, as_model
from kseg.tasks import is_instance_model

DEFAULT_BATCH_SIZE = 4


class Instances(NamedTuple):
    """The detections of one image, best score first.

    Attributes:
        boxes: float32 `(D, 4)` `[y1, x1, y2, x2]` in image pixels (pixel
            (i, j) covers `[i, i + 1) × [j, j + 1)`), clipped to the image.
        scores: float32 `(D,)`, descending.
        classes: int32 `(D,)` classes in 1..C.
        masks: bool `(D, H, W)` at the image's size: from
            `predict_instances` a `kseg.data.instance_transform.PastedMasks`
            (each mask held inside its box; `masks[k]` is a full plane,
            `np.asarray(masks)` all of them).
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: np.ndarray

    def instance_map(self):
        """uint16 `(H, W)`: 0 where no instance is, else i for the i-th
        detection (1-based) — the best-scoring one where masks overlap."""
        height, width = self.masks.shape[1:]
        result = np.zeros((height, width), np.uint16)
        masks = as_pasted_masks(self.masks)
        # One mask inside its box at a time.
        for index in range(len(masks) - 1, -1, -1):
            top, left, crop = masks.crop(index)
            window = result[top : top + crop.shape[0], left : left + crop.shape[1]]
            window[crop] = index + 1
        return result


def _is_exported_file(model):
    """Whether `model` runs an exported `.tflite` or `.onnx` PANet file
    (uint8 images of its fixed size)."""
    from kseg.export.onnx import ONNXInstanceSegmenter
    from kseg.export.tflite import TFLiteInstanceSegmenter

    return isinstance(model, (TFLiteInstanceSegmenter, ONNXInstanceSegmenter))


def model_input_size(model):
    """The fixed `(H, W)` of an instance model's input."""
    if _is_exported_file(model):
        return tuple(model.input_size)
    size = tuple(model.input_shape[1:3])
    if None in size:
        raise ValueError(
            f"an instance model takes a fixed input size, this one takes {size}"
        )
    return size


def _fitted(model, images, short_edge, max_size, batch_size):
    """The model's raw detections of each image, boxes in image pixels."""
    import tensorflow as tf

    from kseg.data import instance_eval_transform

    size = model_input_size(model)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs, scales = zip(
            *(
                instance_eval_transform(
                    tf.constant(image), size, short_edge=short_edge, max_size=max_size
                )
                for image in chunk
            ),
            strict=True,
        )
        inputs = np.stack([np.asarray(x) for x in inputs])
        if _is_exported_file(model):
            outputs = model(np.clip(np.round(inputs), 0, 255).astype(np.uint8))
        else:
            outputs = model(inputs, training=False)
        outputs = {key: np.asarray(value) for key, value in outputs.items()}
        for b, (image, scale) in enumerate(zip(chunk, scales, strict=True)):
            count = int(outputs["num_detections"][b])
            height, width = image.shape[:2]
            boxes = outputs["boxes"][b, :count].astype(np.float64)
            boxes = ops.convert_to_numpy(
                boxes_to_image(boxes, np.asarray(scale, np.float64), height, width)
            )
            results.append(
                {
                    "boxes": boxes,
                    "scores": outputs["scores"][b, :count],
                    "classes": outputs["classes"][b, :count],
                    "masks": outputs["masks"][b, :count],
                }
            )
    return results


def _select(
    detections, image_shape, score_threshold, max_detections, mask_threshold, style
):
    height, width = image_shape
    scores = np.asarray(detections["scores"], np.float32)
    classes = np.asarray(detections["classes"], np.int32)
    keep = np.flatnonzero((classes >= 1) & (scores >= score_threshold))
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if max_detections is not None:
        keep = keep[:max_detections]
    boxes = np.asarray(detections["boxes"], np.float64)[keep]
    masks = np.asarray(detections["masks"], np.float32)[keep]
    return Instances(
        boxes=boxes.astype(np.float32),
        scores=scores[keep],
        classes=classes[keep],
        masks=paste_mask_crops(
            masks, boxes.reshape(-1, 4), height, width, mask_threshold, style
        ),
    )


def predict_instances(
    model,
    images,
    score_threshold=DEFAULT_SCORE_THRESHOLD,
    max_detections=None,
    *,
    short_edge=None,
    max_size=None,
    mask_threshold=0.5,
    batch_size=DEFAULT_BATCH_SIZE,
):
    """Detects and segments the instances of images of any size.

    Example:

    >>> results = predict_instances(model, [image])  # doctest: +SKIP
    >>> results[0].masks.shape  # (D, H, W) bool, H, W = image.shape[:2]

    Args:
        model: a Keras instance model (PANet: fixed input size, RGB 0–255,
            returns `boxes`, `scores`, `classes`, `masks`, `num_detections`)
            or an exported PANet (`open_model` of a SavedModel:
            `InstanceSavedModel`, of a `.tflite` file:
            `TFLiteInstanceSegmenter`, of a `.onnx` file:
            `ONNXInstanceSegmenter`), or what `open_model` returns.
        images: uint8 RGB images `(H, W, 3)` (a list; sizes may differ) or
            an array `(N, H, W, 3)`.
        score_threshold: float. Detections scoring less are left out.
            Defaults to 0.5, a threshold for showing detections; pass 0 (the
            model's own threshold, 0.05 for PANet, then applies) for COCO
            evaluation, whose AP counts low-scoring detections too.
        max_detections: int or None. The most detections kept per image,
            best first; None keeps all the model returns. Defaults to None.
        short_edge, max_size: the evaluation resize (`eval.short_edge`,
            `data.max_size` of a recipe); None fits each image into the
            model's input without enlarging it. Keras models, `.tflite` and
            `.onnx` files only (a SavedModel holds its own). Default to None.
        mask_threshold: float. Threshold of the pasted mask probabilities.
            Defaults to 0.5. A Keras model built with `mask_paste=
            "torchvision"` (`kseg.models.from_torchvision`) has its masks
            pasted as torchvision pastes them.
        batch_size: int. Images per model call. Defaults to 4.

    Returns:
        list of `Instances`, one per image (empty arrays where nothing was
        found).
    """
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"max_detections must be positive, got {max_detections}")
    model = as_model(model)
    images = [_check_image(image) for image in images]
    if isinstance(model, InstanceSavedModel):
        raw = [model.detect(image) for image in images]
    else:
        if not is_instance_model(model):
            raise ValueError(
                "predict_instances needs an instance segmentation model (a "
                "kseg.models.InstanceSegmenter such as PANet, or its export)"
            )
        raw = _fitted(model, images, short_edge, max_size, batch_size)
    # A model converted from torchvision pastes its masks as torchvision does.
    style = getattr(model, "mask_paste", "kseg")
    return [
        _select(detections, image.shape[:2], score_threshold, max_detections,
                mask_threshold, style)
        for detections, image in zip(raw, images, strict=True)
    ]  # fmt: skip


def _check_image(image):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"images must be RGB (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image
