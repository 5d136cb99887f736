"""Paired image/label transforms for `tf.data` pipelines.

`augment` is the training map: random scale and aspect jitter, padding to the
crop (image with the mean colour, label with `IGNORE_LABEL`), random crop,
horizontal flip and optional colour jitter. `eval_transform` is the evaluation
map. Images are resized bilinearly with half-pixel centres (kseg's resize
convention), labels always with nearest neighbour, so no new label value can
appear. Both start from `preprocess_images` (the model input every kseg
pipeline shares) and return a float32 image in 0–255 and an int32 label.
"""

import math

import tensorflow as tf

from kseg.data.labels import IGNORE_LABEL
from kseg.data.preprocessing import preprocess_images

IMAGENET_MEAN = (123.675, 116.28, 103.53)


def _size_pair(size, what):
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(
            f"{what} must be a positive int or (height, width), got {size}"
        )
    return size


def _range(values, what, low_bound):
    low, high = (float(v) for v in values)
    if not low_bound < low <= high:
        raise ValueError(
            f"{what} must be (low, high) with {low_bound} < low <= high, got {values}"
        )
    return low, high


def _mean(mean):
    mean = tuple(float(m) for m in mean)
    if len(mean) != 3:
        raise ValueError(f"mean must have 3 entries (R, G, B), got {len(mean)}")
    return mean


def _prepare(image, label):
    """The model-input image (`preprocess_images`: float32 `(H, W, 3)`) and
    the int32 `(H, W, 1)` label."""
    image = tf.convert_to_tensor(image)
    label = tf.convert_to_tensor(label)
    if image.shape.rank != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if label.shape.rank == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.shape.rank != 2:
        raise ValueError(
            f"label must have shape (H, W) or (H, W, 1), got {label.shape}"
        )
    return preprocess_images(image), tf.cast(label, tf.int32)[..., None]


def _pad_to(image, label, height, width, mean):
    """Pads bottom/right to at least `(height, width)`: image with `mean`,
    label with `IGNORE_LABEL`."""
    shape = tf.shape(image)
    pad_h = tf.maximum(height - shape[0], 0)
    pad_w = tf.maximum(width - shape[1], 0)
    paddings = [[0, pad_h], [0, pad_w], [0, 0]]
    # A validity mask instead of padding (image − mean) keeps the original
    # pixels bit-exact.
    valid = tf.pad(tf.ones_like(image[..., :1], dtype=tf.bool), paddings)
    image = tf.where(valid, tf.pad(image, paddings), tf.constant(mean, tf.float32))
    label = tf.pad(label, paddings, constant_values=IGNORE_LABEL)
    return image, label


def _color_jitter(image, strengths, seed):
    """Brightness, contrast and saturation factors drawn from `[1 − s, 1 + s]`."""
    brightness, contrast, saturation = strengths
    seeds = tf.random.experimental.stateless_split(seed, 3)

    def factor(strength, s):
        return tf.random.stateless_uniform(
            [], s, max(0.0, 1.0 - strength), 1.0 + strength
        )

    image = image * factor(brightness, seeds[0])
    gray = tf.image.rgb_to_grayscale(image)
    image = (image - tf.reduce_mean(gray)) * factor(
        contrast, seeds[1]
    ) + tf.reduce_mean(gray)
    gray = tf.image.rgb_to_grayscale(image)
    image = (image - gray) * factor(saturation, seeds[2]) + gray
    return tf.clip_by_value(image, 0.0, 255.0)


