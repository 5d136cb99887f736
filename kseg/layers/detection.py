"""Detection layers of the PANet system (Mask R-CNN + FPN with PANet's parts).

The feature pyramid, anchors, region proposal network, box coding, padded
non-maximum suppression, the detection layer and the box / mask heads, as
`../shared/SPEC.md` ("The PANet system") defines them. Every shape is static
(proposals and detections are padded to fixed counts with a validity mask),
so the layers compile with XLA and run on every Keras backend.

What Keras maintains is used where it matches the SPEC definitions:
`keras.utils.bounding_boxes` (`encode_box_to_deltas`,
`decode_deltas_to_boxes`, `compute_iou`) and keras-hub's
`NonMaxSuppression` and `BoxMatcher` (imported when a layer is built, because
importing keras-hub imports TensorFlow, and `kseg.layers` must import on JAX
without it). The NumPy-reference tests in `tests/layers/test_detection.py`
prove the equality.

Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018;
He et al., "Mask R-CNN", ICCV 2017; Lin et al., "Feature Pyramid Networks for
Object Detection", CVPR 2017.
"""

import itertools
import math

import keras
import numpy as np
from keras import ops

from kseg.layers.common import KsegLayer, check_choice, check_positive_int
from kseg.layers.panet import AdaptiveFeaturePooling, RoIAlign

# dh, dw are clipped here before exp (Detectron2's `_DEFAULT_SCALE_CLAMP`).
BOX_DELTA_CLIP = math.log(1000.0 / 16)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
NORMALIZATIONS = (None, "batch", "sync_batch")
# Multiply-adds of a batched matrix product that cost as much as gathering one
# value (TensorFlow, CPU): `PyramidRoIAlign` picks its form per level by it.
GATHER_COST = 60

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


def _normalization_layer(normalization, name, dtype):
    return keras.layers.BatchNormalization(
        synchronized=normalization == "sync_batch", dtype=dtype, name=name
    )


def _check_normalization(normalization):
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
    if normalization == "sync_batch" and keras.backend.backend() != "tensorflow":
        raise ValueError(
            "normalization='sync_batch' needs the TensorFlow backend, the backend "
            f"is {keras.backend.backend()!r}"
        )
    return normalization


def _conv_and_norm(owner, filters, kernel_size, name, normalization, **kwargs):
    """A same-padded conv (bias only without BN) and its BN layer (or `None`)."""
    conv = keras.layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        use_bias=normalization is None,
        dtype=owner.dtype_policy,
        name=name,
        **kwargs,
    )
    norm = None
    if normalization is not None:
        norm = _normalization_layer(normalization, f"{name}_bn", owner.dtype_policy)
    return conv, norm


def _build_unit(layer, norm, shape):
    layer.build(shape)
    shape = layer.compute_output_shape(shape)
    if norm is not None:
        norm.build(shape)
    return shape


def _apply_unit(layer, norm, x, training, relu=True):
    x = layer(x)
    if norm is not None:
        x = norm(x, training=training)
    return ops.relu(x) if relu else x


# === Feature pyramid ===


@keras.saving.register_keras_serializable(package="kseg")
class FeaturePyramid(KsegLayer):
    """Feature pyramid network: `[C2, .., C5]` → `[P2, .., P6]`.

    FPN (Lin et al. 2017) as the PANet system uses it: a lateral 1×1 conv
    per level, a top-down path adding the coarser level upsampled ×2 by
    nearest neighbour, a 3×3 output conv per level, all with `filters`
    channels; `P6` is a max pool of `P5` with a 1×1 window and stride 2
    (every other pixel), used by the RPN only. No activations.

    Example:
    >>> fpn = FeaturePyramid(filters=8)
    >>> c = [np.zeros((1, 16 // 2**i, 16 // 2**i, 4)) for i in range(4)]
    >>> [tuple(p.shape) for p in fpn(c)]
    [(1, 16, 16, 8), (1, 8, 8, 8), (1, 4, 4, 8), (1, 2, 2, 8), (1, 1, 1, 8)]

    Args:
        filters: int. Channels of every level. Defaults to `256`.
        normalization: `None`, `"batch"` or `"sync_batch"` (PANet's MBN):
            batch normalization after every conv. Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List of 4 4D tensors `(batch, H_i, W_i, C_i)`, finest first, each
        level `ceil` half the size of the previous one.

    Output shape:
        List of 5 4D tensors `(batch, H_i, W_i, filters)`, the fifth (`P6`)
        `ceil` half the size of `P5`.
    """

    def __init__(self, filters=256, normalization=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = check_positive_int(filters, "filters")
        self.normalization = _check_normalization(normalization)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 4:
            raise ValueError(
                f"{self.name} expects the list [C2, C3, C4, C5], got {input_shape}"
            )
        self.lateral_convs, self.lateral_norms = [], []
        self.output_convs, self.output_norms = [], []
        for i, shape in enumerate(input_shape):
            conv, norm = _conv_and_norm(
                self, self.filters, 1, f"lateral_{i + 2}", self.normalization
            )
            out_shape = _build_unit(conv, norm, shape)
            self.lateral_convs.append(conv)
            self.lateral_norms.append(norm)
            conv, norm = _conv_and_norm(
                self, self.filters, 3, f"output_{i + 2}", self.normalization
            )
            _build_unit(conv, norm, out_shape)
            self.output_convs.append(conv)
            self.output_norms.append(norm)

    def call(self, inputs, training=None):
        laterals = [
            _apply_unit(conv, norm, x, training, relu=False)
            for conv, norm, x in zip(
                self.lateral_convs, self.lateral_norms, inputs, strict=True
            )
        ]
        top_down = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            coarse = top_down[0]
            up = ops.repeat(ops.repeat(coarse, 2, axis=1), 2, axis=2)
            # Slice to the lateral's size: a level of odd size has a coarser
            # level of ceil(size / 2).
            up = up[:, : ops.shape(lateral)[1], : ops.shape(lateral)[2], :]
            top_down.insert(0, lateral + up)
        outputs = [
            _apply_unit(conv, norm, x, training, relu=False)
            for conv, norm, x in zip(
                self.output_convs, self.output_norms, top_down, strict=True
            )
        ]
        outputs.append(outputs[-1][:, ::2, ::2, :])
        return outputs

    def compute_output_shape(self, input_shape):
        shapes = [(*shape[:3], self.filters) for shape in input_shape]
        last = shapes[-1]
        half = [None if s is None else math.ceil(s / 2) for s in last[1:3]]
        return shapes + [(last[0], *half, self.filters)]

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "normalization": self.normalization,
        }


