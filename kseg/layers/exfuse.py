"""ExFuse layers: the GCN decoder blocks and the five ExFuse improvements.

Zhang et al., "ExFuse: Enhancing Feature Fusion for Semantic Segmentation"
(ECCV 2018), built on Peng et al., "Large Kernel Matters" (CVPR 2017).
"""

import numbers

import keras
from keras import ops

from kseg.layers.common import (
    ConvBNReLU,
    KsegLayer,
    check_channels,
    check_rank,
    depth_to_space,
    resize_like,
)


def _check_positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _conv(filters, kernel_size, dtype, name):
    return keras.layers.Conv2D(
        filters, kernel_size, padding="same", dtype=dtype, name=name
    )


@keras.saving.register_keras_serializable(package="kseg")
class GlobalConvolution(KsegLayer):
    """Global convolution: two separable large-kernel branches, summed.

    The GCN block of Peng et al., "Large Kernel Matters" (CVPR 2017, Fig. 2),
    the per-level block of the ExFuse baseline (ExFuse Sec. 3, Fig. 2). One
    branch applies a `k×1` then a `1×k` convolution, the other a `1×k` then a
    `k×1` convolution; their outputs are added. The convolutions have biases
    and "same" padding, with no normalization or activation.

    Example:
    >>> layer = GlobalConvolution(8, kernel_size=7)
    >>> tuple(layer(np.zeros((2, 16, 16, 32))).shape)
    (2, 16, 16, 8)

    Args:
        filters: int. Output channels of every convolution.
        kernel_size: int. The large kernel size `k`. Defaults to `15`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        4D tensor `(batch, height, width, filters)`.
    """

    def __init__(self, filters, kernel_size=15, **kwargs):
        super().__init__(**kwargs)
        self.filters = _check_positive_int(filters, "filters")
        self.kernel_size = _check_positive_int(kernel_size, "kernel_size")
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        check_channels(input_shape, f"{self.name} input")
        k, dtype = self.kernel_size, self.dtype_policy
        self.conv_a1 = _conv(self.filters, (k, 1), dtype, "conv_a1")
        self.conv_a2 = _conv(self.filters, (1, k), dtype, "conv_a2")
        self.conv_b1 = _conv(self.filters, (1, k), dtype, "conv_b1")
        self.conv_b2 = _conv(self.filters, (k, 1), dtype, "conv_b2")
        output_shape = self.compute_output_shape(input_shape)
        self.conv_a1.build(input_shape)
        self.conv_a2.build(output_shape)
        self.conv_b1.build(input_shape)
        self.conv_b2.build(output_shape)

    def call(self, inputs):
        branch_a = self.conv_a2(self.conv_a1(inputs))
        branch_b = self.conv_b2(self.conv_b1(inputs))
        return branch_a + branch_b

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
        }


