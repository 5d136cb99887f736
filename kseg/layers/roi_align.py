"""RoIAlign of batched boxes from the pyramid levels: every level
(adaptive feature pooling) or each box's FPN level (Mask R-CNN)."""

import math

import keras
import numpy as np
from keras import ops

from kseg.layers.boxes import fpn_levels
from kseg.layers.common import KsegLayer, check_positive_int
from kseg.layers.panet import RoIAlign

# Multiply-adds of a batched matrix product that cost as much as gathering one
# value (TensorFlow, CPU): `PyramidRoIAlign` picks its form per level by it.
GATHER_COST = 60


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


@keras.saving.register_keras_serializable(package="kseg")
class PyramidRoIAlign(KsegLayer):
    """RoIAlign of batched boxes from the pyramid levels N2..N5.

    With `adaptive=True` (PANet's adaptive feature pooling) every box is
    pooled from every level and the list of grids is returned; with `False`
    (the Mask R-CNN baseline) each box keeps the grid of its FPN level
    (`PyramidLevelSelect`). Boxes are flattened image-major: RoI `b·R + r`
    is box `r` of image `b`.

    The numbers are `RoIAlign`'s, in one of its two forms per level: its
    gathers of every sample (`RoIAlign.gather`, whose gradient scatter-adds
    into the sampled pixels only), or its matrix products (`RoIAlign.matrix`:
    a bin averages a separable grid of bilinear samples, so box r pools
    `Ay_r · F · Ax_rᵀ`; two batched products per level, `R·oh·H·W·C`
    multiply-adds, 29 G for 1000 RoIs on the 128×128 level of a 512×512
    image, most of them zero weights). `_gathers` chooses, in one place, the
    same in training and at inference: the products for the adaptive
    sampling ratio (its bound grows with the map); without `adaptive` one
    gather from each RoI's own level, where the products pool every level
    and keep one; with it, per level the form that costs less. Same numbers
    and gradients in both forms. Forward and backward at 512², batch 2
    (2 CPU threads, tcmalloc): 512 RoIs an image, 7×7, own level 2720 ms
    (products on every level) → 591 ms, adaptive 2701 → 1413 ms.

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
        aligned: bool. `RoIAlign`'s half-pixel correction; `False` is
            torchvision's `MultiScaleRoIAlign` (RoI sides at least one
            feature pixel, no shift). Defaults to `True` (SPEC).
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[features, boxes]`: a list of `(batch, H_l, W_l, C)` maps and
        `(batch, R, 4)` boxes `[y1, x1, y2, x2]` in image pixels; or
        `[features, boxes, images]`: `(N, 4)` boxes and `(N,)` the image of
        each (any count per image; pooled by gathers).

    Output shape:
        A list of `(batch·R, s, s, C)` (or `(N, s, s, C)`) grids (adaptive)
        or one grid.
    """

    def __init__(
        self,
        output_size,
        sampling_ratio=2,
        strides=(4, 8, 16, 32),
        adaptive=True,
        aligned=True,
        **kwargs,
    ):
        super().__init__(autocast=False, **kwargs)
        self.aligned = bool(aligned)
        self.output_size = check_positive_int(output_size, "output_size")
        self.sampling_ratio = int(sampling_ratio)
        self.strides = tuple(int(s) for s in strides)
        self.adaptive = bool(adaptive)

    def build(self, input_shape):
        self.roi_align = RoIAlign(
            self.output_size,
            sampling_ratio=self.sampling_ratio,
            strides=self.strides,
            aligned=self.aligned,
            dtype=self.dtype_policy,
            name="roi_align",
        )
        self.level_select = PyramidLevelSelect(
            min_level=int(round(math.log2(self.strides[0]))),
            dtype=self.dtype_policy,
            name="level_select",
        )

    def _gathers(self, height=None, width=None):
        """The one choice of form: whether to gather the samples (else the
        matrix products). The adaptive sampling ratio takes the products
        (its bound grows with the map). Without adaptive pooling (`height`
        None) one gather from each box's own level, where the products pool
        every level and keep one; per level with it, gathers where they cost
        less: per RoI `oh·H·W + oh·ow·W` multiply-adds against
        `4·sr²·oh·ow` gathered values, one of which costs about
        `GATHER_COST` multiply-adds (TensorFlow on CPU, measured at 512²:
        gathers for the 128×128 level, products for the smaller ones, in
        training as at inference)."""
        if self.sampling_ratio == 0:
            return False
        if height is None:
            return True
        oh, ow = self.roi_align.output_size
        sr = self.sampling_ratio
        products = oh * height * width + oh * ow * width
        return products > GATHER_COST * 4 * sr * sr * oh * ow

    def _pool_level(self, feature, boxes, stride):
        """`(B·R, oh, ow, C)` grids of one level, in the cheaper form."""
        height, width = feature.shape[1:3]
        if not self._gathers(height, width):
            return self.roi_align.matrix(feature, boxes, stride)
        batch, rois = ops.shape(boxes)[0], boxes.shape[1]
        image = ops.repeat(ops.arange(batch, dtype="int32"), rois)
        return self.roi_align.gather(
            ops.reshape(feature, (-1, feature.shape[-1])),
            ops.reshape(boxes, (-1, 4)),
            image * (height * width),
            float(stride),
            height,
            width,
        )

    def _gather_own_levels(self, features, flat, image):
        """One gather from each box's own FPN level, all levels flattened
        into one table: `(N, 4)` boxes, `(N,)` their images."""
        batch = ops.shape(features[0])[0]
        sizes = [tuple(f.shape[1:3]) for f in features]
        tables = [ops.reshape(f, (-1, f.shape[-1])) for f in features]
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
        return self.roi_align.gather(
            ops.concatenate(tables, axis=0),
            flat,
            base,
            per_box(self.strides, "float32")[:, None],
            per_box([h for h, _ in sizes], "int32")[:, None],
            per_box([w for _, w in sizes], "int32")[:, None],
        )

    def _gather_flat(self, features, boxes, image):
        """Grids of `(N, 4)` boxes of images `image` `(N,)`: gathers (no
        per-image row count for the products)."""
        if not self.adaptive:
            return self._gather_own_levels(features, boxes, image)
        grids = []
        for feature, stride in zip(features, self.strides, strict=True):
            height, width = feature.shape[1:3]
            grids.append(
                self.roi_align.gather(
                    ops.reshape(feature, (-1, feature.shape[-1])),
                    boxes,
                    image * (height * width),
                    float(stride),
                    height,
                    width,
                )
            )
        return grids

    def call(self, inputs, training=None):
        features, boxes = inputs[:2]
        boxes = ops.cast(boxes, "float32")
        dtype = self.roi_align.compute_dtype
        features = [ops.cast(f, dtype) for f in features]
        if len(inputs) == 3:
            return self._gather_flat(features, boxes, ops.cast(inputs[2], "int32"))
        static = boxes.shape[1] is not None and all(
            None not in tuple(f.shape[1:4]) for f in features
        )
        if not static:
            # Unknown sizes: RoIAlign's gathers on the flattened boxes.
            rois = ops.shape(boxes)[1]
            index = ops.repeat(ops.arange(ops.shape(boxes)[0], dtype="int32"), rois)
            grids = self.roi_align([features, ops.reshape(boxes, (-1, 4)), index])
        elif not self.adaptive and self._gathers():
            batch, rois = ops.shape(boxes)[0], boxes.shape[1]
            image = ops.repeat(ops.arange(batch, dtype="int32"), rois)
            return self._gather_own_levels(features, ops.reshape(boxes, (-1, 4)), image)
        else:
            grids = [
                self._pool_level(f, boxes, s)
                for f, s in zip(features, self.strides, strict=True)
            ]
        if self.adaptive:
            return grids
        return self.level_select([grids, ops.reshape(boxes, (-1, 4))])

    def compute_output_spec(self, inputs, training=None):
        features, boxes = inputs[:2]
        if len(inputs) == 3:
            rois = boxes.shape[0]
        else:
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
            "aligned": self.aligned,
        }
