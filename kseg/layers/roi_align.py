"""RoIAlign of batched boxes from the pyramid levels: every level
(adaptive feature pooling) or each box's FPN level (Mask R-CNN)."""

import itertools
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
