"""Building blocks shared by the paper layers: one resize convention, a
conv–BN–ReLU block, the base class of every kseg layer and input validation
with clear error messages."""

import difflib
import inspect

import keras
import numpy as np
from keras import ops

# Private API: Keras <= 3.15 has no public resize to a traced (dynamic) size.
from keras.src import backend as keras_backend


def resize(x, size, interpolation="bilinear"):
    """Resizes an NHWC tensor to `size` — kseg's one resize convention.

    Bilinear with half-pixel centres and no antialiasing (the Keras default,
    `align_corners=False` in PyTorch terms). Labels must use
    `interpolation="nearest"`.

    Args:
        x: tensor of shape `(N, H, W, C)`.
        size: `(height, width)` of the result; entries may be symbolic.
        interpolation: `"bilinear"` or `"nearest"`.
    """
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(
            f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}"
        )
    if all(isinstance(s, (int, np.integer)) for s in size):
        return ops.image.resize(
            x,
            size,
            interpolation=interpolation,
            antialias=False,
            data_format="channels_last",
        )
    # `ops.image.resize` validates `size > 0` in Python, which a traced
    # (dynamic) size cannot answer inside `tf.function`; the backend kernel
    # itself takes tensor sizes, so call it directly.
    return keras_backend.image.resize(
        x,
        size,
        interpolation=interpolation,
        antialias=False,
        data_format="channels_last",
    )


def resize_like(x, reference, interpolation="bilinear"):
    """Resizes `x` to the spatial size of `reference` (both NHWC)."""
    shape = ops.shape(reference)
    return resize(x, (shape[1], shape[2]), interpolation=interpolation)


def depth_to_space(x, block_size):
    """Rearranges channels into space: `(N, H, W, C·s²)` → `(N, H·s, W·s, C)`.

    Same ordering as `tf.nn.depth_to_space` ("DCR"):
    `out[n, i·s + a, j·s + b, c] = x[n, i, j, (a·s + b)·C + c]`.
    Written as reshape/transpose so it runs on every backend and converts to
    TFLite builtins.
    """
    s = int(block_size)
    shape = ops.shape(x)
    h, w, channels = shape[1], shape[2], x.shape[-1]
    if channels is None or channels % (s * s):
        raise ValueError(
            f"depth_to_space needs channels divisible by block_size**2={s * s}, "
            f"got {channels}"
        )
    c = channels // (s * s)
    x = ops.reshape(x, (-1, h, w, s, s, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, h * s, w * s, c))


def check_rank(shape, rank, what):
    """Raises ValueError unless `shape` has `rank` dimensions."""
    if shape is None or len(shape) != rank:
        got = "unknown rank" if shape is None else f"rank {len(shape)}"
        raise ValueError(
            f"{what} must have rank {rank} (N, H, W, C), got {got}: shape={shape}"
        )


def check_choice(value, choices, what):
    """Raises ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"Unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def check_positive_int(value, what):
    """Returns `value` as an int, or raises `ValueError` naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def check_input_and_reference(input_shape, what):
    """Raises ValueError unless `input_shape` is a list `[x, reference]` of
    two rank-4 shapes; `what` names the layer in the message."""
    if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
        raise ValueError(
            f"{what} takes a list [x, reference] of two tensors, got "
            f"input_shape={input_shape}"
        )
    check_rank(input_shape[0], 4, f"{what} input x")
    check_rank(input_shape[1], 4, f"{what} reference")


def check_channels(shape, what):
    """Returns the static channel count of an NHWC shape or raises ValueError."""
    if shape[-1] is None:
        raise ValueError(f"{what} needs a known channel dimension, got shape={shape}")
    return int(shape[-1])


