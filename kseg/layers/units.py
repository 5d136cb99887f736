"""The conv + normalization units the PANet system's heads are made of."""

import keras
from keras import ops

NORMALIZATIONS = (None, "batch", "sync_batch")


def normalization_layer(normalization, name, dtype):
    return keras.layers.BatchNormalization(
        synchronized=normalization == "sync_batch", dtype=dtype, name=name
    )


def check_normalization(normalization):
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


def conv_and_norm(owner, filters, kernel_size, name, normalization, **kwargs):
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
        norm = normalization_layer(normalization, f"{name}_bn", owner.dtype_policy)
    return conv, norm


def build_unit(layer, norm, shape):
    layer.build(shape)
    shape = layer.compute_output_shape(shape)
    if norm is not None:
        norm.build(shape)
    return shape


def apply_unit(layer, norm, x, training, relu=True):
    x = layer(x)
    if norm is not None:
        x = norm(x, training=training)
    return ops.relu(x) if relu else x
