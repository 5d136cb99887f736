"""Padded, batched, class-aware non-maximum suppression (SPEC's rules)."""

import keras
import numpy as np
from keras import ops

from kseg.layers.common import KsegLayer, check_positive_int


def detections_spec(batch, count, **extra):
    """The `KerasTensor`s of padded detections: `boxes (batch, count, 4)`,
    `scores`, `classes` int32, `num_detections (batch,)`, and `extra`
    entries as `name=(shape after the batch axis, dtype)`."""
    spec = {
        "boxes": keras.KerasTensor((batch, count, 4), "float32"),
        "scores": keras.KerasTensor((batch, count), "float32"),
        "classes": keras.KerasTensor((batch, count), "int32"),
        "num_detections": keras.KerasTensor((batch,), "int32"),
    }
    for name, (shape, dtype) in extra.items():
        spec[name] = keras.KerasTensor((batch, *shape), dtype)
    return spec


def _iou(boxes1, boxes2):
    """IoU `(B, M, N)` of `(B, M, 4)` and `(B, N, 4)` boxes; 0 where the
    union is empty (padding rows are all-zero boxes)."""
    y1 = ops.maximum(boxes1[:, :, None, 0], boxes2[:, None, :, 0])
    x1 = ops.maximum(boxes1[:, :, None, 1], boxes2[:, None, :, 1])
    y2 = ops.minimum(boxes1[:, :, None, 2], boxes2[:, None, :, 2])
    x2 = ops.minimum(boxes1[:, :, None, 3], boxes2[:, None, :, 3])
    inter = ops.maximum(y2 - y1, 0.0) * ops.maximum(x2 - x1, 0.0)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    union = area1[:, :, None] + area2[:, None, :] - inter
    return ops.where(union > 0.0, inter / ops.where(union > 0.0, union, 1.0), 0.0)


