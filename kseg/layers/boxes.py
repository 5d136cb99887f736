"""Box geometry of the PANet system: box coding, clipping, IoU, the smallest
box kept and the FPN level of a box, as `docs/SPEC.md` ("The PANet
system") defines them. What Keras maintains is used where it matches SPEC:
`keras.utils.bounding_boxes` (`encode_box_to_deltas`,
`decode_deltas_to_boxes`, `compute_iou`)."""

import math

import keras
import numpy as np
from keras import ops

# dh, dw are clipped here before exp (Detectron2's `_DEFAULT_SCALE_CLAMP`).
BOX_DELTA_CLIP = math.log(1000.0 / 16)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

# === Box coding ===


def encode_boxes(boxes, anchors, weights):
    """Deltas `(dy, dx, dh, dw)` of `boxes` relative to `anchors`.

    `dy = wy · (cy − cy_a) / h_a`, `dh = wh · log(h / h_a)` (same for x, w),
    on `[y1, x1, y2, x2]` boxes. This is
    `keras.utils.bounding_boxes.encode_box_to_deltas` with
    `variance = 1 / weights`. Computed in float32.

    Args:
        boxes: `(..., 4)` target boxes.
        anchors: `(..., 4)` reference boxes, broadcastable to `boxes`.
        weights: 4 floats `(wy, wx, wh, ww)`.

    Returns:
        `(..., 4)` float32 deltas.
    """
    return keras.utils.bounding_boxes.encode_box_to_deltas(
        ops.cast(anchors, "float32"),
        ops.cast(boxes, "float32"),
        anchor_format="yxyx",
        box_format="yxyx",
        variance=[1.0 / w for w in weights],
    )


def decode_boxes(deltas, anchors, weights, clip=BOX_DELTA_CLIP):
    """Inverse of `encode_boxes`, with `dh / wh` and `dw / ww` clipped at
    `clip` (`log(1000 / 16)`) before the exponential.

    `keras.utils.bounding_boxes.decode_deltas_to_boxes` does not clip, so the
    clip is applied to the deltas first.

    Args:
        deltas: `(..., 4)` deltas.
        anchors: `(..., 4)` reference boxes `[y1, x1, y2, x2]`.
        weights: 4 floats `(wy, wx, wh, ww)`.
        clip: float. Largest `dh / wh`, `dw / ww`.

    Returns:
        `(..., 4)` float32 boxes `[y1, x1, y2, x2]`.
    """
    deltas = ops.cast(deltas, "float32")
    limit = np.array([np.inf, np.inf, clip * weights[2], clip * weights[3]], "float32")
    deltas = ops.minimum(deltas, limit)
    anchors = ops.cast(anchors, "float32")
    anchors = ops.broadcast_to(anchors, ops.shape(deltas))
    return keras.utils.bounding_boxes.decode_deltas_to_boxes(
        anchors,
        deltas,
        anchor_format="yxyx",
        box_format="yxyx",
        variance=[1.0 / w for w in weights],
    )


def clip_boxes(boxes, height, width):
    """Clips `[y1, x1, y2, x2]` boxes to the image `[0, height] × [0, width]`.

    `keras.utils.bounding_boxes.clip_to_image_size` also rewrites the labels
    of boxes it empties and takes a dict; only the clip is wanted here.
    """
    limit = ops.convert_to_tensor([height, width, height, width], "float32")
    return ops.minimum(ops.maximum(ops.cast(boxes, "float32"), 0.0), limit)


def large_enough(boxes, min_size):
    """Whether both sides of `[y1, x1, y2, x2]` boxes are at least `min_size`
    (torchvision's `remove_small_boxes`)."""
    return ops.logical_and(
        boxes[..., 2] - boxes[..., 0] >= min_size,
        boxes[..., 3] - boxes[..., 1] >= min_size,
    )


def pairwise_iou(boxes1, boxes2):
    """IoU `(B, M, N)` of `(B, M, 4)` and `(B, N, 4)` `[y1, x1, y2, x2]` boxes
    (`keras.utils.bounding_boxes.compute_iou`; empty boxes give 0)."""
    return keras.utils.bounding_boxes.compute_iou(
        ops.cast(boxes1, "float32"), ops.cast(boxes2, "float32"), "yxyx"
    )


def fpn_levels(
    boxes, min_level=2, max_level=5, canonical_size=224.0, canonical_level=4
):
    """FPN level of each box: `clip(floor(4 + log2(sqrt(wh) / 224)), 2, 5)`
    (Lin et al. eq. 1, Detectron2's `assign_boxes_to_levels`, eps 1e-8)."""
    boxes = ops.cast(boxes, "float32")
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    scale = ops.sqrt(ops.maximum(area, 0.0))
    level = ops.floor(canonical_level + ops.log2(scale / canonical_size + 1e-8))
    return ops.cast(ops.clip(level, min_level, max_level), "int32")
