"""PANet (Path Aggregation Network) layers: bottom-up path augmentation,
RoIAlign, adaptive feature pooling and the fully-connected fusion mask head.

Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018,
sections 3.1–3.3.
"""

import math

import keras
import numpy as np
from keras import ops

from kseg.layers.common import KsegLayer, check_channels, check_choice, check_rank


def _is_shape_list(shape):
    """True when a layer received a list of tensors (a list of shapes)."""
    return (
        isinstance(shape, (list, tuple))
        and len(shape) > 0
        and all(isinstance(s, (list, tuple)) for s in shape)
    )


def _check_shape_list(input_shape, what, min_levels):
    if not _is_shape_list(input_shape) or len(input_shape) < min_levels:
        raise ValueError(
            f"{what} expects a list of at least {min_levels} feature maps, "
            f"got input_shape={input_shape}"
        )
    for i, shape in enumerate(input_shape):
        check_rank(shape, 4, f"{what} inputs[{i}]")


def _conv(
    filters, kernel_size, name, dtype, strides=1, activation="relu", padding="same"
):
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        activation=activation,
        dtype=dtype,
        name=name,
    )


def _padded_shape(shape):
    """`(batch, H + 2, W + 2, C)`: one pixel of padding on every side."""
    return (shape[0], *(None if s is None else s + 2 for s in shape[1:3]), shape[3])


