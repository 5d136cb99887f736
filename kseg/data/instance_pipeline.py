"""`tf.data` pipelines of instance segmentation: augmentation, targets, batches.

The training pipeline yields `(x, y)` batches with static shapes:

- `x = {"images": float32 (B, H, W, 3)}`: RGB in 0–255 (`preprocess_images`),
  content at the top-left, zeros below and right of it;
- `y = {"boxes": float32 (B, M, 4), "classes": int32 (B, M), "masks": uint8
  (B, M, S, S)}`: per instance its box `[y1, x1, y2, x2]` in pixels of the
  augmented image (pixel (i, j) covers `[i, i + 1) × [j, j + 1)`), its class
  in 1..C, and its binary mask resampled inside its own box to S × S; rows
  beyond the image's instances are zeros (class 0 = padding).

Augmentation (training): multi-scale resize (the shorter edge drawn from a
range, the longer edge capped), a random crop where the resized image exceeds
the output size, a horizontal flip, zero padding to the output size. The masks
are resized with the image (bilinear, then ≥ 0.5), cropped and flipped with
it; boxes are recomputed from the transformed masks and instances left with no
pixel are removed. At most M instances are kept per image: extra ones are
dropped with a warning on stderr.

The evaluation pipeline yields `(x, meta)` with what maps predictions back to
the original image, beside the COCO ground truth of its images.
"""

import sys

import tensorflow as tf

from kseg.data.augment import _size_pair
from kseg.data.instances import InstanceDataset
from kseg.data.preprocessing import preprocess_images

SIZE_DIVISOR = 64


def _output_size(output_size):
    height, width = _size_pair(output_size, "output_size")
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
        raise ValueError(
            f"output_size must be multiples of {SIZE_DIVISOR} (the coarsest "
            f"feature stride), got {height}x{width}"
        )
    return height, width


def _check_arguments(short_edge_range, max_size, max_instances, mask_size):
    if short_edge_range is not None:
        low, high = (float(v) for v in short_edge_range)
        if not 0 < low <= high:
            raise ValueError(
                f"short_edge_range must be (low, high) with 0 < low <= high, got "
                f"{short_edge_range}"
            )
        short_edge_range = (low, high)
    if max_size is not None and max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    if max_instances < 1:
        raise ValueError(f"max_instances must be positive, got {max_instances}")
    if mask_size < 2:
        raise ValueError(f"mask_size must be at least 2, got {mask_size}")
    return short_edge_range


def _resize_scale(height, width, short_edge, max_size):
    """The factor that takes the shorter edge to `short_edge` (None: keep it)
    and the longer edge to at most `max_size` (None: no cap)."""
    scale = tf.constant(1.0)
    if short_edge is not None:
        scale = short_edge / tf.minimum(height, width)
    if max_size is not None:
        scale = tf.minimum(scale, max_size / tf.maximum(height, width))
    return scale


