"""SegModel's structured patch prediction, distance-aware context CRF and
learnable score upsampling.

Shen et al., "Semantic segmentation via structured patch prediction, context
CRF and guidance CRF" (CVPR 2017), sections 3 and 4.
"""

import keras
import numpy as np
from keras import ops

from kseg.layers.common import (
    KsegLayer,
    check_channels,
    check_positive_int,
    check_rank,
    depth_to_space,
)


def _box_mean(x, size):
    """Mean of NHWC `x` over `size × size` windows (stride 1) clipped at the
    border: each sum is divided by the true number of in-image pixels.

    "same" average pooling excludes the padding from the count on both
    backends (TF's AvgPool and its XLA lowering; Keras-JAX divides by pooled
    window counts), which the NumPy-reference tests check with windows larger
    than the image. `size == 1` returns `x` unchanged.
    """
    if size == 1:
        return x
    return ops.average_pool(x, size, strides=1, padding="same")


def bilinear_upsampling_kernel(factor):
    """The 1D kernel of a stride-`factor` transposed convolution ("same"
    padding) that equals `kseg.layers.common.resize`'s ×`factor` bilinear
    upsampling (half-pixel centres).

    Output pixel `o` samples the input at `(o + 0.5) / factor - 0.5`, so
    input pixel `i` contributes `max(0, 1 - |o + 0.5 - factor·(i + 0.5)| /
    factor)`; "same" padding puts that weight at kernel tap
    `t = o - factor·i + (size - factor) // 2`. The kernel has
    `size = 2·factor - factor % 2` taps (the nonzero ones), e.g. `[1, 3, 3,
    1] / 4` for ×2 and `[1, 3, 5, 7, 7, 5, 3, 1] / 8` for ×4.
    """
    size = 2 * factor - factor % 2
    taps = np.arange(size)
    return 1.0 - np.abs(taps - (size - 1) / 2) / factor