@keras.saving.register_keras_serializable(package="kseg")
class BottomUpPathAugmentation(KsegLayer):
    """Bottom-up path augmentation: builds `[N2, ..., N5]` from `[P2, ..., P5]`.

    PANet section 3.1 (Figure 2). A short path from the fine FPN level to the
    coarse ones: `N2 = P2` and
    `N_{i+1} = relu(conv3×3(relu(conv3×3_stride2(N_i)) + P_{i+1}))`.
    Each level has its own two convolutions (with bias). The stride-2 one
    pads one pixel on every side, as the paper's code and PyTorch's
    `padding=1` (Keras' "same" would pad only the bottom and right of an even
    size, moving every window by a pixel for weights from PyTorch), so a
    level of height `H` goes to `ceil(H / 2)`; the other is "same".

    Example:
    >>> layer = BottomUpPathAugmentation(filters=8)
    >>> p = [np.zeros((1, 16 // 2**i, 16 // 2**i, 8)) for i in range(4)]
    >>> [tuple(n.shape) for n in layer(p)]
    [(1, 16, 16, 8), (1, 8, 8, 8), (1, 4, 4, 8), (1, 2, 2, 8)]

    Args:
        filters: int. Channels of every input level and of every output level.
            Defaults to `256` (the paper's value).
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List of at least 2 4D tensors `(batch, H_i, W_i, filters)`, finest
        first, each level `ceil` half the size of the previous one.

    Output shape:
        List of 4D tensors with the same shapes as the inputs.
    """

    def __init__(self, filters=256, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        if self.filters < 1:
            raise ValueError(f"filters must be a positive int, got {filters}")

    def build(self, input_shape):
        _check_shape_list(input_shape, self.name, 2)
        for i, shape in enumerate(input_shape):
            channels = check_channels(shape, f"{self.name} inputs[{i}]")
            if channels != self.filters:
                raise ValueError(
                    f"{self.name}: level {i} has {channels} channels, expected "
                    f"filters={self.filters}; shape={shape}"
                )
        for i in range(1, len(input_shape)):
            for axis in (1, 2):
                fine, coarse = input_shape[i - 1][axis], input_shape[i][axis]
                if fine is not None and coarse is not None:
                    if coarse != math.ceil(fine / 2):
                        raise ValueError(
                            f"{self.name}: level {i} has spatial shape "
                            f"{tuple(input_shape[i][1:3])} but level {i - 1} "
                            f"{tuple(input_shape[i - 1][1:3])} needs "
                            f"ceil(size / 2) at every level"
                        )
        self.downsample_convs = []
        self.fuse_convs = []
        for i in range(1, len(input_shape)):
            down = _conv(
                self.filters,
                3,
                f"downsample_{i}",
                self.dtype_policy,
                strides=2,
                padding="valid",
            )
            down.build(_padded_shape(input_shape[i - 1]))
            fuse = _conv(self.filters, 3, f"fuse_{i}", self.dtype_policy)
            fuse.build(input_shape[i])
            self.downsample_convs.append(down)
            self.fuse_convs.append(fuse)

    def call(self, inputs, training=None):
        outputs = [inputs[0]]
        for down, fuse, lateral in zip(
            self.downsample_convs, self.fuse_convs, inputs[1:], strict=True
        ):
            padded = ops.pad(outputs[-1], [[0, 0], [1, 1], [1, 1], [0, 0]])
            outputs.append(fuse(down(padded) + lateral))
        return outputs

    def compute_output_shape(self, input_shape):
        shapes = [tuple(input_shape[0])]
        for i in range(1, len(input_shape)):
            previous = shapes[-1]
            shape = list(input_shape[i])
            for axis in (1, 2):
                if shape[axis] is None and previous[axis] is not None:
                    shape[axis] = math.ceil(previous[axis] / 2)
            shapes.append(tuple(shape))
        return shapes

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="kseg")
class RoIAlign(KsegLayer):
    """RoIAlign: bilinear pooling of a fixed grid per box (Mask R-CNN).

    PANet pools every proposal from every level N2..N5 with RoIAlign (section
    3.2); this is the Mask R-CNN / Detectron2 `ROIAlign`. A box in image pixels
    is scaled by `1 / stride` (and shifted by −0.5 when `aligned`, because
    pixel centres lie at integer + 0.5), split into `oh × ow` bins, and each
    bin averages `sampling_ratio²` bilinear samples at
    `y = y1 + (iy + (s + 0.5) / sampling_ratio) · bin_h`. With
    `sampling_ratio=0` (Detectron2's adaptive ratio) each RoI uses
    `ceil(roi_h / oh)` samples along y and `ceil(roi_w / ow)` along x (RoI
    sizes in feature pixels; an empty RoI pools 0). Static shapes need a
    bound on that count: by default it is `ceil(H / oh)` (and `ceil(W / ow)`)
    for an `H × W` map, the count of a RoI as large as the map, so the
    adaptive ratio is exact for every box inside the image (every box PANet
    pools); the unused samples weigh 0. `max_sampling_ratio` sets a smaller
    bound instead (a larger count is then capped, and differs from
    Detectron2), as does a box reaching beyond the map. A sample further
    than one pixel outside the map (`y < −1` or `y > H`, same for `x`)
    contributes zero; others are clamped into the map. Written with
    `keras.ops` gathers (no `crop_and_resize`) so it compiles with XLA and
    converts to TFLite. Box coordinates are always handled in float32, also
    under mixed precision.

    Example:
    >>> layer = RoIAlign(2, sampling_ratio=2, strides=1)
    >>> features = np.arange(16.0).reshape(1, 4, 4, 1)
    >>> boxes = np.array([[0.0, 0.0, 4.0, 4.0]])  # the whole 4×4 image
    >>> pooled = layer([features, boxes, np.array([0])])
    >>> tuple(pooled.shape)
    (1, 2, 2, 1)
    >>> ops.convert_to_numpy(pooled)[0, :, :, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)

    Args:
        output_size: int or tuple of 2 ints. Pooled grid `(oh, ow)`.
        sampling_ratio: int. Samples per bin along each axis (`≥ 1`), or
            `0` for the adaptive `ceil(roi_size / bins)`. Defaults to `2`.
        strides: number, or list of numbers (one per level) when `features`
            is a list. Feature stride of each map relative to the image.
            Defaults to `1`.
        aligned: bool. Half-pixel correction (Detectron2 `aligned=True`);
            when `False` the original Mask R-CNN definition, which clamps RoI
            sizes to at least one feature pixel. Defaults to `True`.
        max_sampling_ratio: int or `None`. With `sampling_ratio=0`, the most
            samples per bin and axis; `None` takes the bound of a RoI as large
            as the map (exact for every box inside the image; needs static
            map sizes). Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List `[features, boxes, box_indices]`: `features` a 4D tensor
        `(batch, H, W, C)` or a list of them (one per level, same `C`),
        `boxes` `(R, 4)` as `[y1, x1, y2, x2]` in image pixels,
        `box_indices` `(R,)` ints, the batch image of each box (must lie in
        `[0, batch)`; not checked at run time).

    Output shape:
        `(R, oh, ow, C)` for one map, or a list of them (every box pooled from
        every level) for a list of maps.
    """

    def __init__(
        self,
        output_size,
        sampling_ratio=2,
        strides=1,
        aligned=True,
        max_sampling_ratio=None,
        **kwargs,
    ):
        # Autocasting would turn the box coordinates into float16 under mixed
        # precision (1-pixel steps above 2048); `call` casts each input itself.
        super().__init__(autocast=False, **kwargs)
        if isinstance(output_size, (list, tuple)):
            if len(output_size) != 2:
                raise ValueError(
                    f"output_size must be an int or (height, width), got {output_size}"
                )
            self.output_size = tuple(int(s) for s in output_size)
        else:
            self.output_size = (int(output_size), int(output_size))
        if min(self.output_size) < 1:
            raise ValueError(f"output_size must be positive, got {output_size}")
        self.sampling_ratio = int(sampling_ratio)
        if self.sampling_ratio < 0:
            raise ValueError(
                f"sampling_ratio must be an int >= 1, or 0 (adaptive), got "
                f"{sampling_ratio}"
            )
        self.max_sampling_ratio = max_sampling_ratio
        if max_sampling_ratio is not None:
            self.max_sampling_ratio = int(max_sampling_ratio)
            if self.max_sampling_ratio < 1:
                raise ValueError(
                    "max_sampling_ratio must be an int >= 1 or None, got "
                    f"{max_sampling_ratio}"
                )
        if isinstance(strides, (list, tuple)):
            self.strides = tuple(strides)
            stride_values = self.strides
        else:
            self.strides = strides
            stride_values = (strides,)
        for stride in stride_values:
            if isinstance(stride, bool) or not isinstance(
                stride, (int, float, np.integer, np.floating)
            ):
                raise ValueError(f"strides must be numbers, got {strides!r}")
            if stride <= 0:
                raise ValueError(f"strides must be positive, got {strides!r}")
        self.aligned = bool(aligned)

    def _split_shapes(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 3:
            raise ValueError(
                f"{self.name} expects inputs [features, boxes, box_indices], "
                f"got input_shape={input_shape}"
            )
        features, boxes, box_indices = input_shape
        multi_level = _is_shape_list(features)
        return (list(features) if multi_level else [features]), boxes, box_indices

    def build(self, input_shape):
        feature_shapes, boxes_shape, indices_shape = self._split_shapes(input_shape)
        multi_level = _is_shape_list(input_shape[0])
        if multi_level:
            if not isinstance(self.strides, tuple):
                raise ValueError(
                    f"{self.name}: features is a list of {len(feature_shapes)} "
                    f"levels, so strides must be a list of {len(feature_shapes)} "
                    f"numbers, got strides={self.strides!r}"
                )
            if len(self.strides) != len(feature_shapes):
                raise ValueError(
                    f"{self.name}: {len(feature_shapes)} feature levels but "
                    f"{len(self.strides)} strides {self.strides}"
                )
        elif isinstance(self.strides, tuple):
            raise ValueError(
                f"{self.name}: features is a single map, so strides must be a "
                f"number, got strides={self.strides!r}"
            )
        channels = None
        for i, shape in enumerate(feature_shapes):
            check_rank(shape, 4, f"{self.name} features[{i}]")
            level_channels = check_channels(shape, f"{self.name} features[{i}]")
            if channels is not None and level_channels != channels:
                raise ValueError(
                    f"{self.name}: feature levels must share the channel count, "
                    f"got {channels} and {level_channels} (features[{i}])"
                )
            channels = level_channels
        if boxes_shape is None or len(boxes_shape) != 2 or boxes_shape[1] != 4:
            raise ValueError(
                f"{self.name}: boxes must have shape (R, 4) as [y1, x1, y2, x2], "
                f"got {boxes_shape}"
            )
        if indices_shape is None or len(indices_shape) != 1:
            raise ValueError(
                f"{self.name}: box_indices must have shape (R,), got {indices_shape}"
            )
        if (
            boxes_shape[0] is not None
            and indices_shape[0] is not None
            and boxes_shape[0] != indices_shape[0]
        ):
            raise ValueError(
                f"{self.name}: {boxes_shape[0]} boxes but {indices_shape[0]} "
                f"box_indices"
            )

    def samples_per_bin(self, size, bins):
        """Samples per bin along an axis of `size` map pixels split into
        `bins`: the sampling ratio, or with `sampling_ratio=0` the bound on
        the adaptive count (see the class docstring)."""
        if self.sampling_ratio > 0:
            return self.sampling_ratio
        if self.max_sampling_ratio is not None:
            return self.max_sampling_ratio
        if not isinstance(size, (int, np.integer)):
            raise ValueError(
                f"{self.name}: sampling_ratio=0 bounds the adaptive sample count "
                "by the feature map's size, which is not static here; pass "
                "max_sampling_ratio"
            )
        return max(1, math.ceil(int(size) / bins))

    def _sample_coords(self, start, end, bins, size):
        """Samples along one axis of RoIs spanning `[start, end]` (feature
        pixels, shifted when aligned): `(R, bins·sr)` positions clamped into
        the map, their weights (0 for samples beyond the one-pixel border and
        unused adaptive ones, else 1), the `(R,)` samples per bin (adaptive)
        or `None`, and the static `sr` (`samples_per_bin`)."""
        sr = self.samples_per_bin(size, bins)
        length = end - start
        if not self.aligned:
            length = ops.maximum(length, 1.0)
        bin_size = length / bins
        bin_index = np.arange(bins, dtype="float32")[:, None]
        if self.sampling_ratio > 0:
            steps = (np.arange(sr, dtype="float32")[None, :] + 0.5) / sr
            offsets = (bin_index + steps).reshape(-1)[None, :]
            used, count = 1.0, None
        else:
            count = ops.minimum(ops.ceil(length / bins), float(sr))
            sample = np.arange(sr, dtype="float32")
            steps = (sample[None, None, :] + 0.5) / ops.maximum(count, 1.0)[
                :, None, None
            ]
            offsets = ops.reshape(bin_index[None] + steps, (-1, bins * sr))
            used = ops.cast(sample[None, None, :] < count[:, None, None], "float32")
            used = ops.reshape(ops.repeat(used, bins, axis=1), (-1, bins * sr))
        coords = start[:, None] + offsets * bin_size[:, None]
        size_f = ops.cast(size, "float32")
        valid = ops.cast(ops.logical_and(coords >= -1.0, coords <= size_f), "float32")
        return ops.clip(coords, 0.0, size_f - 1.0), valid * used, count, sr

    def _sample_axis(self, start, end, bins, size):
        """`_sample_coords` as bilinear corners: flat `(R, bins·sr)` low and
        high indices and their weights, the count and `sr`."""
        coords, weight, count, sr = self._sample_coords(start, end, bins, size)
        low = ops.floor(coords)
        frac = coords - low
        low = ops.cast(low, "int32")
        high = ops.minimum(low + 1, ops.cast(size, "int32") - 1)
        return low, high, (1.0 - frac) * weight, frac * weight, count, sr

    def _sample_boxes(self, boxes, height, width):
        """`_sample_axis` of the rows and of the columns of `(R, 4)` boxes
        given in feature-map pixels (half a pixel shifted when aligned)."""
        oh, ow = self.output_size
        if self.aligned:
            boxes = boxes - 0.5
        rows = self._sample_axis(boxes[:, 0], boxes[:, 2], oh, height)
        cols = self._sample_axis(boxes[:, 1], boxes[:, 3], ow, width)
        return rows, cols

    def axis_matrix(self, start, end, bins, size):
        """`(R, bins, size)` float32: the weight of each map row (or column)
        in each bin's average, for RoIs spanning `[start, end]` (feature
        pixels, shifted when aligned). A bin's average is separable, so a
        RoI pools `rows · F · colsᵀ` (`PyramidRoIAlign`'s matrix form). A
        sample at (clamped) `c` gives row `h` the weight `max(0, 1 − |c − h|)`:
        its two bilinear weights, `1 − frac` and `frac`; one sample at a time,
        so the memory does not grow with the adaptive bound."""
        coords, weight, count, sr = self._sample_coords(start, end, bins, size)
        coords = ops.reshape(coords, (-1, bins, sr))
        weight = ops.reshape(weight, (-1, bins, sr))
        rows = np.arange(size, dtype="float32")
        matrix = None
        for s in range(sr):
            hat = ops.relu(1.0 - ops.abs(coords[..., s, None] - rows))
            term = hat * weight[..., s, None]
            matrix = term if matrix is None else matrix + term
        if count is None:
            return matrix / float(sr)
        # Adaptive: RoIAlign divides by max(count_y · count_x, 1); an axis with
        # count 0 has all weights 0, so dividing each axis by max(count, 1)
        # gives the same numbers.
        return matrix / ops.maximum(count, 1.0)[:, None, None]

    def gather(self, table, boxes, base, stride, height, width):
        """`(N, oh, ow, C)` RoIAlign of `(N, 4)` boxes (image pixels) by
        gathering their samples from `table`, maps flattened to `(rows, C)`:
        box n's map starts at row `base[n]`, has size `height × width` and
        `stride` (numbers, or `(N, 1)` tensors when each box has its own
        level). A fixed sampling ratio gathers one sample of every bin at a
        time (`(N, oh, ow, C)` per gather, no strided reduction); the
        adaptive one a row of samples per bin at a time (its bound can be
        large: few gathers, memory growing along one axis only)."""
        oh, ow = self.output_size
        channels = table.shape[-1]
        rows, cols = self._sample_boxes(boxes / stride, height, width)
        y_low, y_high, wy_low, wy_high, y_count, sr_y = rows
        x_low, x_high, wx_low, wx_high, x_count, sr_x = cols
        y_low, y_high, wy_low, wy_high = (
            ops.reshape(t, (-1, oh, sr_y)) for t in (y_low, y_high, wy_low, wy_high)
        )
        x_low, x_high, wx_low, wx_high = (
            ops.reshape(t, (-1, ow, sr_x)) for t in (x_low, x_high, wx_low, wx_high)
        )
        chunk = 1 if self.sampling_ratio > 0 else sr_x
        width = ops.cast(width, "int32")
        dtype = table.dtype
        pooled = None
        for sy in range(sr_y):
            for first in range(0, sr_x, chunk):
                pick = slice(first, first + chunk)
                for rows, wy in ((y_low, wy_low), (y_high, wy_high)):
                    row_start = base[:, None] + rows[:, :, sy] * width
                    for cols, wx in ((x_low, wx_low), (x_high, wx_high)):
                        cols = ops.reshape(cols[:, :, pick], (-1, ow * chunk))
                        wx = ops.reshape(wx[:, :, pick], (-1, ow * chunk))
                        index = row_start[:, :, None] + cols[:, None, :]
                        weight = ops.cast(wy[:, :, sy, None] * wx[:, None, :], dtype)
                        term = ops.take(table, index, axis=0) * weight[..., None]
                        if chunk > 1:
                            term = ops.sum(
                                ops.reshape(term, (-1, oh, ow, chunk, channels)), 3
                            )
                        pooled = term if pooled is None else pooled + term
        if self.sampling_ratio > 0:
            return pooled / float(sr_y * sr_x)
        count = ops.maximum(y_count * x_count, 1.0)
        return pooled / ops.cast(count, dtype)[:, None, None, None]

    def matrix(self, features, boxes, stride):
        """`(B·R, oh, ow, C)` RoIAlign of `(B, R, 4)` boxes (image pixels,
        the same count for every image) from one `(B, H, W, C)` map, as two
        batched matrix products: a bin averages a separable grid of bilinear
        samples, so box r pools `rows_r · F · cols_rᵀ` (`axis_matrix`). Dense
        products instead of gathers: the cost `R·oh·H·W·C` whatever the
        sample count, less than the gathers' on small maps
        (`PyramidRoIAlign._gathers` chooses)."""
        height, width, channels = features.shape[1:4]
        oh, ow = self.output_size
        batch, rois = ops.shape(boxes)[0], boxes.shape[1]
        flat = ops.reshape(boxes, (-1, 4)) * (1.0 / float(stride))
        if self.aligned:
            flat = flat - 0.5
        dtype = features.dtype
        rows = self.axis_matrix(flat[:, 0], flat[:, 2], oh, height)
        cols = self.axis_matrix(flat[:, 1], flat[:, 3], ow, width)
        # Boxes carry no gradient (the gathers' is not taken either).
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

    def _pool(self, features, boxes, box_indices, stride):
        shape = ops.shape(features)
        height, width, channels = shape[1], shape[2], features.shape[-1]
        if features.shape[1] is not None and features.shape[2] is not None:
            height, width = features.shape[1], features.shape[2]
        table = ops.reshape(features, (-1, channels))
        base = box_indices * ops.cast(height * width, "int32")
        return self.gather(table, boxes, base, float(stride), height, width)

    def call(self, inputs):
        features, boxes, box_indices = inputs
        boxes = ops.cast(boxes, "float32")
        box_indices = ops.cast(box_indices, "int32")
        if isinstance(features, (list, tuple)):
            return [
                self._pool(ops.cast(f, self.compute_dtype), boxes, box_indices, s)
                for f, s in zip(features, self.strides, strict=True)
            ]
        return self._pool(
            ops.cast(features, self.compute_dtype), boxes, box_indices, self.strides
        )

    def compute_output_shape(self, input_shape):
        feature_shapes, boxes_shape, _ = self._split_shapes(input_shape)
        shapes = [
            (boxes_shape[0], *self.output_size, shape[-1]) for shape in feature_shapes
        ]
        return shapes if _is_shape_list(input_shape[0]) else shapes[0]

    def get_config(self):
        return {
            **super().get_config(),
            "output_size": self.output_size,
            "sampling_ratio": self.sampling_ratio,
            "strides": self.strides,
            "aligned": self.aligned,
            "max_sampling_ratio": self.max_sampling_ratio,
        }


@keras.saving.register_keras_serializable(package="kseg")
class AdaptiveFeaturePooling(KsegLayer):
    """Adaptive feature pooling: per-level first layer, then element-wise fusion.

    PANet section 3.2 (Figure 1(c), Table 4). Every proposal is pooled from
    every level; each level's grid goes through its own first parameter layer
    — conv1 of the mask head (`"conv"`: conv3×3 + ReLU) or fc1 of the box head
    (`"fc"`: flatten + dense + ReLU) — and the results are fused element-wise
    across levels (max, the paper's choice, or sum). The shared remaining
    layers of the head follow this layer.

    Example:
    >>> layer = AdaptiveFeaturePooling(8, fusion="max", layer_type="conv")
    >>> grids = [np.zeros((5, 14, 14, 4)) for _ in range(4)]
    >>> tuple(layer(grids).shape)
    (5, 14, 14, 8)

    Args:
        filters: int. Channels (`"conv"`) or units (`"fc"`) of each level's
            first layer.
        fusion: str. `"max"` or `"sum"`. Defaults to `"max"`.
        layer_type: str. `"conv"` (mask head) or `"fc"` (box head).
            Defaults to `"conv"`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List of 4D tensors `(R, oh, ow, C)`, one per level, all the same shape
        (e.g. the list output of `RoIAlign`).

    Output shape:
        `(R, oh, ow, filters)` for `"conv"`, `(R, filters)` for `"fc"`.
    """

    def __init__(self, filters, fusion="max", layer_type="conv", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        if self.filters < 1:
            raise ValueError(f"filters must be a positive int, got {filters}")
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(layer_type, ("conv", "fc"), "layer_type")
        self.fusion = fusion
        self.layer_type = layer_type

    def build(self, input_shape):
        _check_shape_list(input_shape, self.name, 1)
        first = tuple(input_shape[0][1:])
        for i, shape in enumerate(input_shape):
            check_channels(shape, f"{self.name} inputs[{i}]")
            if tuple(shape[1:]) != first:
                raise ValueError(
                    f"{self.name}: every level must have the same grid shape, "
                    f"got {first} (level 0) and {tuple(shape[1:])} (level {i})"
                )
        if self.layer_type == "fc" and None in first:
            raise ValueError(
                f"{self.name}: layer_type='fc' needs a static grid shape, got "
                f"{input_shape[0]}"
            )
        self.level_layers = []
        for i, shape in enumerate(input_shape):
            if self.layer_type == "conv":
                layer = _conv(self.filters, 3, f"level_{i}", self.dtype_policy)
                layer.build(shape)
            else:
                layer = keras.layers.Dense(
                    self.filters,
                    activation="relu",
                    dtype=self.dtype_policy,
                    name=f"level_{i}",
                )
                layer.build((shape[0], int(np.prod(first))))
            self.level_layers.append(layer)

    def call(self, inputs, training=None):
        fused = None
        for grid, layer in zip(inputs, self.level_layers, strict=True):
            if self.layer_type == "fc":
                # A static width, because TF cannot infer -1 for zero RoIs.
                grid = ops.reshape(grid, (ops.shape(grid)[0], layer.kernel.shape[0]))
            out = layer(grid)
            if fused is None:
                fused = out
            elif self.fusion == "max":
                fused = ops.maximum(fused, out)
            else:
                fused = fused + out
        return fused

    def compute_output_shape(self, input_shape):
        shape = input_shape[0]
        if self.layer_type == "fc":
            return (shape[0], self.filters)
        return (*shape[:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "fusion": self.fusion,
            "layer_type": self.layer_type,
        }