class PaddedNMS:
    """Exact greedy NMS of boxes already in order, with static shapes: what
    `BatchedNMS` runs (keras-hub's padded NMS, which it replaces, keeps other
    boxes than the greedy NMS when traced in a `tf.function`).

    Called on `(boxes (B, N, 4), class_prediction (B, N, 1))` where the
    second holds rank scores (`N − position` for candidates, 0 for the rest,
    as `BatchedNMS` makes them), it keeps, in order, each candidate whose IoU
    with every kept box is at most `iou_threshold`, until `max_detections`
    are kept, and returns `{"confidence": the kept rank scores (B, D),
    "num_detections": (B,)}`, the shape of keras-hub's NMS outputs that the
    export swaps (`kseg.export.instance_graph`) also return.

    Tiles of `tile_size` boxes go one after the other: a tile's candidates
    are first suppressed by the boxes kept so far (at most `D`, held in a
    buffer), then among themselves by iterating `keep[i] = candidate[i] and
    no kept j < i overlaps i` to its fixed point, which is the greedy answer
    (position i is final after i + 1 iterations, and the fixed point is
    unique). The loop stops when every image has `D` boxes.
    """

    # Runs on a batch of unknown size as it is.
    any_batch = True

    def __init__(self, iou_threshold, max_detections, tile_size=512):
        self.iou_threshold = float(iou_threshold)
        self.max_detections = int(max_detections)
        self.tile_size = int(tile_size)

    def __call__(self, boxes, class_prediction):
        rank = class_prediction[..., 0]
        count = boxes.shape[1]
        tile = min(self.tile_size, count)
        tiles = -(-count // tile)
        pad = tiles * tile - count
        boxes = ops.pad(ops.cast(boxes, "float32"), [[0, 0], [0, pad], [0, 0]])
        rank = ops.pad(ops.cast(rank, "float32"), [[0, 0], [0, pad]])
        batch = ops.shape(boxes)[0]
        d = self.max_detections
        threshold = self.iou_threshold
        upper = np.triu(np.ones((tile, tile), bool), k=1)

        def body(k, kept, buffer, scores):
            start = k * tile
            tile_boxes = ops.slice(boxes, [0, start, 0], [batch, tile, 4])
            tile_rank = ops.slice(rank, [0, start], [batch, tile])
            candidate = tile_rank > 0.0
            # Suppressed by a box kept in an earlier tile.
            earlier = ops.any(_iou(tile_boxes, buffer) > threshold, axis=2)
            candidate = ops.logical_and(candidate, ops.logical_not(earlier))
            # Greedy inside the tile: box j < i suppresses i if j is kept.
            overlaps = ops.logical_and(_iou(tile_boxes, tile_boxes) > threshold, upper)
            overlaps = ops.cast(overlaps, "float32")

            def step(keep, _changed):
                suppressed = ops.max(overlaps * ops.cast(keep, "float32")[..., None], 1)
                new = ops.logical_and(candidate, suppressed < 0.5)
                return new, ops.any(ops.not_equal(new, keep))

            keep, _ = ops.while_loop(
                lambda keep, changed: changed,
                step,
                (candidate, ops.convert_to_tensor(True)),
                maximum_iterations=tile,
            )
            # Append the kept boxes (in order) to the buffer, up to D.
            slot = kept[:, None] + ops.cumsum(ops.cast(keep, "int32"), axis=1) - 1
            place = ops.one_hot(slot, d) * ops.cast(keep, "float32")[..., None]
            buffer = buffer + ops.einsum("btd,btc->bdc", place, tile_boxes)
            scores = scores + ops.einsum("btd,bt->bd", place, tile_rank)
            kept = ops.minimum(kept + ops.sum(ops.cast(keep, "int32"), axis=1), d)
            return k + 1, kept, buffer, scores

        _, kept, _, scores = ops.while_loop(
            lambda k, kept, buffer, scores: ops.logical_and(
                k < tiles, ops.min(kept) < d
            ),
            body,
            (
                ops.convert_to_tensor(0),
                ops.zeros((batch,), "int32"),
                ops.zeros((batch, d, 4), "float32"),
                ops.zeros((batch, d), "float32"),
            ),
        )
        return {"confidence": scores, "num_detections": kept}


@keras.saving.register_keras_serializable(package="kseg")
class BatchedNMS(KsegLayer):
    """Padded, batched, class-aware non-maximum suppression.

    Greedy NMS per image, with torchvision's and Detectron2's rules (SPEC):
    boxes are taken by decreasing score, on tied scores the lower index
    first; a box whose IoU with an already kept box of the same class is
    greater than `iou_threshold` is dropped (equal is kept); boxes with
    `score <= score_threshold` never count; at most `max_detections` are
    kept, padded with zeros.

    Classes are kept apart for the suppression as in torchvision's
    `batched_nms`: each box is shifted by `class · (max coordinate + 1)`, so
    boxes of different classes never overlap and one NMS runs over all of
    them. What the NMS keeps is carried by index: the returned boxes, scores
    and classes are the inputs' own values, never decoded from the shifted
    coordinates. The candidates are put in the order above first (`top_k`,
    which keeps the lower index first on ties) and the NMS sees their rank as
    the score (`N − position`, exact in float32 for fewer than 2²⁴ boxes), so
    any greedy NMS that keeps boxes by decreasing score gives the same kept
    set, and the rank it returns is the index. The NMS itself is
    `PaddedNMS` (exact greedy, static shapes, `keras.ops` loops: XLA and
    every backend). Computed in float32.

    Example:
    >>> nms = BatchedNMS(iou_threshold=0.5, max_detections=2)
    >>> boxes = np.array([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]])
    >>> out = nms([boxes, np.array([[0.9, 0.8, 0.7]])])
    >>> ops.convert_to_numpy(out["scores"])
    array([[0.9, 0.7]], dtype=float32)

    Args:
        iou_threshold: float. A box with a greater IoU with a kept box is
            suppressed. Defaults to `0.5`.
        max_detections: int. Boxes kept per image. Defaults to `100`.
        score_threshold: float. Boxes scoring at most this are dropped.
            Defaults to `0.0`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[boxes (batch, N, 4), scores (batch, N)]` or, class-aware,
        `[boxes, scores, classes (batch, N) ints]`; boxes
        `[y1, x1, y2, x2]` with non-negative coordinates, `N < 2²⁴`.

    Output shape:
        Dict `boxes (batch, D, 4)`, `scores (batch, D)`, `classes (batch, D)`
        int32, `valid (batch, D)` bool, `num_detections (batch,)` int32, with
        `D = max_detections`; padding rows are zero (`classes` 0).
    """

    def __init__(
        self, iou_threshold=0.5, max_detections=100, score_threshold=0.0, **kwargs
    ):
        super().__init__(autocast=False, **kwargs)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = check_positive_int(max_detections, "max_detections")
        self.score_threshold = float(score_threshold)

    def build(self, input_shape):
        count = input_shape[1][-1]
        if count is not None and count >= 2**24:
            raise ValueError(
                f"{self.name}: {count} boxes per image; BatchedNMS ranks them in "
                "float32 and takes fewer than 2**24"
            )
        self.nms = PaddedNMS(self.iou_threshold, self.max_detections)

    def call(self, inputs):
        boxes = ops.cast(inputs[0], "float32")
        scores = ops.cast(inputs[1], "float32")
        count = boxes.shape[1]
        candidate = scores > self.score_threshold
        # Decreasing score, lower index first on ties (top_k's order).
        _, order = ops.top_k(ops.where(candidate, scores, -np.inf), count)
        candidate = ops.take_along_axis(candidate, order, axis=1)
        rank = ops.where(
            candidate, float(count) - ops.arange(count, dtype="float32"), 0.0
        )
        shifted = boxes
        if len(inputs) > 2:
            classes = ops.cast(inputs[2], "int32")
            # Every coordinate of an image lies in [0, offset - 1], so a
            # shifted box of class c lies in [c · offset, (c + 1) · offset - 1].
            offset = ops.max(boxes) + 1.0
            shifted = boxes + ops.cast(classes, "float32")[..., None] * offset
        else:
            classes = ops.zeros(ops.shape(scores), "int32")
        shifted = ops.take_along_axis(shifted, order[..., None], axis=1)
        # Boxes that are no candidates are zeroed: never kept, never suppress.
        shifted = ops.where(candidate[..., None], shifted, 0.0)
        confidence, kept = self._select(shifted, rank)
        kept = ops.cast(kept, "int32")
        valid = ops.arange(self.max_detections)[None, :] < kept[:, None]
        position = ops.cast(float(count) - confidence, "int32")
        position = ops.where(valid, ops.clip(position, 0, count - 1), 0)
        index = ops.take_along_axis(order, position, axis=1)
        return {
            "boxes": ops.where(
                valid[..., None],
                ops.take_along_axis(boxes, index[..., None], axis=1),
                0.0,
            ),
            "scores": ops.where(valid, ops.take_along_axis(scores, index, axis=1), 0.0),
            "classes": ops.where(valid, ops.take_along_axis(classes, index, axis=1), 0),
            "valid": valid,
            "num_detections": kept,
        }

    def _select(self, boxes, rank):
        """The NMS on ranked candidates: `(confidence (B, D), kept (B,))`.
        An NMS that needs a static batch size (TFLite's, swapped in at
        export) runs image by image when the batch size is unknown (a Keras
        `fit` or `predict` on arrays, whose last batch may be smaller)."""
        if boxes.shape[0] is None and not getattr(self.nms, "any_batch", False):

            def one_image(inputs):
                out = self.nms(inputs[0][None], inputs[1][None, :, None])
                return out["confidence"][0], out["num_detections"][0]

            return ops.map(one_image, (boxes, rank))
        out = self.nms(boxes, rank[..., None])
        return out["confidence"], out["num_detections"]

    def compute_output_spec(self, inputs):
        d = self.max_detections
        return detections_spec(inputs[0].shape[0], d, valid=((d,), "bool"))

    def get_config(self):
        return {
            **super().get_config(),
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "score_threshold": self.score_threshold,
        }