def check_keyword_arguments(owner, kwargs, accepted):
    """Raises `TypeError` naming the first entry of `kwargs` not in `accepted`.

    `keras.layers.Layer` raises `ValueError` for unknown keyword arguments and
    a functional `keras.Model` drops them silently (Keras 3.15), so
    `PAN(backbone, 3, filtrs=7)` would build a default PAN. kseg raises the
    `TypeError` Python raises for any function's unknown keyword, with the
    closest valid name as a hint.

    Args:
        owner: the class whose constructor received `kwargs`; its own
            parameters are offered as suggestions.
        kwargs: dict. The keyword arguments left after the constructor's own.
        accepted: the names the base class takes.
    """
    unknown = [key for key in kwargs if key not in accepted]
    if not unknown:
        return
    own = [
        name
        for name, parameter in inspect.signature(owner.__init__).parameters.items()
        if name != "self"
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    valid = own + sorted(set(accepted) - set(own))
    close = difflib.get_close_matches(unknown[0], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TypeError(
        f"{owner.__name__} got an unexpected keyword argument {unknown[0]!r}"
        f"{hint}; it takes {', '.join(valid)}"
    )


# The keyword arguments of `keras.layers.Layer.__init__` (name, dtype,
# trainable, autocast, activity_regularizer in Keras 3.15), read from its
# public signature.
LAYER_KEYWORD_ARGUMENTS = frozenset(
    name
    for name, parameter in inspect.signature(
        keras.layers.Layer.__init__
    ).parameters.items()
    if parameter.kind == parameter.KEYWORD_ONLY
)


class KsegLayer(keras.layers.Layer):
    """The base class of every kseg layer: a `keras.layers.Layer` whose
    constructor raises `TypeError` for an unknown keyword argument.

    Subclasses pass their remaining `**kwargs` to `super().__init__`, which
    accepts only `keras.layers.Layer`'s own keyword arguments
    (`LAYER_KEYWORD_ARGUMENTS`).
    """

    def __init__(self, **kwargs):
        check_keyword_arguments(type(self), kwargs, LAYER_KEYWORD_ARGUMENTS)
        super().__init__(**kwargs)


@keras.saving.register_keras_serializable(package="kseg")
class ConvBNReLU(KsegLayer):
    """Convolution, batch normalization and an activation, as one layer.

    The "conv–BN–ReLU" unit the papers use everywhere (FPA, GAU, SS heads). The
    convolution has no bias when batch normalization follows it.

    Example:
    >>> block = ConvBNReLU(64, 3)
    >>> block(np.zeros((2, 32, 32, 16))).shape
    (2, 32, 32, 64)

    Args:
        filters: int. Output channels.
        kernel_size: int or tuple of 2 ints. Convolution kernel size.
        strides: int or tuple of 2 ints. Convolution strides. Defaults to `1`.
        dilation_rate: int or tuple of 2 ints. Defaults to `1`.
        use_batch_norm: bool. Whether batch normalization follows the conv.
            Defaults to `True`.
        activation: str or `None`. Activation after normalization.
            Defaults to `"relu"`.
        kernel_initializer: Conv kernel initializer. Defaults to `"he_normal"`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        4D tensor `(batch, new_height, new_width, filters)` ("same" padding).
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        dilation_rate=1,
        use_batch_norm=True,
        activation="relu",
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = kernel_size
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.use_batch_norm = bool(use_batch_norm)
        self.activation = activation
        self.kernel_initializer = kernel_initializer
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        check_rank(input_shape, 4, f"{self.name} input")
        self.conv = keras.layers.Conv2D(
            self.filters,
            self.kernel_size,
            strides=self.strides,
            dilation_rate=self.dilation_rate,
            padding="same",
            use_bias=not self.use_batch_norm,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="conv",
        )
        self.conv.build(input_shape)
        conv_shape = self.conv.compute_output_shape(input_shape)
        self.bn = None
        if self.use_batch_norm:
            self.bn = keras.layers.BatchNormalization(
                dtype=self.dtype_policy, name="bn"
            )
            self.bn.build(conv_shape)
        self.act = keras.layers.Activation(
            self.activation, dtype=self.dtype_policy, name="act"
        )

    def call(self, inputs, training=None):
        x = self.conv(inputs)
        if self.bn is not None:
            x = self.bn(x, training=training)
        return self.act(x)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "dilation_rate": self.dilation_rate,
            "use_batch_norm": self.use_batch_norm,
            "activation": self.activation,
            "kernel_initializer": keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)
            )
            if not isinstance(self.kernel_initializer, str)
            else self.kernel_initializer,
        }


@keras.saving.register_keras_serializable(package="kseg")
class ResizeLike(KsegLayer):
    """Resizes a tensor to the spatial size of a reference tensor.

    The layer form of `resize_like`, for functional models whose input size
    is unknown until call time (the size is read inside `call`, where it is
    concrete or dynamic, never `None`).

    Example:
    >>> ResizeLike()([np.zeros((1, 4, 4, 3)), np.zeros((1, 16, 12, 1))]).shape
    (1, 16, 12, 3)

    Args:
        interpolation: str. `"bilinear"` (half-pixel centres) or `"nearest"`.
            Defaults to `"bilinear"`.
        **kwargs: Base layer keyword arguments.

    Input shape:
        List `[x, reference]`: `x` is `(batch, h, w, channels)`, `reference`
        is `(batch, height, width, any)`.

    Output shape:
        `(batch, height, width, channels)`.
    """

    def __init__(self, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        check_choice(interpolation, ("bilinear", "nearest"), "interpolation")
        self.interpolation = interpolation

    def build(self, input_shape):
        check_input_and_reference(input_shape, "ResizeLike")

    def call(self, inputs):
        x, reference = inputs
        return resize_like(x, reference, interpolation=self.interpolation)

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation}