@keras.saving.register_keras_serializable(package="kseg")
class BoundaryRefinement(KsegLayer):
    """Boundary refinement: a residual block of two 3×3 convolutions.

    The BR block of "Large Kernel Matters" (Fig. 2), used after every global
    convolution and every top-down fusion in the ExFuse decoder (ExFuse
    Fig. 2): `x + conv3×3(relu(conv3×3(x)))`. Both convolutions keep the input
    channel count and have biases.

    Example:
    >>> layer = BoundaryRefinement()
    >>> tuple(layer(np.zeros((2, 16, 16, 8))).shape)
    (2, 16, 16, 8)

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        Same as the input.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        channels = check_channels(input_shape, f"{self.name} input")
        self.conv1 = _conv(channels, 3, self.dtype_policy, "conv1")
        self.conv2 = _conv(channels, 3, self.dtype_policy, "conv2")
        self.conv1.build(input_shape)
        self.conv2.build(input_shape)

    def call(self, inputs):
        return inputs + self.conv2(ops.relu(self.conv1(inputs)))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package="kseg")
class SemanticEmbeddingBranch(KsegLayer):
    """Semantic embedding branch: gates a low-level feature with higher ones.

    ExFuse Sec. 3.1, Fig. 4 (SEB): for the features `[x_l, x_{l+1}, ..., x_L]`
    of one level and every level above it,
    `F = conv3×3(x_l) ⊙ Π_{m>l} resize(conv3×3(x_m), size of x_l)`, where the
    resize is kseg's bilinear half-pixel convention. Each input has its own
    3×3 convolution (with bias) to `filters` channels.

    Example:
    >>> layer = SemanticEmbeddingBranch(8)
    >>> low, high = np.zeros((2, 16, 16, 4)), np.zeros((2, 8, 8, 6))
    >>> tuple(layer([low, high]).shape)
    (2, 16, 16, 8)

    Args:
        filters: int. Output channels of every convolution.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List of at least two 4D tensors `[(batch, h_l, w_l, c_l), ...]`, the
        first the level being fused, the others higher levels (any sizes and
        channel counts).

    Output shape:
        4D tensor `(batch, h_l, w_l, filters)`.
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = _check_positive_int(filters, "filters")

    def build(self, input_shape):
        self._check_input_shapes(input_shape)
        self.convs = []
        for index, shape in enumerate(input_shape):
            conv = _conv(self.filters, 3, self.dtype_policy, f"conv_{index}")
            conv.build(shape)
            self.convs.append(conv)

    def _check_input_shapes(self, input_shape):
        is_list = isinstance(input_shape, (list, tuple)) and all(
            isinstance(shape, (list, tuple)) for shape in input_shape
        )
        if not is_list or len(input_shape) < 2:
            raise ValueError(
                f"{self.name} expects a list of at least 2 tensors "
                f"[x_l, x_l+1, ...], got input shape {input_shape}"
            )
        for index, shape in enumerate(input_shape):
            check_rank(shape, 4, f"{self.name} input {index}")
            check_channels(shape, f"{self.name} input {index}")

    def call(self, inputs):
        low = inputs[0]
        output = self.convs[0](low)
        for conv, high in zip(self.convs[1:], inputs[1:], strict=True):
            output = output * resize_like(conv(high), low)
        return output

    def compute_output_shape(self, input_shape):
        self._check_input_shapes(input_shape)
        return (*input_shape[0][:3], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="kseg")