@keras.saving.register_keras_serializable(package="kseg")
class LearnableUpsampling(KsegLayer):
    """×`factor` upsampling by a learnable transposed convolution per channel,
    initialised to bilinear interpolation.

    SegModel (Shen et al., CVPR 2017, Sec. 2, before Eq. 5) brings the score
    map to ¼ resolution "by transposed convolution with learnable
    parameters" before the guidance CRF. Each channel (class) has its own
    `k × k` kernel (`k = 2·factor - factor % 2`, stride `factor`, no bias, no
    mixing between channels: a depthwise transposed convolution, the FCN
    deconvolution with one group per class), initialised to the outer product
    of `bilinear_upsampling_kernel(factor)`.

    The input is first padded by one pixel on every side with copies of its
    edge (and the `factor` output pixels that padding adds per side are
    cropped). With that padding, the initial layer equals
    `resize(x, (factor·h, factor·w))` — bilinear, half-pixel centres,
    clamped at the border — at every output pixel, borders included (to
    float rounding); with zero padding the outer `factor // 2` rows and
    columns would be darker. A trained kernel is applied the same way: the
    border sees the edge values continued.

    Example:
    >>> layer = LearnableUpsampling(4)
    >>> layer(np.zeros((2, 8, 8, 21))).shape
    (2, 32, 32, 21)

    Args:
        factor: int. Upsampling factor (the transposed convolution's stride).
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`, channels known.

    Output shape:
        4D tensor `(batch, height·factor, width·factor, channels)`.
    """

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = check_positive_int(factor, "factor")
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        channels = check_channels(input_shape, f"{self.name} input")
        taps = bilinear_upsampling_kernel(self.factor)
        bilinear = np.repeat(np.outer(taps, taps)[:, :, None], channels, axis=-1)
        self.kernel = self.add_weight(
            name="kernel",
            shape=bilinear.shape,
            initializer=lambda shape, dtype=None: ops.convert_to_tensor(
                bilinear, dtype=dtype
            ),
        )

    def call(self, inputs):
        f = self.factor
        # One edge pixel on every side: the taps that would read zeros at the
        # border read the edge value, as `resize`'s clamped sampling does.
        x = ops.concatenate([inputs[:, :1], inputs, inputs[:, -1:]], axis=1)
        x = ops.concatenate([x[:, :, :1], x, x[:, :, -1:]], axis=2)
        kernel = ops.cast(self.kernel, self.compute_dtype)
        channels = kernel.shape[-1]
        # Depthwise as a diagonal (k, k, out, in) kernel: `ops` has no grouped
        # transposed convolution, and this one converts to TFLite's builtin
        # TRANSPOSE_CONV. The cost (C² per tap) is small beside the encoder.
        kernel = kernel[:, :, :, None] * ops.eye(channels, dtype=kernel.dtype)
        x = ops.conv_transpose(x, kernel, strides=f, padding="same")
        return x[:, f:-f, f:-f]

    def compute_output_shape(self, input_shape):
        f = self.factor
        height, width = input_shape[1], input_shape[2]
        return (
            input_shape[0],
            None if height is None else height * f,
            None if width is None else width * f,
            input_shape[3],
        )

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="kseg")
class StructuredPatchPrediction(KsegLayer):
    """Predicts an `n × n` patch of class logits per position (depth-to-space).

    Structured patch prediction of SegModel (Shen et al., CVPR 2017, Sec. 3.2):
    instead of one C-vector per feature-map position, a convolution predicts
    `C·n·n` logits that are rearranged into an `n × n` patch, so the output has
    `n×` the input resolution. The rearrangement is `depth_to_space` ("DCR",
    as `tf.nn.depth_to_space`): conv output channel `(a·n + b)·C + c` at
    position `(i, j)` becomes the logit of class `c` at output pixel
    `(i·n + a, j·n + b)`.

    Example:
    >>> layer = StructuredPatchPrediction(21, patch_size=2)
    >>> layer(np.zeros((2, 8, 8, 16))).shape
    (2, 16, 16, 21)

    Args:
        num_classes: int. Number of classes `C`.
        patch_size: int. Side `n` of the predicted patch (the upsampling
            factor). Defaults to `2`.
        kernel_size: int. Kernel size of the prediction convolution ("same"
            padding, with bias). Defaults to `1`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        4D tensor `(batch, height·n, width·n, num_classes)` of logits.
    """

    def __init__(self, num_classes, patch_size=2, kernel_size=1, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.patch_size = check_positive_int(patch_size, "patch_size")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        check_channels(input_shape, f"{self.name} input")
        self.conv = keras.layers.Conv2D(
            self.num_classes * self.patch_size**2,
            self.kernel_size,
            padding="same",
            dtype=self.dtype_policy,
            name="conv",
        )
        self.conv.build(input_shape)

    def call(self, inputs, training=None):
        return depth_to_space(self.conv(inputs), self.patch_size)

    def compute_output_shape(self, input_shape):
        n = self.patch_size
        height, width = input_shape[1], input_shape[2]
        return (
            input_shape[0],
            None if height is None else height * n,
            None if width is None else width * n,
            self.num_classes,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "patch_size": self.patch_size,
            "kernel_size": self.kernel_size,
        }


@keras.saving.register_keras_serializable(package="kseg")
class ContextCRF(KsegLayer):
    """Distance-aware high-order context CRF with learned messages.

    The context CRF of SegModel (Shen et al., CVPR 2017, Sec. 4, Fig. 3,
    eq. 9–10), iterated mean-field style with shared weights from
    `z⁰ = z_u`:

        p = softmax(z)                  (float32, then the compute dtype)
        ctx = concat([p, features])
        h = Σ_g conv3×3_{dilation d_g}(box_mean_{s_g}(ctx))   (with bias)
        message = conv1×1(relu(h))      (with bias, num_classes outputs)
        z = z_u − message

    Group `g` averages the context over `s_g × s_g` boxes (clipped at the
    border, divided by the true pixel count) and gathers the averages at the
    3×3 offsets `{−d_g, 0, d_g}²` ("hole algorithm"): near context is pooled
    finely, remote context coarsely. The defaults cover 3, 9 and 27 positions,
    the paper's ≈ 28 × 28 field.

    Weights, in order: for each group its conv kernel `(3, 3, C + F, filters)`
    and bias (input channels: the C probabilities, then the F features), then
    the message conv kernel `(1, 1, filters, C)` and bias.

    Example:
    >>> crf = ContextCRF(21, filters=32)
    >>> features, unary = np.zeros((2, 16, 16, 64)), np.zeros((2, 16, 16, 21))
    >>> crf([features, unary]).shape
    (2, 16, 16, 21)

    Args:
        num_classes: int. Number of classes `C`.
        box_sizes: tuple of positive odd ints. Box-filter size per group.
            Defaults to `(1, 3, 9)`.
        dilations: tuple of positive ints, same length as `box_sizes`.
            Dilation of each group's 3×3 conv. Defaults to `(1, 3, 9)`.
        filters: int. Channels of the group convs. Defaults to `64`.
        iterations: int. Number of message-passing iterations (shared
            weights). Defaults to `2`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List `[features, unary_logits]`: 4D tensors `(batch, height, width, F)`
        and `(batch, height, width, num_classes)`.

    Output shape:
        4D tensor `(batch, height, width, num_classes)` of refined logits.
    """

    def __init__(
        self,
        num_classes,
        box_sizes=(1, 3, 9),
        dilations=(1, 3, 9),
        filters=64,
        iterations=2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.box_sizes = tuple(
            check_positive_int(size, "each box size") for size in box_sizes
        )
        self.dilations = tuple(
            check_positive_int(dilation, "each dilation") for dilation in dilations
        )
        if not self.box_sizes:
            raise ValueError("box_sizes must name at least one group")
        if len(self.box_sizes) != len(self.dilations):
            raise ValueError(
                "box_sizes and dilations must have the same length, got "
                f"{len(self.box_sizes)} and {len(self.dilations)}"
            )
        if any(size % 2 == 0 for size in self.box_sizes):
            raise ValueError(f"box sizes must be odd, got {self.box_sizes}")
        self.filters = check_positive_int(filters, "filters")
        self.iterations = check_positive_int(iterations, "iterations")
        self.input_spec = [
            keras.layers.InputSpec(ndim=4),
            keras.layers.InputSpec(ndim=4),
        ]

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                f"{self.name} expects inputs [features, unary_logits], "
                f"got input_shape={input_shape}"
            )
        features_shape, unary_shape = (tuple(s) for s in input_shape)
        check_rank(features_shape, 4, f"{self.name} features")
        check_rank(unary_shape, 4, f"{self.name} unary logits")
        feature_channels = check_channels(features_shape, f"{self.name} features")
        if unary_shape[-1] != self.num_classes:
            raise ValueError(
                f"{self.name} unary logits must have num_classes={self.num_classes} "
                f"channels, got shape={unary_shape}"
            )
        for axis in (1, 2):
            a, b = features_shape[axis], unary_shape[axis]
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"{self.name} features and unary logits must have the same "
                    f"spatial size, got {features_shape} and {unary_shape}"
                )
        context_shape = features_shape[:3] + (self.num_classes + feature_channels,)
        self.context_convs = []
        for g, dilation in enumerate(self.dilations):
            conv = keras.layers.Conv2D(
                self.filters,
                3,
                dilation_rate=dilation,
                padding="same",
                dtype=self.dtype_policy,
                name=f"context_conv_{g}",
            )
            conv.build(context_shape)
            self.context_convs.append(conv)
        self.message_conv = keras.layers.Conv2D(
            self.num_classes, 1, dtype=self.dtype_policy, name="message_conv"
        )
        self.message_conv.build(features_shape[:3] + (self.filters,))

    def call(self, inputs, training=None):
        features, unary = inputs
        # Box filtering is linear per channel, so the feature half of every
        # averaged context is computed once and reused by all iterations.
        pooled_features = {
            size: _box_mean(features, size) for size in set(self.box_sizes)
        }
        logits = unary
        for _ in range(self.iterations):
            probs = ops.cast(
                ops.softmax(ops.cast(logits, "float32"), axis=-1), self.compute_dtype
            )
            pooled_probs = {
                size: _box_mean(probs, size) for size in set(self.box_sizes)
            }
            hidden = None
            for size, conv in zip(self.box_sizes, self.context_convs, strict=True):
                out = conv(
                    ops.concatenate([pooled_probs[size], pooled_features[size]], -1)
                )
                hidden = out if hidden is None else hidden + out
            logits = unary - self.message_conv(ops.relu(hidden))
        return logits

    def compute_output_shape(self, input_shape):
        features_shape, unary_shape = input_shape
        height = unary_shape[1] if unary_shape[1] is not None else features_shape[1]
        width = unary_shape[2] if unary_shape[2] is not None else features_shape[2]
        batch = unary_shape[0] if unary_shape[0] is not None else features_shape[0]
        return (batch, height, width, self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "box_sizes": self.box_sizes,
            "dilations": self.dilations,
            "filters": self.filters,
            "iterations": self.iterations,
        }