def _resize(image, masks, scale):
    """Resizes the image (bilinear) and masks (bilinear, then ≥ 0.5) by `scale`;
    returns them and the new size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
    image = tf.image.resize(image, size, method="bilinear")
    masks = tf.image.resize(masks[..., None], size, method="bilinear")[..., 0]
    return image, tf.cast(masks >= 0.5, tf.uint8), size


def boxes_from_mask_tensor(masks):
    """Tight boxes `[y1, x1, y2, x2]` of binary masks `(N, H, W)` and whether
    each mask has a pixel: `(float32 (N, 4), bool (N,))`; empty masks get zeros."""
    masks = tf.cast(masks, tf.bool)
    rows = tf.reduce_any(masks, axis=2)
    cols = tf.reduce_any(masks, axis=1)
    valid = tf.reduce_any(rows, axis=1)

    def extent(hits):
        length = tf.shape(hits)[1]
        hits = tf.cast(hits, tf.int32)
        first = tf.argmax(hits, axis=1, output_type=tf.int32)
        last = length - tf.argmax(hits[:, ::-1], axis=1, output_type=tf.int32)
        return first, last

    y1, y2 = extent(rows)
    x1, x2 = extent(cols)
    boxes = tf.cast(tf.stack([y1, x1, y2, x2], axis=1), tf.float32)
    return tf.where(valid[:, None], boxes, 0.0), valid


def crop_masks_to_boxes(masks, boxes, mask_size):
    """Each mask resampled inside its own box: bilinear, then ≥ 0.5.

    Output pixel (u, v) samples the mask at `(y1 + (u + 0.5) h / S,
    x1 + (v + 0.5) w / S)` in continuous coordinates (RoIAlign's aligned
    grid, one sample per bin), with the mask's edge values extended beyond
    the image.

    Args:
        masks: uint8 `(N, H, W)` binary masks.
        boxes: float32 `(N, 4)` `[y1, x1, y2, x2]` in pixels.
        mask_size: int S.

    Returns:
        uint8 `(N, S, S)` binary masks.
    """
    shape = tf.cast(tf.shape(masks)[1:3], tf.float32)
    # One replicated border pixel, so samples in the outer half pixel
    # interpolate towards the edge value instead of crop_and_resize's 0.
    padded = tf.pad(masks[..., None], [[0, 0], [1, 1], [1, 1], [0, 0]], "SYMMETRIC")
    low, high = boxes[:, :2], boxes[:, 2:]
    half_bin = 0.5 * (high - low) / mask_size
    # crop_and_resize puts S samples from the first to the last coordinate
    # inclusive, on a grid normalised by (size - 1) = padded size - 1.
    first = (low + half_bin - 0.5 + 1.0) / (shape + 1.0)
    last = (high - half_bin - 0.5 + 1.0) / (shape + 1.0)
    crops = tf.image.crop_and_resize(
        padded,
        tf.concat([first, last], axis=1),
        tf.range(tf.shape(masks)[0]),
        [mask_size, mask_size],
        method="bilinear",
    )
    return tf.cast(crops[..., 0] >= 0.5, tf.uint8)


def crop_instance_mask(mask, box, size=112):
    """One instance's full-image binary mask resampled inside its box, as
    NumPy: `crop_masks_to_boxes` of one mask (the `"masks"` entry of the
    PANet training targets, whose model RoIAligns it into each RoI).

    Example:
    >>> mask = np.zeros((8, 8), "uint8"); mask[2:6, 2:6] = 1
    >>> crop_instance_mask(mask, [2, 2, 6, 6], size=4).sum()
    16

    Args:
        mask: `(H, W)` array, nonzero inside the instance.
        box: `[y1, x1, y2, x2]` in image pixels (e.g. the mask's extent).
        size: int. Crop side `S`. Defaults to `112`.

    Returns:
        `(size, size)` uint8 array of 0 / 1.
    """
    mask = tf.cast(tf.not_equal(tf.convert_to_tensor(mask), 0), tf.uint8)
    box = tf.constant([[float(v) for v in box]], tf.float32)
    return crop_masks_to_boxes(mask[None], box, size)[0].numpy()


def _pad_rows(values, rows):
    """Pads (or cuts) the first axis of `values` to `rows` with zeros."""
    values = values[:rows]
    padding = [[0, rows - tf.shape(values)[0]]] + [[0, 0]] * (values.shape.rank - 1)
    return tf.pad(values, padding)


def _keep_first(boxes, classes, masks, max_instances):
    count = tf.shape(classes)[0]

    def warn():
        tf.print(
            "kseg: an image has",
            count,
            "instances, more than max_instances =",
            max_instances,
            "; the extra ones are dropped",
            output_stream=sys.stderr,
        )
        return tf.constant(True)

    warned = tf.cond(count > max_instances, warn, lambda: tf.constant(False))
    with tf.control_dependencies([warned]):
        return (
            tf.identity(boxes[:max_instances]),
            classes[:max_instances],
            masks[:max_instances],
        )


def instance_targets(masks, classes, max_instances=100, mask_size=112):
    """Boxes, classes and box-relative masks of one image, padded to M rows.

    Instances without a pixel are removed; beyond `max_instances` the rest
    are dropped with a warning.

    Args:
        masks: uint8 `(N, H, W)` binary masks of the (augmented) image.
        classes: int `(N,)` classes in 1..C.
        max_instances: int M. Defaults to 100.
        mask_size: int S. Defaults to 112.

    Returns:
        dict `boxes` float32 `(M, 4)`, `classes` int32 `(M,)`, `masks` uint8
        `(M, S, S)`, zeros beyond the image's instances.
    """
    boxes, valid = boxes_from_mask_tensor(masks)
    boxes = tf.boolean_mask(boxes, valid)
    classes = tf.boolean_mask(tf.cast(classes, tf.int32), valid)
    masks = tf.boolean_mask(masks, valid)
    boxes, classes, masks = _keep_first(boxes, classes, masks, max_instances)
    crops = crop_masks_to_boxes(masks, boxes, mask_size)
    return {
        "boxes": tf.ensure_shape(_pad_rows(boxes, max_instances), [max_instances, 4]),
        "classes": tf.ensure_shape(_pad_rows(classes, max_instances), [max_instances]),
        "masks": tf.ensure_shape(
            _pad_rows(crops, max_instances), [max_instances, mask_size, mask_size]
        ),
    }


def _pad_image(image, height, width):
    shape = tf.shape(image)
    return tf.ensure_shape(
        tf.pad(image, [[0, height - shape[0]], [0, width - shape[1]], [0, 0]]),
        [height, width, 3],
    )


def augment_instances(
    image,
    masks,
    classes,
    output_size,
    short_edge_range=None,
    max_size=None,
    flip=True,
    max_instances=100,
    mask_size=112,
    seed=None,
):
    """Random training transform of one image and its instances.

    In order: resize so that the shorter edge becomes a length drawn
    uniformly from `short_edge_range` (MST) with the longer edge at most
    `max_size`; crop a random `output_size` window where the resized image
    is larger; flip horizontally with probability 1/2; pad bottom/right with
    zeros to `output_size`; then `instance_targets` on the transformed masks.

    Example:

    >>> sample = make_synthetic_instances("train", 1).load(0)
    >>> image, targets = augment_instances(
    ...     sample["image"], sample["masks"], sample["classes"], 128,
    ...     short_edge_range=(96, 160), max_size=160)

    Args:
        image: `(H, W, 3)` RGB tensor, values in 0–255.
        masks: `(N, H, W)` binary masks (any integer or bool dtype).
        classes: int `(N,)` classes in 1..C.
        output_size: int or `(height, width)`, multiples of 64.
        short_edge_range: None or `(low, high)` lengths of the shorter edge.
            None keeps the image's scale (up to `max_size`). Defaults to None.
        max_size: None or the cap of the longer edge after resizing. Defaults
            to None (no cap; what exceeds `output_size` is cropped).
        flip: bool. Random horizontal flip. Defaults to True.
        max_instances: int M. Defaults to 100.
        mask_size: int S. Defaults to 112.
        seed: None or an int tensor `(2,)` for the stateless random ops; None
            draws one from the global generator.

    Returns:
        `(image float32 (H_out, W_out, 3), targets)` with `targets` as in
        `instance_targets`.
    """
    height, width = _output_size(output_size)
    short_edge_range = _check_arguments(
        short_edge_range, max_size, max_instances, mask_size
    )
    image = preprocess_images(image)
    masks = tf.cast(tf.cast(masks, tf.bool), tf.uint8)
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short_edge = None
    if short_edge_range is not None:
        short_edge = tf.random.stateless_uniform([], seeds[0], *short_edge_range)
    scale = _resize_scale(shape[0], shape[1], short_edge, max_size)
    image, masks, size = _resize(image, masks, scale)

    top = tf.random.stateless_uniform(
        [], seeds[1], 0, tf.maximum(size[0] - height, 0) + 1, dtype=tf.int32
    )
    left = tf.random.stateless_uniform(
        [], seeds[2], 0, tf.maximum(size[1] - width, 0) + 1, dtype=tf.int32
    )
    image = image[top : top + height, left : left + width]
    masks = masks[:, top : top + height, left : left + width]

    if flip:
        mirror = tf.random.stateless_uniform([], seeds[3]) < 0.5
        image = tf.where(mirror, image[:, ::-1], image)
        masks = tf.where(mirror, masks[:, :, ::-1], masks)

    targets = instance_targets(masks, classes, max_instances, mask_size)
    return _pad_image(image, height, width), targets


def _samples(dataset, shuffle, seed, skip_corrupt):
    if isinstance(dataset, InstanceDataset):
        return dataset.as_dataset(shuffle=shuffle, seed=seed, skip_corrupt=skip_corrupt)
    if shuffle or skip_corrupt:
        raise ValueError(
            "shuffle=True and skip_corrupt=True need an InstanceDataset (a "
            "tf.data.Dataset is taken as it is, in its own order)"
        )
    return dataset


def instance_train_pipeline(
    dataset,
    batch_size,
    output_size,
    *,
    short_edge_range=None,
    max_size=None,
    flip=True,
    max_instances=100,
    mask_size=112,
    shuffle=True,
    repeat=True,
    seed=0,
    num_parallel_calls=tf.data.AUTOTUNE,
    skip_corrupt=False,
):
    """The training pipeline of instance segmentation: `(x, y)` batches.

    Sample i of the (repeated) stream is augmented with the stateless seed
    `(seed, i)`, so the batches are reproducible whatever the parallelism.

    Example (the quickstart's synthetic scenes):

    >>> train = make_synthetic_instances("train")
    >>> batches = instance_train_pipeline(
    ...     train, 8, 128, short_edge_range=(96, 160), max_size=160)

    Args:
        dataset: `InstanceDataset`, or a `tf.data.Dataset` of dicts with
            `image`, `masks` and `classes` (`InstanceDataset.as_dataset`).
        batch_size: int B; the last partial batch is dropped.
        output_size: int or `(height, width)`, multiples of 64.
        short_edge_range, max_size, flip, max_instances, mask_size: as in
            `augment_instances`.
        shuffle: bool. Shuffle the samples each epoch. Defaults to True.
        repeat: bool. Repeat forever. Defaults to True.
        seed: int. Seed of shuffling and augmentation. Defaults to 0.
        num_parallel_calls: parallelism of loading and augmentation.
        skip_corrupt: bool. Leave out samples whose image or annotations
            fail to load, with a warning naming the file, instead of stopping
            with an error naming it. Defaults to False.

    Returns:
        `tf.data.Dataset` of `(x, y)` as described in this module.
    """
    _output_size(output_size)
    _check_arguments(short_edge_range, max_size, max_instances, mask_size)
    samples = _samples(dataset, shuffle, seed, skip_corrupt)
    if repeat:
        samples = samples.repeat()

    def transform(index, sample):
        image, targets = augment_instances(
            sample["image"],
            sample["masks"],
            sample["classes"],
            output_size,
            short_edge_range=short_edge_range,
            max_size=max_size,
            flip=flip,
            max_instances=max_instances,
            mask_size=mask_size,
            seed=tf.stack([tf.constant(seed, tf.int64), index]),
        )
        return {"images": image}, targets

    batches = samples.enumerate().map(transform, num_parallel_calls=num_parallel_calls)
    return batches.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def instance_eval_transform(image, output_size, short_edge=None, max_size=None):
    """Evaluation transform of one image: resize, then zero-pad to the output.

    The scale takes the shorter edge to `short_edge` (None: keep it), caps
    the longer edge at `max_size`, and is lowered further where needed so the
    image fits `output_size` (nothing is cropped).

    Args:
        image: `(H, W, 3)` RGB tensor, values in 0–255.
        output_size: int or `(height, width)`, multiples of 64.
        short_edge: None or the length of the shorter edge. Defaults to None.
        max_size: None or the cap of the longer edge. Defaults to None.

    Returns:
        `(image float32 (H_out, W_out, 3), scale float32 (2,))`: the content's
        size is `round((H, W) * scale)`; a point `(y, x)` of the content is
        `(y, x) / scale` in the original image.
    """
    height, width = _output_size(output_size)
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        image = preprocess_images(image)
    # uint8 images are resized as they are (the resize computes in float32,
    # the same values as on the cast image), so a large photo is never held
    # as a float32 copy at its full size (4x its bytes).
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = _resize_scale(shape[0], shape[1], short_edge, max_size)
    scale = tf.minimum(
        scale, tf.reduce_min(tf.constant([height, width], tf.float32) / shape)
    )
    size = tf.clip_by_value(
        tf.cast(tf.round(shape * scale), tf.int32), 1, tf.constant([height, width])
    )
    image = tf.image.resize(image, size, method="bilinear")
    return _pad_image(image, height, width), tf.cast(size, tf.float32) / shape


def instance_eval_pipeline(
    dataset,
    batch_size,
    output_size,
    *,
    short_edge=None,
    max_size=None,
    num_parallel_calls=tf.data.AUTOTUNE,
):
    """The evaluation pipeline: `(x, meta)` batches and the COCO ground truth.

    Args:
        dataset: `InstanceDataset`.
        batch_size: int B; the last batch may be smaller.
        output_size: int or `(height, width)`, multiples of 64.
        short_edge, max_size: as in `instance_eval_transform`.
        num_parallel_calls: parallelism of loading and resizing.

    Returns:
        `(batches, ground_truth)`: `batches` a `tf.data.Dataset` of `(x,
        meta)` with `x = {"images": float32 (B, H, W, 3)}` and `meta =
        {"image_id": int64 (B,), "height": int32 (B,), "width": int32 (B,),
        "scale": float32 (B, 2)}` (original size; `(y, x)` resize factors),
        in the dataset's order; `ground_truth` the COCO dict of those images
        (`InstanceDataset.coco_ground_truth`).
    """
    if not isinstance(dataset, InstanceDataset):
        raise TypeError(
            f"instance_eval_pipeline needs an InstanceDataset, got {type(dataset)}"
        )
    _output_size(output_size)
    if max_size is not None and max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")

    def transform(sample):
        image, scale = instance_eval_transform(
            sample["image"], output_size, short_edge, max_size
        )
        shape = tf.shape(sample["image"])
        meta = {
            "image_id": sample["image_id"],
            "height": shape[0],
            "width": shape[1],
            "scale": scale,
        }
        return {"images": image}, meta

    samples = dataset.as_dataset(targets=False, num_parallel_calls=num_parallel_calls)
    batches = samples.map(transform, num_parallel_calls=num_parallel_calls)
    batches = batches.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return batches, dataset.coco_ground_truth()