# === Anchors and the RPN ===


@keras.saving.register_keras_serializable(package="kseg")
class AnchorGenerator(KsegLayer):
    """One anchor size per pyramid level, several aspect ratios.

    Anchors of size `s` and aspect ratio `r = h / w` have `h = s·√r`,
    `w = s / √r` (area `s²`), centred on `(i·stride, j·stride)` for every
    position `(i, j)` of the level (Detectron2 and torchvision, offset 0).
    Order: level, then row, column, aspect ratio — the order of the RPN
    head's flattened outputs. kseg's own: keras-hub's `AnchorGenerator`
    rounds the half-sizes to whole pixels (a 46×22 anchor for size 32 and
    ratio 0.5, not 45.25×22.63), which SPEC does not. The anchors depend
    only on the static image size, so they are NumPy constants.

    Example:
    >>> layer = AnchorGenerator(sizes=(8,), strides=(8,), aspect_ratios=(1.0,))
    >>> ops.convert_to_numpy(layer(np.zeros((1, 16, 16, 3))))
    array([[-4., -4.,  4.,  4.],
           [-4.,  4.,  4., 12.],
           [ 4., -4., 12.,  4.],
           [ 4.,  4., 12., 12.]], dtype=float32)

    Args:
        sizes: floats, one per level. Defaults to `(32, 64, 128, 256, 512)`.
        strides: ints, one per level. Defaults to `(4, 8, 16, 32, 64)`.
        aspect_ratios: floats `h / w`. Defaults to `(0.5, 1.0, 2.0)`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        Images `(batch, H, W, C)` with static `H` and `W`.

    Output shape:
        `(K, 4)` float32 anchors `[y1, x1, y2, x2]` in image pixels,
        `K = Σ ceil(H / stride)·ceil(W / stride)·len(aspect_ratios)`.
    """

    def __init__(
        self,
        sizes=(32, 64, 128, 256, 512),
        strides=(4, 8, 16, 32, 64),
        aspect_ratios=(0.5, 1.0, 2.0),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sizes = tuple(float(s) for s in sizes)
        self.strides = tuple(int(s) for s in strides)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        if len(self.sizes) != len(self.strides):
            raise ValueError(
                f"sizes and strides need one entry per level, got {sizes} and {strides}"
            )
        if min(self.sizes + self.aspect_ratios) <= 0 or min(self.strides) < 1:
            raise ValueError("sizes, strides and aspect_ratios must be positive")

    @property
    def num_anchors(self):
        """Anchors per position."""
        return len(self.aspect_ratios)

    def level_shapes(self, image_size):
        """`[(H_l, W_l), ...]`: the feature size of every level."""
        height, width = image_size
        return [(math.ceil(height / s), math.ceil(width / s)) for s in self.strides]

    def anchors(self, image_size):
        """The `(K, 4)` float32 NumPy anchors for a static `(H, W)`, computed
        once per size (proposals and training targets share them)."""
        image_size = tuple(int(s) for s in image_size)
        cache = self.__dict__.setdefault("_anchor_cache", {})
        if image_size not in cache:
            cache[image_size] = self._compute_anchors(image_size)
        return cache[image_size]

    def _compute_anchors(self, image_size):
        ratios = np.asarray(self.aspect_ratios, "float64")
        levels = []
        for size, stride, (h, w) in zip(
            self.sizes, self.strides, self.level_shapes(image_size), strict=True
        ):
            half_h = size * np.sqrt(ratios) / 2
            half_w = size / np.sqrt(ratios) / 2
            base = np.stack([-half_h, -half_w, half_h, half_w], axis=-1)
            cy, cx = np.meshgrid(
                np.arange(h) * stride, np.arange(w) * stride, indexing="ij"
            )
            shifts = np.stack([cy, cx, cy, cx], axis=-1).reshape(-1, 1, 4)
            levels.append((shifts + base[None]).reshape(-1, 4))
        return np.concatenate(levels).astype("float32")

    def call(self, images):
        size = tuple(images.shape[1:3])
        if None in size:
            raise ValueError(
                f"{self.name} needs a static image size, got {images.shape}"
            )
        return ops.convert_to_tensor(self.anchors(size), "float32")

    def compute_output_shape(self, input_shape):
        count = sum(h * w for h, w in self.level_shapes(input_shape[1:3]))
        return (count * self.num_anchors, 4)

    def compute_output_spec(self, images):
        return keras.KerasTensor(self.compute_output_shape(images.shape), "float32")

    def get_config(self):
        return {
            **super().get_config(),
            "sizes": self.sizes,
            "strides": self.strides,
            "aspect_ratios": self.aspect_ratios,
        }


@keras.saving.register_keras_serializable(package="kseg")
class RPNHead(KsegLayer):
    """Region proposal network head, shared by every pyramid level.

    A 3×3 conv (`filters`, ReLU) then two 1×1 convs: `num_anchors`
    objectness logits and `4·num_anchors` box deltas per position
    (Mask R-CNN / FPN). Weights initialized from N(0, 0.01²), biases 0
    (Detectron2). The outputs of all levels are flattened in
    `AnchorGenerator`'s order (level, row, column, anchor) and concatenated.

    Example:
    >>> head = RPNHead(num_anchors=3, filters=8)
    >>> logits, deltas = head([np.zeros((2, 4, 4, 8)), np.zeros((2, 2, 2, 8))])
    >>> tuple(logits.shape), tuple(deltas.shape)
    ((2, 60), (2, 60, 4))

    Args:
        num_anchors: int. Anchors per position. Defaults to `3`.
        filters: int. Channels of the shared conv. Defaults to `256`.
        normalization: `None`, `"batch"` or `"sync_batch"`: batch
            normalization after the shared conv. Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List of 4D tensors `(batch, H_l, W_l, C)` (P2..P6).

    Output shape:
        `[objectness (batch, K), deltas (batch, K, 4)]`, float32,
        `K = Σ H_l·W_l·num_anchors`.
    """

    def __init__(self, num_anchors=3, filters=256, normalization=None, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = check_positive_int(num_anchors, "num_anchors")
        self.filters = check_positive_int(filters, "filters")
        self.normalization = _check_normalization(normalization)

    def build(self, input_shape):
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv, self.conv_norm = _conv_and_norm(
            self, self.filters, 3, "conv", self.normalization, kernel_initializer=init
        )
        shape = _build_unit(self.conv, self.conv_norm, input_shape[0])
        self.objectness = keras.layers.Conv2D(
            self.num_anchors,
            1,
            kernel_initializer=init,
            dtype=self.dtype_policy,
            name="objectness",
        )
        self.objectness.build(shape)
        self.deltas = keras.layers.Conv2D(
            4 * self.num_anchors,
            1,
            kernel_initializer=init,
            dtype=self.dtype_policy,
            name="deltas",
        )
        self.deltas.build(shape)

    def call(self, inputs, training=None):
        logits, deltas = [], []
        for x in inputs:
            x = _apply_unit(self.conv, self.conv_norm, x, training)
            batch = ops.shape(x)[0]
            logits.append(ops.reshape(self.objectness(x), (batch, -1)))
            deltas.append(ops.reshape(self.deltas(x), (batch, -1, 4)))
        return [
            ops.cast(ops.concatenate(logits, axis=1), "float32"),
            ops.cast(ops.concatenate(deltas, axis=1), "float32"),
        ]

    def compute_output_shape(self, input_shape):
        count = 0
        for shape in input_shape:
            if shape[1] is None or shape[2] is None:
                count = None
                break
            count += shape[1] * shape[2] * self.num_anchors
        return [(input_shape[0][0], count), (input_shape[0][0], count, 4)]

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape([x.shape for x in inputs])
        return [keras.KerasTensor(s, "float32") for s in shapes]

    def get_config(self):
        return {
            **super().get_config(),
            "num_anchors": self.num_anchors,
            "filters": self.filters,
            "normalization": self.normalization,
        }


# === Non-maximum suppression ===


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
    set, and the rank it returns is the index. The NMS itself is keras-hub's
    `NonMaxSuppression` (TensorFlow's padded NMS algorithm in `keras.ops`,
    XLA-friendly), which suppresses at an IoU equal to its threshold: it is
    given the next float32 above `iou_threshold`. Computed in float32.

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
        from keras_hub.layers import NonMaxSuppression

        count = input_shape[1][-1]
        if count is not None and count >= 2**24:
            raise ValueError(
                f"{self.name}: {count} boxes per image; BatchedNMS ranks them in "
                "float32 and takes fewer than 2**24"
            )
        # keras-hub suppresses at IoU >= its threshold: the next float32 above
        # ours suppresses exactly the IoUs greater than ours. Candidates carry
        # rank scores >= 1 and the rest 0, so 0.5 separates them.
        self.nms = NonMaxSuppression(
            bounding_box_format="yxyx",
            from_logits=False,
            iou_threshold=float(
                np.nextafter(np.float32(self.iou_threshold), np.float32(np.inf))
            ),
            confidence_threshold=0.5,
            max_detections=self.max_detections,
            dtype="float32",
        )

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
        keras-hub's NMS needs a static batch size; with an unknown one (a
        Keras `fit` or `predict` on arrays, whose last batch may be smaller)
        it runs image by image, unless the NMS in use takes any batch."""
        if boxes.shape[0] is None and not getattr(self.nms, "any_batch", False):

            def one_image(inputs):
                out = self.nms(inputs[0][None], inputs[1][None, :, None])
                return out["confidence"][0], out["num_detections"][0]

            return ops.map(one_image, (boxes, rank))
        out = self.nms(boxes, rank[..., None])
        return out["confidence"], out["num_detections"]

    def compute_output_spec(self, inputs):
        batch = inputs[0].shape[0]
        d = self.max_detections
        return {
            "boxes": keras.KerasTensor((batch, d, 4), "float32"),
            "scores": keras.KerasTensor((batch, d), "float32"),
            "classes": keras.KerasTensor((batch, d), "int32"),
            "valid": keras.KerasTensor((batch, d), "bool"),
            "num_detections": keras.KerasTensor((batch,), "int32"),
        }

    def get_config(self):
        return {
            **super().get_config(),
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "score_threshold": self.score_threshold,
        }


# === Proposals and detections ===


@keras.saving.register_keras_serializable(package="kseg")
class ProposalLayer(KsegLayer):
    """Region proposals from the RPN outputs: top-k per level, decode, clip,
    drop tiny boxes, NMS per image, keep the top boxes.

    Per level the `pre_nms_top_k` anchors with the highest objectness are
    decoded (weights `(1, 1, 1, 1)`, `dh, dw` clipped at `log(1000 / 16)`),
    clipped to the image, boxes with a side under `min_size` pixels are
    dropped, then one NMS at `iou_threshold` runs over all levels of an image
    (scores `sigmoid(objectness)`) and keeps the `post_nms_top_k` best. The
    counts differ in training (2000 / 1000) and inference (1000 / 1000).
    Proposals carry no gradient (as in Detectron2). Padding rows are zero,
    with `valid` false.

    Example:
    >>> layer = ProposalLayer(pre_nms_top_k_test=5, post_nms_top_k_test=4)
    >>> images = np.zeros((1, 64, 64, 3))
    >>> k = AnchorGenerator()(images).shape[0]
    >>> boxes, valid = layer([np.zeros((1, k)), np.zeros((1, k, 4)), images])
    >>> tuple(boxes.shape), tuple(valid.shape)
    ((1, 4, 4), (1, 4))

    Args:
        pre_nms_top_k_train: int. Anchors kept per level before NMS in
            training. Defaults to `2000`.
        post_nms_top_k_train: int. Proposals per image in training.
            Defaults to `1000`.
        pre_nms_top_k_test: int. Same at inference. Defaults to `1000`.
        post_nms_top_k_test: int. Same at inference. Defaults to `1000`.
        iou_threshold: float. NMS threshold. Defaults to `0.7`.
        min_size: float. Boxes with a side `< min_size` pixels are dropped.
            Defaults to `1e-3`.
        anchor_sizes, anchor_strides, aspect_ratios: the `AnchorGenerator`
            arguments. Default to SPEC's.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[objectness (batch, K), deltas (batch, K, 4), images (batch, H, W, C)]`
        with `K` anchors in `AnchorGenerator` order and a static image size.

    Output shape:
        `[proposals (batch, P, 4), valid (batch, P)]`: float32 boxes
        `[y1, x1, y2, x2]` in image pixels and a bool mask, `P` the
        post-NMS count of the mode.
    """

    def __init__(
        self,
        pre_nms_top_k_train=2000,
        post_nms_top_k_train=1000,
        pre_nms_top_k_test=1000,
        post_nms_top_k_test=1000,
        iou_threshold=0.7,
        min_size=1e-3,
        anchor_sizes=(32, 64, 128, 256, 512),
        anchor_strides=(4, 8, 16, 32, 64),
        aspect_ratios=(0.5, 1.0, 2.0),
        **kwargs,
    ):
        super().__init__(autocast=False, **kwargs)
        self.pre_nms_top_k_train = check_positive_int(
            pre_nms_top_k_train, "pre_nms_top_k_train"
        )
        self.post_nms_top_k_train = check_positive_int(
            post_nms_top_k_train, "post_nms_top_k_train"
        )
        self.pre_nms_top_k_test = check_positive_int(
            pre_nms_top_k_test, "pre_nms_top_k_test"
        )
        self.post_nms_top_k_test = check_positive_int(
            post_nms_top_k_test, "post_nms_top_k_test"
        )
        self.iou_threshold = float(iou_threshold)
        self.min_size = float(min_size)
        self.anchor_generator = AnchorGenerator(
            anchor_sizes, anchor_strides, aspect_ratios, name="anchors"
        )

    def build(self, input_shape):
        self.nms_train = BatchedNMS(
            self.iou_threshold, self.post_nms_top_k_train, name="nms_train"
        )
        self.nms_test = BatchedNMS(
            self.iou_threshold, self.post_nms_top_k_test, name="nms_test"
        )

    def call(self, inputs, training=None):
        logits, deltas, images = inputs
        logits = ops.cast(logits, "float32")
        deltas = ops.cast(deltas, "float32")
        height, width = images.shape[1:3]
        anchors = self.anchor_generator.anchors((height, width))
        pre_nms = self.pre_nms_top_k_train if training else self.pre_nms_top_k_test
        num_anchors = self.anchor_generator.num_anchors
        boxes, scores = [], []
        start = 0
        for h, w in self.anchor_generator.level_shapes((height, width)):
            stop = start + h * w * num_anchors
            level_logits, index = ops.top_k(
                logits[:, start:stop], min(pre_nms, stop - start)
            )
            level_deltas = ops.take_along_axis(
                deltas[:, start:stop], index[..., None], axis=1
            )
            level_anchors = ops.take(anchors[start:stop], index, axis=0)
            level_boxes = clip_boxes(
                decode_boxes(level_deltas, level_anchors, RPN_BOX_WEIGHTS),
                height,
                width,
            )
            big = large_enough(level_boxes, self.min_size)
            boxes.append(level_boxes)
            scores.append(ops.where(big, ops.sigmoid(level_logits), 0.0))
            start = stop
        nms = self.nms_train if training else self.nms_test
        kept = nms([ops.concatenate(boxes, axis=1), ops.concatenate(scores, axis=1)])
        return [ops.stop_gradient(kept["boxes"]), kept["valid"]]

    def compute_output_spec(self, inputs, training=None):
        batch = inputs[0].shape[0]
        count = self.post_nms_top_k_train if training else self.post_nms_top_k_test
        return [
            keras.KerasTensor((batch, count, 4), "float32"),
            keras.KerasTensor((batch, count), "bool"),
        ]

    def get_config(self):
        anchors = self.anchor_generator
        return {
            **super().get_config(),
            "pre_nms_top_k_train": self.pre_nms_top_k_train,
            "post_nms_top_k_train": self.post_nms_top_k_train,
            "pre_nms_top_k_test": self.pre_nms_top_k_test,
            "post_nms_top_k_test": self.post_nms_top_k_test,
            "iou_threshold": self.iou_threshold,
            "min_size": self.min_size,
            "anchor_sizes": anchors.sizes,
            "anchor_strides": anchors.strides,
            "aspect_ratios": anchors.aspect_ratios,
        }


@keras.saving.register_keras_serializable(package="kseg")
class DetectionLayer(KsegLayer):
    """Final detections from the box head: per-class decode, score threshold,
    class-aware NMS, top `max_detections` per image.

    Class probabilities are the softmax of the logits (class 0 is the
    background); every proposal is decoded once per class with that class's
    deltas (weights `(10, 10, 5, 5)`) and clipped to the image; candidates
    with probability `> score_threshold` and both sides at least `min_size`
    pixels (torchvision drops the boxes that clipping left under 1e-2 px)
    go through one class-aware NMS (`BatchedNMS`) at `iou_threshold`.
    Padding proposals (`valid` false) never score.

    Example:
    >>> layer = DetectionLayer(num_classes=2, max_detections=3)
    >>> logits = np.array([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]])
    >>> proposals = np.array([[[0, 0, 10, 10], [5, 5, 20, 20]]], "float32")
    >>> out = layer([logits, np.zeros((1, 2, 8)), proposals,
    ...              np.array([[True, True]]), np.zeros((1, 32, 32, 3))])
    >>> ops.convert_to_numpy(out["classes"])
    array([[1, 2, 0]], dtype=int32)

    Args:
        num_classes: int. Object classes `C` (without the background).
        score_threshold: float. Defaults to `0.05`.
        iou_threshold: float. Per-class NMS threshold. Defaults to `0.5`.
        max_detections: int. Detections per image `D`. Defaults to `100`.
        min_size: float. Boxes with a side under `min_size` pixels are
            dropped. Defaults to `1e-2`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[class_logits (batch, R, C + 1), box_deltas (batch, R, 4·C),
        proposals (batch, R, 4), valid (batch, R), images (batch, H, W, _)]`.

    Output shape:
        Dict `boxes (batch, D, 4)` float32 image pixels, `scores (batch, D)`,
        `classes (batch, D)` int32 in `1..C` (0 for padding),
        `num_detections (batch,)` int32.
    """

    def __init__(
        self,
        num_classes,
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=100,
        min_size=1e-2,
        **kwargs,
    ):
        super().__init__(autocast=False, **kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_detections = check_positive_int(max_detections, "max_detections")
        self.min_size = float(min_size)

    def build(self, input_shape):
        self.nms = BatchedNMS(
            self.iou_threshold,
            self.max_detections,
            score_threshold=self.score_threshold,
            name="nms",
        )

    def call(self, inputs):
        logits, deltas, proposals, valid, images = inputs
        height, width = images.shape[1:3]
        c = self.num_classes
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)[..., 1:]
        probs = probs * ops.cast(valid, "float32")[..., None]
        batch, rois = ops.shape(probs)[0], ops.shape(probs)[1]
        deltas = ops.reshape(ops.cast(deltas, "float32"), (batch, rois, c, 4))
        boxes = decode_boxes(deltas, proposals[:, :, None, :], ROI_BOX_WEIGHTS)
        boxes = clip_boxes(boxes, height, width)
        probs = ops.where(large_enough(boxes, self.min_size), probs, 0.0)
        classes = ops.broadcast_to(
            ops.arange(1, c + 1, dtype="int32"), (batch, rois, c)
        )
        out = self.nms(
            [
                ops.reshape(boxes, (batch, rois * c, 4)),
                ops.reshape(probs, (batch, rois * c)),
                ops.reshape(classes, (batch, rois * c)),
            ]
        )
        return {
            "boxes": out["boxes"],
            "scores": out["scores"],
            "classes": out["classes"],
            "num_detections": out["num_detections"],
        }

    def compute_output_spec(self, inputs):
        batch = inputs[0].shape[0]
        d = self.max_detections
        return {
            "boxes": keras.KerasTensor((batch, d, 4), "float32"),
            "scores": keras.KerasTensor((batch, d), "float32"),
            "classes": keras.KerasTensor((batch, d), "int32"),
            "num_detections": keras.KerasTensor((batch,), "int32"),
        }

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "min_size": self.min_size,
        }


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


@keras.saving.register_keras_serializable(package="kseg")
class PyramidLevelSelect(KsegLayer):
    """Keeps, for each RoI, the grid pooled from its FPN level (Mask R-CNN).

    Without adaptive feature pooling an RoI is pooled from one level
    `k = clip(floor(4 + log2(sqrt(wh) / 224)), 2, 5)` (`fpn_levels`). With
    static shapes every RoI is pooled from every level (`RoIAlign` on the
    list) and this layer keeps level `k`'s grid — the same numbers, no
    dynamic gather by level.

    Example:
    >>> grids = [np.full((1, 2, 2, 1), float(i)) for i in range(4)]
    >>> PyramidLevelSelect()([grids, np.array([[0.0, 0.0, 224.0, 224.0]])])[0, 0, 0]
    array([2.], dtype=float32)

    Args:
        min_level: int. Level of the first grid. Defaults to `2`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[grids, boxes]`: a list of `(R, oh, ow, C)` grids, one per level
        from `min_level`, and the `(R, 4)` boxes `[y1, x1, y2, x2]` (pixels).

    Output shape:
        `(R, oh, ow, C)`.
    """

    def __init__(self, min_level=2, **kwargs):
        super().__init__(**kwargs)
        self.min_level = check_positive_int(min_level, "min_level")

    def call(self, inputs):
        grids, boxes = inputs
        max_level = self.min_level + len(grids) - 1
        level = fpn_levels(boxes, self.min_level, max_level) - self.min_level
        selected = 0.0
        for i, grid in enumerate(grids):
            pick = ops.cast(ops.equal(level, i), grid.dtype)
            selected = selected + grid * pick[:, None, None, None]
        return selected

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0][0])

    def get_config(self):
        return {**super().get_config(), "min_level": self.min_level}


# === Heads ===


def _fuse(tensors, fusion):
    fused = tensors[0]
    for x in tensors[1:]:
        fused = ops.maximum(fused, x) if fusion == "max" else fused + x
    return fused


def _flatten(x):
    # A static width, because TF cannot infer -1 for zero RoIs.
    return ops.reshape(x, (ops.shape(x)[0], int(np.prod(x.shape[1:]))))


@keras.saving.register_keras_serializable(package="kseg")
class BoxHead(KsegLayer):
    """Box head: class logits and class-specific box deltas per RoI.

    The Mask R-CNN + FPN head "2fc" (flatten, fc `fc_units` + ReLU twice) or
    PANet's heavier head (`heavier_head=True`: 4 conv3×3 `conv_filters` +
    ReLU, flatten, one fc `fc_units` + ReLU), then a linear layer to `C + 1`
    class logits (background = 0; N(0, 0.01²) init) and one to `4·C`
    class-specific deltas (N(0, 0.001²)), as Detectron2.

    With adaptive feature pooling (PANet 3.2, Table 4) the input is a list of
    grids, one per level: with `fusion_position="after"` ("fc1fu.fc2", the
    paper's choice) each level has its own first parameter layer (fc1, or
    conv1 of the heavier head) through `AdaptiveFeaturePooling`, fused by
    `fusion`; with `"before"` ("fu.fc1fc2") the grids are fused first and
    the head is the plain one.

    Example:
    >>> head = BoxHead(num_classes=2, fc_units=16)
    >>> logits, deltas = head(np.zeros((5, 7, 7, 4)))
    >>> tuple(logits.shape), tuple(deltas.shape)
    ((5, 3), (5, 8))

    Args:
        num_classes: int. Object classes `C`.
        fc_units: int. Units of the fc layers. Defaults to `1024`.
        conv_filters: int. Channels of the heavier head's convs.
            Defaults to `256`.
        heavier_head: bool. PANet's heavier head. Defaults to `False`.
        fusion: str. `"max"` or `"sum"` across levels. Defaults to `"max"`.
        fusion_position: str. `"after"` or `"before"` the first parameter
            layer. Defaults to `"after"`.
        normalization: `None`, `"batch"` or `"sync_batch"`: BN after the
            heavier head's convs that this layer owns (the per-level conv1
            of `AdaptiveFeaturePooling` has none). Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `(R, 7, 7, C_in)` or a list of them (one per level).

    Output shape:
        `[class_logits (R, C + 1), box_deltas (R, 4·C)]`, float32.
    """

    def __init__(
        self,
        num_classes,
        fc_units=1024,
        conv_filters=256,
        heavier_head=False,
        fusion="max",
        fusion_position="after",
        normalization=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.fc_units = check_positive_int(fc_units, "fc_units")
        self.conv_filters = check_positive_int(conv_filters, "conv_filters")
        self.heavier_head = bool(heavier_head)
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(fusion_position, ("after", "before"), "fusion_position")
        self.fusion = fusion
        self.fusion_position = fusion_position
        self.normalization = _check_normalization(normalization)

    def build(self, input_shape):
        levels = isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)
        )
        self._adaptive = levels and self.fusion_position == "after"
        shape = tuple(input_shape[0] if levels else input_shape)
        dtype = self.dtype_policy
        self.convs, self.norms, self.fcs = [], [], []
        if self._adaptive:
            first = self.conv_filters if self.heavier_head else self.fc_units
            self.adaptive_pooling = AdaptiveFeaturePooling(
                first,
                fusion=self.fusion,
                layer_type="conv" if self.heavier_head else "fc",
                dtype=dtype,
                name="adaptive_pooling",
            )
            self.adaptive_pooling.build(list(input_shape))
            shape = self.adaptive_pooling.compute_output_shape(list(input_shape))
        if self.heavier_head:
            for i in range(1 if self._adaptive else 0, 4):
                conv, norm = _conv_and_norm(
                    self, self.conv_filters, 3, f"conv{i + 1}", self.normalization
                )
                shape = _build_unit(conv, norm, shape)
                self.convs.append(conv)
                self.norms.append(norm)
            fc_count = 1
        else:
            fc_count = 1 if self._adaptive else 2
        if len(shape) == 4:
            shape = (shape[0], int(np.prod(shape[1:])))
        for i in range(fc_count):
            fc = keras.layers.Dense(
                self.fc_units,
                activation="relu",
                dtype=dtype,
                name=f"fc{i + 3 - fc_count}",
            )
            fc.build(shape)
            shape = (shape[0], self.fc_units)
            self.fcs.append(fc)
        self.class_logits = keras.layers.Dense(
            self.num_classes + 1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype=dtype,
            name="class_logits",
        )
        self.class_logits.build(shape)
        self.box_deltas = keras.layers.Dense(
            4 * self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            dtype=dtype,
            name="box_deltas",
        )
        self.box_deltas.build(shape)

    def call(self, inputs, training=None):
        if isinstance(inputs, (list, tuple)):
            if self._adaptive:
                x = self.adaptive_pooling(list(inputs))
            else:
                x = _fuse(list(inputs), self.fusion)
        else:
            x = inputs
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = _apply_unit(conv, norm, x, training)
        if len(x.shape) == 4:
            x = _flatten(x)
        for fc in self.fcs:
            x = fc(x)
        return [
            ops.cast(self.class_logits(x), "float32"),
            ops.cast(self.box_deltas(x), "float32"),
        ]

    def compute_output_spec(self, inputs, training=None):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        rois = first.shape[0]
        return [
            keras.KerasTensor((rois, self.num_classes + 1), "float32"),
            keras.KerasTensor((rois, 4 * self.num_classes), "float32"),
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "fc_units": self.fc_units,
            "conv_filters": self.conv_filters,
            "heavier_head": self.heavier_head,
            "fusion": self.fusion,
            "fusion_position": self.fusion_position,
            "normalization": self.normalization,
        }


MASK_FUSION_BRANCHES = ("conv2", "conv3", "conv4")
MASK_FUSIONS = ("sum", "max", "product")


@keras.saving.register_keras_serializable(package="kseg")
class MaskHead(KsegLayer):
    """Mask head: the Mask R-CNN FCN head with PANet's switches.

    Four conv3×3 (`filters`, ReLU), a 2×2 stride-2 transposed conv
    (`filters`, ReLU) and a 1×1 conv to `C` per-class mask logits. With
    `fully_connected_fusion` (PANet 3.3, Figure 4, Table 5) a short path from
    the output of `fusion_branch` — conv3×3 (`filters`) + ReLU, conv3×3
    (`filters // 2`) + ReLU, flatten, one fc to `mask_size²` — gives a
    class-agnostic foreground logit map fused with every class's logits by
    `mask_fusion`: `"sum"` (the paper's), `"max"`, or `"product"` (of the
    two logit maps). `MaskHead(C, fully_connected_fusion=True)` computes
    `FullyConnectedFusionMaskHead(C)` (same layer names, the weights load
    across; a test checks it); this layer adds the other rows of Table 5,
    the plain head and BN. With a list input (adaptive feature pooling)
    conv1 is one conv per level, fused by `fusion` (`AdaptiveFeaturePooling`).

    Example:
    >>> head = MaskHead(3, mask_size=8, filters=4, fully_connected_fusion=True)
    >>> tuple(head(np.zeros((2, 4, 4, 4))).shape)
    (2, 8, 8, 3)

    Args:
        num_classes: int. Per-class masks `C`.
        mask_size: int. Side of the masks (even). Defaults to `28`.
        filters: int. Channels of the convs. Defaults to `256`.
        fusion: str. `"max"` or `"sum"` across levels. Defaults to `"max"`.
        fully_connected_fusion: bool. Adds the fc short path.
            Defaults to `False`.
        fusion_branch: str. `"conv2"`, `"conv3"` or `"conv4"`: where the short
            path starts. Defaults to `"conv3"`.
        mask_fusion: str. `"sum"`, `"max"` or `"product"`. Defaults to
            `"sum"`.
        normalization: `None`, `"batch"` or `"sync_batch"`: BN after the convs
            this layer owns. Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `(R, mask_size / 2, mask_size / 2, C_in)` or a list of them.

    Output shape:
        `(R, mask_size, mask_size, C)` mask logits, float32.
    """

    def __init__(
        self,
        num_classes,
        mask_size=28,
        filters=256,
        fusion="max",
        fully_connected_fusion=False,
        fusion_branch="conv3",
        mask_fusion="sum",
        normalization=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.mask_size = check_positive_int(mask_size, "mask_size")
        if self.mask_size % 2:
            raise ValueError(f"mask_size must be even, got {mask_size}")
        self.filters = check_positive_int(filters, "filters")
        if self.filters < 2:
            raise ValueError(f"filters must be >= 2, got {filters}")
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(fusion_branch, MASK_FUSION_BRANCHES, "fusion_branch")
        check_choice(mask_fusion, MASK_FUSIONS, "mask_fusion")
        self.fusion = fusion
        self.fully_connected_fusion = bool(fully_connected_fusion)
        self.fusion_branch = fusion_branch
        self.mask_fusion = mask_fusion
        self.normalization = _check_normalization(normalization)

    def build(self, input_shape):
        levels = isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)
        )
        dtype = self.dtype_policy
        self.convs, self.norms = [], []
        shape = tuple(input_shape[0] if levels else input_shape)
        if levels:
            self.adaptive_pooling = AdaptiveFeaturePooling(
                self.filters,
                fusion=self.fusion,
                layer_type="conv",
                dtype=dtype,
                name="conv1",
            )
            self.adaptive_pooling.build(list(input_shape))
            shape = (*shape[:3], self.filters)
        for i in range(1 if levels else 0, 4):
            conv, norm = _conv_and_norm(
                self, self.filters, 3, f"conv{i + 1}", self.normalization
            )
            shape = _build_unit(conv, norm, shape)
            self.convs.append(conv)
            self.norms.append(norm)
        self.deconv = keras.layers.Conv2DTranspose(
            self.filters, 2, strides=2, activation="relu", dtype=dtype, name="deconv"
        )
        self.deconv.build(shape)
        self.mask_logits = keras.layers.Conv2D(
            self.num_classes,
            1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            dtype=dtype,
            name="mask_logits",
        )
        self.mask_logits.build(self.deconv.compute_output_shape(shape))
        if self.fully_connected_fusion:
            self.fc_conv1, self.fc_norm1 = _conv_and_norm(
                self, self.filters, 3, "fc_conv1", self.normalization
            )
            _build_unit(self.fc_conv1, self.fc_norm1, shape)
            self.fc_conv2, self.fc_norm2 = _conv_and_norm(
                self, self.filters // 2, 3, "fc_conv2", self.normalization
            )
            _build_unit(self.fc_conv2, self.fc_norm2, shape)
            self.fc = keras.layers.Dense(self.mask_size**2, dtype=dtype, name="fc")
            self.fc.build((shape[0], shape[1] * shape[2] * (self.filters // 2)))

    def call(self, inputs, training=None):
        stages = []
        if isinstance(inputs, (list, tuple)):
            x = self.adaptive_pooling(list(inputs))
            stages.append(x)
        else:
            x = inputs
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = _apply_unit(conv, norm, x, training)
            stages.append(x)
        masks = self.mask_logits(self.deconv(x))
        if not self.fully_connected_fusion:
            return ops.cast(masks, "float32")
        short = stages[MASK_FUSION_BRANCHES.index(self.fusion_branch) + 1]
        short = _apply_unit(self.fc_conv1, self.fc_norm1, short, training)
        short = _apply_unit(self.fc_conv2, self.fc_norm2, short, training)
        short = self.fc(_flatten(short))
        foreground = ops.reshape(short, (-1, self.mask_size, self.mask_size, 1))
        if self.mask_fusion == "sum":
            fused = masks + foreground
        elif self.mask_fusion == "max":
            fused = ops.maximum(masks, foreground)
        else:
            fused = masks * foreground
        return ops.cast(fused, "float32")

    def compute_output_spec(self, inputs, training=None):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        return keras.KerasTensor(
            (first.shape[0], self.mask_size, self.mask_size, self.num_classes),
            "float32",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "mask_size": self.mask_size,
            "filters": self.filters,
            "fusion": self.fusion,
            "fully_connected_fusion": self.fully_connected_fusion,
            "fusion_branch": self.fusion_branch,
            "mask_fusion": self.mask_fusion,
            "normalization": self.normalization,
        }


@keras.saving.register_keras_serializable(package="kseg")
class PyramidRoIAlign(KsegLayer):
    """RoIAlign of batched boxes from the pyramid levels N2..N5.

    With `adaptive=True` (PANet's adaptive feature pooling) every box is
    pooled from every level and the list of grids is returned; with `False`
    (the Mask R-CNN baseline) each box keeps the grid of its FPN level
    (`PyramidLevelSelect`). Boxes are flattened image-major: RoI `b·R + r`
    is box `r` of image `b`.

    The numbers are `RoIAlign`'s (same sample positions, bilinear weights,
    out-of-map rule and bin averages, from `RoIAlign`'s own sampling code),
    computed in a cheaper equivalent form: a bilinear sample's weight is a
    product of a y weight and an x weight, and a bin averages a grid of
    samples, so the pooled grid of box `r` is `Ay_r · F · Ax_rᵀ` with `Ay_r`
    the `(oh, H)` matrix of summed y weights per bin (and `Ax_r` the x one).
    Because every image has the same number of boxes, this is two batched
    matrix products per level instead of four gathers of every sample — far
    faster in training, above all its gradient (dense products instead of
    scatter-adds of every sample into the feature maps).

    At inference (`training` not true) with a fixed sampling ratio (the
    adaptive one's bound grows with the map) the dense products cost
    `R·oh·H·W·C` multiply-adds per level — 29 G for 1000 RoIs on the 128×128
    level of a 512×512 image, most of them zero weights — so the grids are
    gathered instead where that is cheaper: `4·(oh·sr)·(ow·sr)·C` values per
    RoI whatever the level's size. Without `adaptive`, one gather from each
    RoI's own level (all levels flattened into one table), where the matrix
    form pools every level and keeps one; with `adaptive`, per level the
    cheaper form by `GATHER_COST` (gathers for the 128×128 level of a
    512×512 image, products for the coarser ones). Same numbers in both
    modes (1000 RoIs at 512², baseline: box pooling 2.7 s → 0.25 s on 2
    loaded CPU threads).

    Example:
    >>> pool = PyramidRoIAlign(7, adaptive=False, strides=(4, 8))
    >>> feats = [np.zeros((2, 16, 16, 3)), np.zeros((2, 8, 8, 3))]
    >>> tuple(pool([feats, np.zeros((2, 5, 4))]).shape)
    (10, 7, 7, 3)

    Args:
        output_size: int. Grid side (7 for boxes, 14 for masks).
        sampling_ratio: int. `RoIAlign` samples per bin (0 = adaptive).
            Defaults to `2`.
        strides: ints. Stride of each level. Defaults to `(4, 8, 16, 32)`.
        adaptive: bool. Pool from every level. Defaults to `True`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[features, boxes]`: a list of `(batch, H_l, W_l, C)` maps and
        `(batch, R, 4)` boxes `[y1, x1, y2, x2]` in image pixels.

    Output shape:
        A list of `(batch·R, s, s, C)` grids (adaptive) or one grid.
    """

    def __init__(
        self,
        output_size,
        sampling_ratio=2,
        strides=(4, 8, 16, 32),
        adaptive=True,
        **kwargs,
    ):
        super().__init__(autocast=False, **kwargs)
        self.output_size = check_positive_int(output_size, "output_size")
        self.sampling_ratio = int(sampling_ratio)
        self.strides = tuple(int(s) for s in strides)
        self.adaptive = bool(adaptive)

    def build(self, input_shape):
        self.roi_align = RoIAlign(
            self.output_size,
            sampling_ratio=self.sampling_ratio,
            strides=self.strides,
            dtype=self.dtype_policy,
            name="roi_align",
        )
        self.level_select = PyramidLevelSelect(
            min_level=int(round(math.log2(self.strides[0]))),
            dtype=self.dtype_policy,
            name="level_select",
        )

    def _pool(self, features, boxes, stride):
        """`(B·R, oh, ow, C)` RoIAlign of `(B, R, 4)` boxes from one level."""
        height, width, channels = features.shape[1:4]
        oh, ow = self.roi_align.output_size
        batch, rois = ops.shape(boxes)[0], boxes.shape[1]
        flat = ops.reshape(boxes, (-1, 4)) * (1.0 / float(stride))
        if self.roi_align.aligned:
            flat = flat - 0.5
        dtype = features.dtype
        rows = self.roi_align.axis_matrix(flat[:, 0], flat[:, 2], oh, height)
        cols = self.roi_align.axis_matrix(flat[:, 1], flat[:, 3], ow, width)
        # Boxes carry no gradient (RoIAlign's is not taken either).
        rows = ops.stop_gradient(ops.reshape(rows, (batch, rois * oh, height)))
        cols = ops.stop_gradient(ops.reshape(cols, (batch, rois, 1, ow, width)))
        # Rows first: (B, R·oh, H) @ (B, H, W·C) ...
        pooled = ops.matmul(
            ops.cast(rows, dtype), ops.reshape(features, (batch, height, -1))
        )
        # ... then columns: (B, R, 1, ow, W) @ (B, R, oh, W, C), broadcast
        # over the rows (no transposes).
        pooled = ops.reshape(pooled, (batch, rois, oh, width, channels))
        pooled = ops.matmul(ops.cast(cols, dtype), pooled)
        return ops.reshape(pooled, (-1, oh, ow, channels))

    def _gather_pool(self, table, boxes, base, stride, height, width):
        """`(N, oh, ow, C)` RoIAlign of `(N, 4)` boxes by gathers from `table`,
        maps flattened to `(rows, C)`: box n's map starts at row `base[n]`,
        has size `height × width` and `stride` (numbers, or `(N, 1)` tensors
        when each box has its own level). `RoIAlign`'s own sampling code."""
        align = self.roi_align
        oh, ow = align.output_size
        sr = align.sampling_ratio
        rows, cols = align._sample_boxes(boxes / stride, height, width)
        y_low, y_high, wy_low, wy_high, _, _ = rows
        x_low, x_high, wx_low, wx_high, _, _ = cols
        dtype = table.dtype
        width = ops.cast(width, "int32")
        y_low, y_high, wy_low, wy_high = (
            ops.reshape(t, (-1, oh, sr)) for t in (y_low, y_high, wy_low, wy_high)
        )
        x_low, x_high, wx_low, wx_high = (
            ops.reshape(t, (-1, ow, sr)) for t in (x_low, x_high, wx_low, wx_high)
        )
        # One (N, oh, ow, C) gather per sample and corner, summed as it comes:
        # no (N, oh·sr, ow·sr, C) tensor, no reduction over strided axes.
        pooled = None
        for sy, sx in itertools.product(range(sr), range(sr)):
            for rows, wy in ((y_low, wy_low), (y_high, wy_high)):
                row_start = base[:, None] + rows[..., sy] * width
                for cols, wx in ((x_low, wx_low), (x_high, wx_high)):
                    index = row_start[:, :, None] + cols[:, None, :, sx]
                    weight = ops.cast(wy[:, :, None, sy] * wx[:, None, :, sx], dtype)
                    term = ops.take(table, index, axis=0) * weight[..., None]
                    pooled = term if pooled is None else pooled + term
        return pooled / float(sr * sr)

    def _gather_is_cheaper(self, height, width):
        """Whether gathers pool a `height × width` level faster than the
        matrix products, per RoI: `oh·H·W + oh·ow·W` multiply-adds against
        `4·sr²·oh·ow` gathered values, one of which costs about
        `GATHER_COST` multiply-adds (TensorFlow on CPU, measured at 512²:
        gathers for the 128×128 level, products for the smaller ones)."""
        oh, ow = self.roi_align.output_size
        sr = self.roi_align.sampling_ratio
        products = oh * height * width + oh * ow * width
        return products > GATHER_COST * 4 * sr * sr * oh * ow

    def _gather_levels(self, features, boxes):
        """The inference form: gathers per level, or (without `adaptive`)
        one gather from each box's own level."""
        batch, rois = ops.shape(boxes)[0], boxes.shape[1]
        flat = ops.reshape(boxes, (-1, 4))
        image = ops.repeat(ops.arange(batch, dtype="int32"), rois)
        sizes = [tuple(f.shape[1:3]) for f in features]
        tables = [ops.reshape(f, (-1, f.shape[-1])) for f in features]
        if self.adaptive:
            return [
                self._gather_pool(t, flat, image * (h * w), float(s), h, w)
                if self._gather_is_cheaper(h, w)
                else self._pool(f, boxes, s)
                for f, t, s, (h, w) in zip(
                    features, tables, self.strides, sizes, strict=True
                )
            ]
        min_level = self.level_select.min_level
        level = fpn_levels(flat, min_level, min_level + len(features) - 1) - min_level
        areas = [h * w for h, w in sizes]

        def per_box(values, dtype):
            values = ops.convert_to_tensor(np.asarray(values), dtype)
            return ops.take(values, level)

        # Row where image b's map of level l starts: the levels one after the
        # other, each holding every image.
        starts = per_box(np.cumsum([0] + areas[:-1]), "int32") * batch
        base = starts + image * per_box(areas, "int32")
        return self._gather_pool(
            ops.concatenate(tables, axis=0),
            flat,
            base,
            per_box(self.strides, "float32")[:, None],
            per_box([h for h, _ in sizes], "int32")[:, None],
            per_box([w for _, w in sizes], "int32")[:, None],
        )

    def call(self, inputs, training=None):
        features, boxes = inputs
        boxes = ops.cast(boxes, "float32")
        dtype = self.roi_align.compute_dtype
        static = boxes.shape[1] is not None and all(
            None not in tuple(f.shape[1:4]) for f in features
        )
        # The gathers take every sample of a bin: a fixed sampling ratio only
        # (the adaptive bound grows with the map).
        if static and not training and self.sampling_ratio > 0:
            return self._gather_levels([ops.cast(f, dtype) for f in features], boxes)
        if static:
            grids = [
                self._pool(ops.cast(f, dtype), boxes, s)
                for f, s in zip(features, self.strides, strict=True)
            ]
        else:
            # Unknown sizes: RoIAlign's gathers on the flattened boxes.
            rois = ops.shape(boxes)[1]
            index = ops.repeat(ops.arange(ops.shape(boxes)[0], dtype="int32"), rois)
            grids = self.roi_align([list(features), ops.reshape(boxes, (-1, 4)), index])
        if self.adaptive:
            return grids
        return self.level_select([grids, ops.reshape(boxes, (-1, 4))])

    def compute_output_spec(self, inputs, training=None):
        features, boxes = inputs
        rois = None if boxes.shape[0] is None else boxes.shape[0] * boxes.shape[1]
        shape = (rois, self.output_size, self.output_size, features[0].shape[-1])
        dtype = self.compute_dtype
        if self.adaptive:
            return [keras.KerasTensor(shape, dtype) for _ in features]
        return keras.KerasTensor(shape, dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "output_size": self.output_size,
            "sampling_ratio": self.sampling_ratio,
            "strides": self.strides,
            "adaptive": self.adaptive,
        }