class SubPixelUpsample(KsegLayer):
    """Parameter-free sub-pixel upsampling (depth-to-space).

    The upsampling of ExFuse's explicit channel resolution embedding (ECRE,
    Sec. 3.2, Fig. 5): channels `C·s²` are rearranged into an `s×` larger map
    with `C` channels, so an auxiliary loss on the result acts directly on the
    channels. Uses the `tf.nn.depth_to_space` ("DCR") ordering:
    `out[n, i·s + a, j·s + b, c] = x[n, i, j, (a·s + b)·C + c]`.

    Example:
    >>> layer = SubPixelUpsample(2)
    >>> tuple(layer(np.zeros((2, 8, 8, 12))).shape)
    (2, 16, 16, 3)

    Args:
        scale: int. Upsampling factor `s`. Defaults to `2`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`, channels divisible by
        `scale**2`.

    Output shape:
        4D tensor `(batch, height * scale, width * scale, channels / scale**2)`.
    """

    def __init__(self, scale=2, **kwargs):
        super().__init__(**kwargs)
        self.scale = _check_positive_int(scale, "scale")
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        channels = check_channels(input_shape, f"{self.name} input")
        if channels % (self.scale**2):
            raise ValueError(
                f"{self.name} needs channels divisible by scale**2="
                f"{self.scale**2}, got {channels} channels"
            )

    def call(self, inputs):
        return depth_to_space(inputs, self.scale)

    def compute_output_shape(self, input_shape):
        s = self.scale
        batch, height, width, channels = input_shape
        return (
            batch,
            None if height is None else height * s,
            None if width is None else width * s,
            None if channels is None else channels // (s * s),
        )

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="kseg")
class DenselyAdjacentPrediction(KsegLayer):
    """Densely adjacent prediction: each pixel averages its neighbours' votes.

    ExFuse Sec. 3.2, Fig. 6 (DAP). The `C·k²` input channels hold, for every
    class `c`, `k²` maps; map `(l, m)` (channel `c·k² + l·k + m`) at a pixel
    predicts class `c` at the pixel offset by `(⌊k/2⌋ − l, ⌊k/2⌋ − m)`. The
    result averages the `k²` predictions that land on each pixel:
    `r[i, j, c] = (1/k²) Σ_{l,m<k} x[i + l − ⌊k/2⌋, j + m − ⌊k/2⌋, c·k² + l·k + m]`,
    where positions outside the image contribute zero (the divisor stays
    `k²` at the border). Has no weights.

    Example:
    >>> layer = DenselyAdjacentPrediction(window_size=3)
    >>> tuple(layer(np.zeros((2, 16, 16, 21 * 9))).shape)
    (2, 16, 16, 21)

    Args:
        window_size: int. The odd window size `k`. Defaults to `3`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, classes * window_size**2)`.

    Output shape:
        4D tensor `(batch, height, width, classes)`.
    """

    def __init__(self, window_size=3, **kwargs):
        super().__init__(**kwargs)
        self.window_size = _check_positive_int(window_size, "window_size")
        if self.window_size % 2 == 0:
            raise ValueError(
                f"window_size must be odd so the window has a centre, got {window_size}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        channels = check_channels(input_shape, f"{self.name} input")
        groups = self.window_size**2
        if channels % groups:
            raise ValueError(
                f"{self.name} needs channels divisible by window_size**2="
                f"{groups} (classes × window positions), got {channels} channels"
            )

    def call(self, inputs):
        k = self.window_size
        half = k // 2
        padded = ops.pad(inputs, ((0, 0), (half, half), (half, half), (0, 0)))
        total = None
        for l in range(k):
            # Static slice bounds (negative ends) keep the graph shape-agnostic
            # and lower to plain StridedSlice ops for XLA and TFLite.
            rows = slice(l, l - 2 * half or None)
            for m in range(k):
                cols = slice(m, m - 2 * half or None)
                term = padded[:, rows, cols, l * k + m :: k * k]
                total = term if total is None else total + term
        return total * ops.cast(1.0 / (k * k), total.dtype)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        groups = self.window_size**2
        return (
            *input_shape[:3],
            None if channels is None else channels // groups,
        )

    def get_config(self):
        return {**super().get_config(), "window_size": self.window_size}


@keras.saving.register_keras_serializable(package="kseg")
class SemanticSupervisionHead(KsegLayer):
    """Semantic supervision head: an auxiliary classifier on a backbone stage.

    ExFuse Sec. 3.1, Fig. 3 (SS): two 3×3 conv–BN–ReLU units, global average
    pooling and a dense classifier, attached to the tail of a backbone stage
    while pretraining for classification. Returns the class logits and the
    second convolution's feature map, which the paper uses as the stage's
    feature when fine-tuning for segmentation (+1.5 mIoU, Table 3).

    Example:
    >>> head = SemanticSupervisionHead(10, filters=16)
    >>> logits, feature = head(np.zeros((2, 8, 8, 32)))
    >>> tuple(logits.shape), tuple(feature.shape)
    ((2, 10), (2, 8, 8, 16))

    Args:
        num_classes: int. Number of classification logits.
        filters: int or `None`. Channels of both convolutions; `None` keeps
            the input channel count. Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        Tuple `(logits, feature)`: logits `(batch, num_classes)` and feature
        `(batch, height, width, filters)`.
    """

    def __init__(self, num_classes, filters=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.filters = (
            None if filters is None else _check_positive_int(filters, "filters")
        )
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        channels = check_channels(input_shape, f"{self.name} input")
        width = channels if self.filters is None else self.filters
        dtype = self.dtype_policy
        self.conv1 = ConvBNReLU(width, 3, dtype=dtype, name="conv1")
        self.conv2 = ConvBNReLU(width, 3, dtype=dtype, name="conv2")
        self.pool = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="pool")
        self.classifier = keras.layers.Dense(
            self.num_classes, dtype=dtype, name="classifier"
        )
        self.conv1.build(input_shape)
        feature_shape = self.conv1.compute_output_shape(input_shape)
        self.conv2.build(feature_shape)
        self.classifier.build((input_shape[0], width))

    def call(self, inputs, training=None):
        feature = self.conv2(self.conv1(inputs, training=training), training=training)
        logits = self.classifier(self.pool(feature))
        return logits, feature

    def compute_output_shape(self, input_shape):
        width = input_shape[-1] if self.filters is None else self.filters
        return (input_shape[0], self.num_classes), (*input_shape[:3], width)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "filters": self.filters,
        }
