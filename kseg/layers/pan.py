"""Pyramid Attention Network layers: feature pyramid attention (FPA) and
global attention upsample (GAU) (Li et al., BMVC 2018)."""

import keras
import numpy as np
from keras import ops

from kseg.layers.common import (
    ConvBNReLU,
    KsegLayer,
    check_channels,
    check_choice,
    check_positive_int,
    check_rank,
    resize_like,
)

_POOLINGS = ("avg", "max")
_ATTENTIONS = ("pyramid", "se")


def _check_odd_kernel(value, what):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
        or value % 2 == 0
    ):
        raise ValueError(f"{what} must be a positive odd int, got {value!r}")
    return int(value)


def _halved(size):
    # 2×2 pooling, stride 2, "same" padding keeps ceil(size / 2) positions.
    return None if size is None else (size + 1) // 2


@keras.saving.register_keras_serializable(package="kseg")
class FeaturePyramidAttention(KsegLayer):
    """Feature pyramid attention: pixel-wise attention from a small U-shaped
    pyramid, multiplied into a 1×1 projection of the input.

    Section 3.1 and Figure 3 of "Pyramid Attention Network for Semantic
    Segmentation" (Li et al., BMVC 2018). With `X` the input,
    `d1 = conv_k1(down(X))`, `d2 = conv_k2(down(d1))`, `d3 = conv_k3(down(d2))`,
    `e_i = conv_ki(d_i)`, `u2 = up(e3) + e2`, `u1 = up(u2) + e1`,
    `att = up(u1)` and
    `out = conv1×1(X) ⊙ att + up(conv1×1(GAP(X)))`, where `down` is 2×2
    pooling with stride 2 and "same" padding, `up` is a bilinear
    (half-pixel) resize to the exact size of the target and every conv is
    conv–BN–ReLU with `filters` channels. `attention="se"` is the paper's
    SENet comparison row (Table 1): the pyramid is replaced by
    `att = sigmoid(conv1×1(relu(conv1×1(GAP(X)))))` with a bottleneck of
    `max(filters // 16, 1)` channels (plain convs with bias).

    Example:
    >>> layer = FeaturePyramidAttention(32)
    >>> layer(np.zeros((2, 16, 16, 64))).shape
    (2, 16, 16, 32)

    Args:
        filters: int. Output channels of every convolution.
        kernel_sizes: tuple of 3 positive odd ints. Kernels of the pyramid
            levels, from the largest level (first `down`) to the smallest.
            `(3, 3, 3)` is the paper's "C333" and `(7, 5, 3)` its "C357".
            Defaults to `(7, 5, 3)`.
        pooling: str. `"avg"` or `"max"`, the pooling used by `down`.
            Defaults to `"avg"`.
        global_pooling: bool. Whether the global average pooling branch is
            added to the output. Defaults to `True`.
        attention: str. `"pyramid"` (FPA) or `"se"` (channel attention).
            Defaults to `"pyramid"`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        4D tensor `(batch, height, width, filters)`.
    """

    def __init__(
        self,
        filters,
        kernel_sizes=(7, 5, 3),
        pooling="avg",
        global_pooling=True,
        attention="pyramid",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int(filters, "filters")
        if isinstance(kernel_sizes, (str, bytes)) or not isinstance(
            kernel_sizes, (list, tuple)
        ):
            raise ValueError(
                f"kernel_sizes must be a tuple of 3 positive odd ints, "
                f"got {kernel_sizes!r}"
            )
        if len(kernel_sizes) != 3:
            raise ValueError(
                f"kernel_sizes must be a tuple of 3 positive odd ints, "
                f"got {len(kernel_sizes)} values: {kernel_sizes!r}"
            )
        self.kernel_sizes = tuple(
            _check_odd_kernel(k, f"kernel_sizes[{i}]")
            for i, k in enumerate(kernel_sizes)
        )
        check_choice(pooling, _POOLINGS, "pooling")
        self.pooling = pooling
        self.global_pooling = bool(global_pooling)
        check_choice(attention, _ATTENTIONS, "attention")
        self.attention = attention
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        check_channels(input_shape, f"{self.name} input")
        input_shape = tuple(input_shape)
        pooled_shape = (input_shape[0], 1, 1, input_shape[-1])

        self.main = ConvBNReLU(self.filters, 1, dtype=self.dtype_policy, name="main")
        self.main.build(input_shape)

        self.global_branch = None
        if self.global_pooling:
            self.global_branch = ConvBNReLU(
                self.filters, 1, dtype=self.dtype_policy, name="global_branch"
            )
            self.global_branch.build(pooled_shape)

        self.down_convs = []
        self.level_convs = []
        self.se_reduce = None
        self.se_expand = None
        if self.attention == "pyramid":
            shape = input_shape
            for level, kernel_size in enumerate(self.kernel_sizes, start=1):
                shape = (shape[0], _halved(shape[1]), _halved(shape[2]), shape[3])
                down_conv = ConvBNReLU(
                    self.filters,
                    kernel_size,
                    dtype=self.dtype_policy,
                    name=f"down_conv{level}",
                )
                down_conv.build(shape)
                shape = down_conv.compute_output_shape(shape)
                level_conv = ConvBNReLU(
                    self.filters,
                    kernel_size,
                    dtype=self.dtype_policy,
                    name=f"level_conv{level}",
                )
                level_conv.build(shape)
                self.down_convs.append(down_conv)
                self.level_convs.append(level_conv)
        else:
            self.se_reduce = keras.layers.Conv2D(
                max(self.filters // 16, 1),
                1,
                activation="relu",
                dtype=self.dtype_policy,
                name="se_reduce",
            )
            self.se_reduce.build(pooled_shape)
            self.se_expand = keras.layers.Conv2D(
                self.filters,
                1,
                activation="sigmoid",
                dtype=self.dtype_policy,
                name="se_expand",
            )
            self.se_expand.build(self.se_reduce.compute_output_shape(pooled_shape))

    def _down(self, x):
        if self.pooling == "avg":
            return ops.average_pool(x, 2, strides=2, padding="same")
        return ops.max_pool(x, 2, strides=2, padding="same")

    def _pyramid_attention(self, inputs, training):
        levels = []
        x = inputs
        for down_conv, level_conv in zip(
            self.down_convs, self.level_convs, strict=True
        ):
            x = down_conv(self._down(x), training=training)
            levels.append(level_conv(x, training=training))
        e1, e2, e3 = levels
        u2 = resize_like(e3, e2) + e2
        u1 = resize_like(u2, e1) + e1
        return resize_like(u1, inputs)

    def call(self, inputs, training=None):
        main = self.main(inputs, training=training)
        if self.attention == "pyramid":
            attention = self._pyramid_attention(inputs, training)
        else:
            pooled = ops.mean(inputs, axis=(1, 2), keepdims=True)
            attention = self.se_expand(self.se_reduce(pooled))
        outputs = main * attention
        if self.global_branch is not None:
            pooled = ops.mean(inputs, axis=(1, 2), keepdims=True)
            # Bilinear upsampling of a 1×1 map is a constant, so broadcasting
            # is exact and avoids a resize.
            outputs = outputs + self.global_branch(pooled, training=training)
        return outputs

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_sizes": self.kernel_sizes,
            "pooling": self.pooling,
            "global_pooling": self.global_pooling,
            "attention": self.attention,
        }


@keras.saving.register_keras_serializable(package="kseg")
class GlobalAttentionUpsample(KsegLayer):
    """Global attention upsample: low-level features weighted by the global
    context of the high-level features, plus the upsampled high-level features.

    Section 3.2 and Figure 4 of "Pyramid Attention Network for Semantic
    Segmentation" (Li et al., BMVC 2018). With inputs `[low, high]`,
    `g = relu(BN(conv1×1(GAP(high))))`, `l = BN(conv_k×k(low))` (no ReLU)
    and `out = l ⊙ g + upsample(high')`, where `high'` is `high` projected
    to `filters` channels by a 1×1 conv–BN–ReLU when its channel count
    differs, and `upsample` is a bilinear (half-pixel) resize to the size of
    `low`. Without global context (Table 3, first GAU row)
    `out = l + upsample(high')`.

    Example:
    >>> layer = GlobalAttentionUpsample(32)
    >>> low, high = np.zeros((2, 32, 32, 64)), np.zeros((2, 16, 16, 128))
    >>> layer([low, high]).shape
    (2, 32, 32, 32)

    Args:
        filters: int. Output channels.
        low_kernel_size: int. Positive odd kernel size of the conv that
            reduces the channels of `low` (1 or 3 in the paper's Table 3).
            Defaults to `3`.
        global_context: bool. Whether `l` is weighted by the global context
            `g` of `high`. Defaults to `True`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List of two 4D tensors `[low, high]`: `low` of shape
        `(batch, low_height, low_width, low_channels)` and `high` of shape
        `(batch, high_height, high_width, high_channels)`, usually of lower
        resolution.

    Output shape:
        4D tensor `(batch, low_height, low_width, filters)`.
    """

    def __init__(self, filters, low_kernel_size=3, global_context=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = check_positive_int(filters, "filters")
        self.low_kernel_size = _check_odd_kernel(low_kernel_size, "low_kernel_size")
        self.global_context = bool(global_context)
        self.input_spec = [
            keras.layers.InputSpec(ndim=4),
            keras.layers.InputSpec(ndim=4),
        ]

    def _split_shapes(self, input_shape):
        if (
            not isinstance(input_shape, (list, tuple))
            or len(input_shape) != 2
            or not all(isinstance(s, (list, tuple)) for s in input_shape)
        ):
            raise ValueError(
                f"{self.name} expects a list of two inputs [low, high], "
                f"got input_shape={input_shape}"
            )
        return tuple(input_shape[0]), tuple(input_shape[1])

    def build(self, input_shape):
        low_shape, high_shape = self._split_shapes(input_shape)
        check_rank(low_shape, 4, f"{self.name} low input")
        check_rank(high_shape, 4, f"{self.name} high input")
        check_channels(low_shape, f"{self.name} low input")
        high_channels = check_channels(high_shape, f"{self.name} high input")

        self.low_conv = ConvBNReLU(
            self.filters,
            self.low_kernel_size,
            activation=None,
            dtype=self.dtype_policy,
            name="low_conv",
        )
        self.low_conv.build(low_shape)

        self.context = None
        if self.global_context:
            self.context = ConvBNReLU(
                self.filters, 1, dtype=self.dtype_policy, name="context"
            )
            self.context.build((high_shape[0], 1, 1, high_channels))

        self.high_projection = None
        if high_channels != self.filters:
            self.high_projection = ConvBNReLU(
                self.filters, 1, dtype=self.dtype_policy, name="high_projection"
            )
            self.high_projection.build(high_shape)

    def call(self, inputs, training=None):
        low, high = inputs
        outputs = self.low_conv(low, training=training)
        if self.context is not None:
            pooled = ops.mean(high, axis=(1, 2), keepdims=True)
            outputs = outputs * self.context(pooled, training=training)
        if self.high_projection is not None:
            high = self.high_projection(high, training=training)
        return outputs + resize_like(high, low)

    def compute_output_shape(self, input_shape):
        low_shape, _ = self._split_shapes(input_shape)
        return (*low_shape[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "low_kernel_size": self.low_kernel_size,
            "global_context": self.global_context,
        }