def augment(
    image,
    label,
    crop_size,
    scale_range=(0.5, 2.0),
    aspect_range=(4 / 5, 5 / 4),
    flip=True,
    color_jitter=None,
    mean=IMAGENET_MEAN,
    seed=None,
):
    """Random training transform of one `(image, label)` pair.

    In order: colour jitter (image only), resize by a scale drawn uniformly from
    `scale_range` and an aspect ratio (width/height change) drawn log-uniformly
    from `aspect_range` (image bilinear, label nearest), pad bottom/right up to
    the crop (image with `mean`, label with 255), random crop, random
    horizontal flip.

    Example:

    >>> ds = make_synthetic("train", 4, 64).as_dataset()
    >>> ds = ds.map(lambda x, y: augment(x, y, crop_size=48))

    Args:
        image: `(H, W, 3)` tensor, any floating or integer dtype, values in
            0–255.
        label: `(H, W)` or `(H, W, 1)` integer tensor.
        crop_size: int or `(height, width)`. Output size.
        scale_range: `(low, high)` resize factors. Defaults to `(0.5, 2.0)`.
        aspect_range: `(low, high)` aspect-ratio factors. Defaults to
            `(4/5, 5/4)`.
        flip: bool. Random horizontal flip with probability 1/2. Defaults to
            True.
        color_jitter: None or `(brightness, contrast, saturation)` strengths s;
            each factor is drawn from `[max(0, 1 − s), 1 + s]`. Defaults to None
            (off, as in the papers' recipes).
        mean: RGB pad value in 0–255. Defaults to the ImageNet mean.
        seed: None or an int tensor of shape `(2,)` for the stateless random
            ops; None draws one from the global generator.

    Returns:
        `(image float32 (crop_h, crop_w, 3), label int32 (crop_h, crop_w))`.
    """
    crop_h, crop_w = _size_pair(crop_size, "crop_size")
    scale_low, scale_high = _range(scale_range, "scale_range", 0.0)
    aspect_low, aspect_high = _range(aspect_range, "aspect_range", 0.0)
    mean = _mean(mean)
    if color_jitter is not None:
        color_jitter = tuple(float(s) for s in color_jitter)
        if len(color_jitter) != 3 or min(color_jitter) < 0:
            raise ValueError(
                "color_jitter must be (brightness, contrast, saturation) "
                f"non-negative strengths, got {color_jitter}"
            )
    image, label = _prepare(image, label)
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)

    if color_jitter is not None:
        image = _color_jitter(image, color_jitter, seeds[5])

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.random.stateless_uniform([], seeds[0], scale_low, scale_high)
    log_aspect = tf.random.stateless_uniform(
        [], seeds[1], math.log(aspect_low), math.log(aspect_high)
    )
    stretch = tf.sqrt(tf.exp(log_aspect))
    new_h = tf.maximum(tf.cast(tf.round(shape[0] * scale / stretch), tf.int32), 1)
    new_w = tf.maximum(tf.cast(tf.round(shape[1] * scale * stretch), tf.int32), 1)
    image = tf.image.resize(image, [new_h, new_w], method="bilinear")
    label = tf.image.resize(label, [new_h, new_w], method="nearest")

    image, label = _pad_to(image, label, crop_h, crop_w, mean)
    shape = tf.shape(image)
    top = tf.random.stateless_uniform(
        [], seeds[2], 0, shape[0] - crop_h + 1, dtype=tf.int32
    )
    left = tf.random.stateless_uniform(
        [], seeds[3], 0, shape[1] - crop_w + 1, dtype=tf.int32
    )
    image = image[top : top + crop_h, left : left + crop_w]
    label = label[top : top + crop_h, left : left + crop_w]

    if flip:
        mirror = tf.random.stateless_uniform([], seeds[4]) < 0.5
        image = tf.where(mirror, image[:, ::-1], image)
        label = tf.where(mirror, label[:, ::-1], label)

    image = tf.ensure_shape(image, [crop_h, crop_w, 3])
    label = tf.ensure_shape(label[..., 0], [crop_h, crop_w])
    return image, label


def augment_dataset(
    dataset, crop_size, *, seed=None, num_parallel_calls=tf.data.AUTOTUNE, **kwargs
):
    """Maps `augment` over a dataset of `(image, label)` pairs.

    With an int `seed`, element i is augmented with the stateless seed
    `(seed, i)`: reproducible whatever the parallelism, and different for each
    element (and for each epoch when the dataset is repeated before this map).

    Args:
        dataset: `tf.data.Dataset` of `(image, label)` pairs.
        crop_size: int or `(height, width)`.
        seed: optional int.
        num_parallel_calls: map parallelism. Defaults to AUTOTUNE.
        **kwargs: further arguments of `augment`.
    """
    if seed is None:
        return dataset.map(
            lambda image, label: augment(image, label, crop_size, **kwargs),
            num_parallel_calls=num_parallel_calls,
        )
    return dataset.enumerate().map(
        lambda index, pair: augment(
            *pair,
            crop_size,
            seed=tf.stack([tf.constant(seed, tf.int64), index]),
            **kwargs,
        ),
        num_parallel_calls=num_parallel_calls,
    )


def eval_transform(image, label, size=None, mode="pad", mean=IMAGENET_MEAN):
    """Evaluation transform of one `(image, label)` pair.

    Args:
        image: `(H, W, 3)` tensor.
        label: `(H, W)` or `(H, W, 1)` integer tensor.
        size: None, int or `(height, width)`. None keeps the size (only casts).
        mode: str. `"pad"` pads bottom/right to `size` (image with `mean`, label
            with 255) and fails on an image larger than `size`; `"resize"`
            resizes to `size` (image bilinear, label nearest). Defaults to
            `"pad"`.
        mean: RGB pad value in 0–255. Defaults to the ImageNet mean.

    Returns:
        `(image float32 (h, w, 3), label int32 (h, w))`.
    """
    if mode not in ("pad", "resize"):
        raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")
    mean = _mean(mean)
    image, label = _prepare(image, label)
    if size is None:
        return image, label[..., 0]
    height, width = _size_pair(size, "size")
    if mode == "resize":
        image = tf.image.resize(image, [height, width], method="bilinear")
        label = tf.image.resize(label, [height, width], method="nearest")
    else:
        fits = tf.debugging.assert_less_equal(
            tf.shape(image)[:2],
            tf.constant([height, width]),
            message=f"eval_transform(mode='pad'): image exceeds {height}x{width}",
        )
        with tf.control_dependencies([fits]):
            image, label = _pad_to(image, label, height, width, mean)
    image = tf.ensure_shape(image, [height, width, 3])
    label = tf.ensure_shape(label[..., 0], [height, width])
    return image, label
