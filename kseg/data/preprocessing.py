"""The model input of an image: the one preprocessing step of kseg.

Training (`augment`, `eval_transform`), inference (`kseg.inference.predict`)
and export (the SavedModel and TFLite graphs of `kseg.export`) all turn
images into model inputs with `preprocess_images`, so the three cannot drift
apart. The step is deliberately small: RGB as float32 with the 0–255 values
unchanged. Mean/std normalisation is part of the model (the trainer puts a
`Normalization` layer at the start of the encoder, see
`kseg.backbones.prepend_normalization`), so a saved or exported model takes
plain RGB and needs no preprocessing recipe beside it.
"""

import tensorflow as tf


def preprocess_images(images):
    """Turns RGB images into the model input: float32, values in 0–255.

    The values are only cast (uint8 pixels are exact in float32); no
    scaling, no mean subtraction, no channel reordering. Works eagerly and
    on symbolic tensors (`tf.data` maps, `tf.function`) with unknown batch,
    height and width, as long as the rank and the channel count are known.

    Example:

    >>> preprocess_images(np.full((2, 4, 5, 3), 255, "uint8")).dtype
    tf.float32
    >>> float(preprocess_images(np.full((4, 5, 3), 7, "uint8"))[0, 0, 0])
    7.0

    Args:
        images: one image `(H, W, 3)` or a batch `(N, H, W, 3)` of RGB values
            in 0–255: a NumPy array, tensor or nested list of any integer
            dtype (typically uint8) or floating dtype.

    Returns:
        A float32 `tf.Tensor` with the shape and values of `images`.

    Raises:
        ValueError: the rank is not 3 or 4, the last axis does not hold 3
            channels, a known dimension is 0, or the dtype is neither an
            integer nor a floating type (bool, string, complex).
    """
    images = tf.convert_to_tensor(images)
    shape = images.shape
    if shape.rank not in (3, 4):
        raise ValueError(
            "images must have shape (height, width, 3) or (batch, height, width, "
            f"3), got {shape}"
        )
    if shape[-1] != 3:
        raise ValueError(
            f"images must have 3 channels (RGB) on the last axis, got shape {shape}"
        )
    if 0 in shape.as_list():
        raise ValueError(f"images must not be empty, got shape {shape}")
    dtype = images.dtype
    if dtype.is_bool or not (dtype.is_integer or dtype.is_floating):
        raise ValueError(f"images must hold integers or floats, got {dtype.name}")
    return tf.cast(images, tf.float32)
