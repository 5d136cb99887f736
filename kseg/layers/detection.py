"""Detection layers of the PANet system (Mask R-CNN + FPN with PANet's parts).

The feature pyramid, anchors, region proposal network, box coding, padded
non-maximum suppression, the detection layer and the box / mask heads, as
`docs/SPEC.md` ("The PANet system") defines them. Every shape is static
(proposals and detections are padded to fixed counts with a validity mask),
so the layers compile with XLA and run on every Keras backend.

What Keras maintains is used where it matches the SPEC definitions:
`keras.utils.bounding_boxes` (`encode_box_to_deltas`,
`decode_deltas_to_boxes`, `compute_iou`) and keras-hub's `BoxMatcher`
(imported where it is used, because importing keras-hub imports TensorFlow,
and `kseg.layers` must import on JAX without it). keras-hub's padded NMS is
not used: traced, it keeps other boxes than the greedy NMS
(`kseg.layers.nms.PaddedNMS`). The NumPy-reference tests in
`tests/layers/test_detection.py` prove the equality.

Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018;
He et al., "Mask R-CNN", ICCV 2017; Lin et al., "Feature Pyramid Networks for
Object Detection", CVPR 2017.
"""

import math

import keras
import numpy as np
from keras import ops

from kseg.layers.boxes import (
    ROI_BOX_WEIGHTS,
    RPN_BOX_WEIGHTS,
    clip_boxes,
    decode_boxes,
    large_enough,
)
from kseg.layers.common import KsegLayer, check_positive_int
from kseg.layers.nms import BatchedNMS, detections_spec
from kseg.layers.units import (
    apply_unit,
    build_unit,
    check_normalization,
    conv_and_norm,
)

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
        self.normalization = check_normalization(normalization)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 4:
            raise ValueError(
                f"{self.name} expects the list [C2, C3, C4, C5], got {input_shape}"
            )
        self.lateral_convs, self.lateral_norms = [], []
        self.output_convs, self.output_norms = [], []
        for i, shape in enumerate(input_shape):
            conv, norm = conv_and_norm(
                self, self.filters, 1, f"lateral_{i + 2}", self.normalization
            )
            out_shape = build_unit(conv, norm, shape)
            self.lateral_convs.append(conv)
            self.lateral_norms.append(norm)
            conv, norm = conv_and_norm(
                self, self.filters, 3, f"output_{i + 2}", self.normalization
            )
            build_unit(conv, norm, out_shape)
            self.output_convs.append(conv)
            self.output_norms.append(norm)

    def call(self, inputs, training=None):
        laterals = [
            apply_unit(conv, norm, x, training, relu=False)
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
            apply_unit(conv, norm, x, training, relu=False)
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
    ratio 0.5, not 45.25×22.63), which SPEC does not. torchvision rounds
    them too (`round_base=True`: its `AnchorGenerator`'s `base_anchors.round()`,
    half-sizes to whole pixels, by up to 0.49 px). The anchors depend only
    on the static image size, so they are NumPy constants.

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
        round_base: bool. Round the base anchors' half-sizes to whole
            pixels (torchvision's convention). Defaults to `False` (SPEC).
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
        round_base=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.round_base = bool(round_base)
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
            if self.round_base:
                base = np.round(base)
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
            "round_base": self.round_base,
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
        self.normalization = check_normalization(normalization)

    def build(self, input_shape):
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv, self.conv_norm = conv_and_norm(
            self, self.filters, 3, "conv", self.normalization, kernel_initializer=init
        )
        shape = build_unit(self.conv, self.conv_norm, input_shape[0])
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
            x = apply_unit(self.conv, self.conv_norm, x, training)
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


# === Proposals and detections ===


@keras.saving.register_keras_serializable(package="kseg")
class ProposalLayer(KsegLayer):
    """Region proposals from the RPN outputs: top-k per level, decode, clip,
    drop tiny boxes, NMS per image, keep the top boxes.

    Per level the `pre_nms_top_k` anchors with the highest objectness are
    decoded (weights `(1, 1, 1, 1)`, `dh, dw` clipped at `log(1000 / 16)`),
    clipped to the image, boxes with a side under `min_size` pixels are
    dropped, then one NMS at `iou_threshold` runs over all levels of an image
    (scores `sigmoid(objectness)`) and keeps the `post_nms_top_k` best; with
    `per_level_nms=True` (torchvision's `batched_nms` by level) the NMS runs
    within each level (boxes of different levels never suppress each other)
    and the `post_nms_top_k` best over all levels are kept. The
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
        per_level_nms: bool. NMS within each level (torchvision), else one
            NMS over all levels (SPEC). Defaults to `False`.
        round_anchors: bool. `AnchorGenerator`'s `round_base` (torchvision).
            Defaults to `False`.
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
        per_level_nms=False,
        round_anchors=False,
        **kwargs,
    ):
        super().__init__(autocast=False, **kwargs)
        self.per_level_nms = bool(per_level_nms)
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
            anchor_sizes,
            anchor_strides,
            aspect_ratios,
            round_base=round_anchors,
            name="anchors",
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
        boxes, scores, levels = [], [], []
        start = 0
        for level, (h, w) in enumerate(
            self.anchor_generator.level_shapes((height, width))
        ):
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
            levels.append(ops.full(ops.shape(level_logits), level + 1, "int32"))
            start = stop
        nms = self.nms_train if training else self.nms_test
        inputs = [ops.concatenate(boxes, axis=1), ops.concatenate(scores, axis=1)]
        if self.per_level_nms:
            # The level as the class: BatchedNMS never lets two classes meet.
            inputs.append(ops.concatenate(levels, axis=1))
        kept = nms(inputs)
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
            "per_level_nms": self.per_level_nms,
            "round_anchors": anchors.round_base,
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
        return detections_spec(inputs[0].shape[0], self.max_detections)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "min_size": self.min_size,
        }
