"""The one instance transform: an image fitted into an instance model's fixed
input (`instance_eval_transform`: resize so it fits, zero padding) and the
detections taken back to the image: `boxes_to_image` (divide by the fit's
scale, clip) and `paste_weights` / `paste_masks` (each detection's S × S
mask probabilities, 28 × 28 for PANet, resized bilinearly into its box,
threshold). COCO evaluation, `predict_instances` (Keras models and `.tflite`
files) and the SavedModel's graph all use these, so every path maps the
same detections to the same pixels.
"""

import numpy as np
from keras import ops


def boxes_to_image(boxes, scale, height, width):
    """Boxes `(..., 4)` `[y1, x1, y2, x2]` in pixels of the fitted model input
    back in the image: divided by the fit's `scale` `(y, x)` (what
    `instance_eval_transform` returns) and clipped to the `height × width`
    image. `keras.ops`: NumPy arrays in and out of `ops.convert_to_numpy`,
    or tensors in a graph (the SavedModel's)."""
    scale = ops.cast(scale, boxes.dtype)
    scale = ops.concatenate([scale, scale], axis=-1)
    limits = ops.cast(ops.stack([height, width, height, width]), boxes.dtype)
    return ops.minimum(ops.maximum(boxes / scale, 0.0), limits)


def paste_weights(low, high, length, size):
    """Bilinear weights `(N, length, size)` taking `size` mask samples to the
    `length` image pixels along one axis, for boxes spanning `[low, high)`
    (`(N,)` each), float32.

    Image pixel i (centre i + 0.5) lies in a box when `low <= i + 0.5 <
    high`; it samples the mask at `(i + 0.5 − low) · size / (high − low) − 0.5`
    (mask pixel centres at integers), clamped to the mask, bilinearly; its
    weights are zero outside the box and for empty boxes. Pasting a mask is
    `rows · mask · colsᵀ`.
    """
    centres = ops.cast(ops.arange(length), "float32") + 0.5
    low = ops.cast(low, "float32")[:, None]
    high = ops.cast(high, "float32")[:, None]
    extent = high - low
    valid = extent > 0
    coordinate = (centres[None] - low) * size / ops.where(valid, extent, 1.0) - 0.5
    coordinate = ops.clip(coordinate, 0.0, size - 1.0)
    lower = ops.floor(coordinate)
    fraction = (coordinate - lower)[..., None]
    lower = ops.cast(lower, "int32")
    upper = ops.minimum(lower + 1, size - 1)
    weights = (
        ops.one_hot(lower, size) * (1.0 - fraction)
        + ops.one_hot(upper, size) * fraction
    )
    inside = ops.logical_and(
        ops.logical_and(centres[None] >= low, centres[None] < high), valid
    )
    return weights * ops.cast(inside, "float32")[..., None]


def paste_masks(masks, boxes, height, width, threshold=0.5):
    """Pastes box-relative mask probabilities into an image.

    Each S × S mask is resized bilinearly onto the image pixels whose centres
    lie inside its box (mask pixel centres spread evenly over the box, edge
    values held beyond the outermost centres) and thresholded; pixels outside
    the box are 0. This is SPEC's "bilinear resize of the 28×28 probabilities
    into the box, threshold 0.5".

    Example:

    >>> paste_masks(np.ones((1, 28, 28)), np.array([[1, 2, 3, 4]]), 5, 6)[0]
    ... # True on rows 1-2, columns 2-3

    Args:
        masks: `(D, S, S)` probabilities (or `(D, S_h, S_w)`).
        boxes: `(D, 4)` boxes `[y1, x1, y2, x2]` in pixels of the target image
            (pixel (i, j) covers `[i, i + 1) × [j, j + 1)`).
        height, width: int. Target image size.
        threshold: float or None. Masks are `probability >= threshold`; None
            returns the pasted probabilities. Defaults to 0.5.

    Returns:
        bool `(D, height, width)`, or float32 with `threshold=None`.
    """
    masks = np.asarray(masks, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (D, S, S), got {masks.shape}")
    if boxes.shape != (len(masks), 4):
        raise ValueError(
            f"boxes must have shape ({len(masks)}, 4) for {len(masks)} masks, got "
            f"{boxes.shape}"
        )
    pasted = np.zeros((len(masks), height, width), np.float32)
    if len(masks):
        rows = ops.convert_to_numpy(
            paste_weights(boxes[:, 0], boxes[:, 2], height, masks.shape[1])
        )
        cols = ops.convert_to_numpy(
            paste_weights(boxes[:, 1], boxes[:, 3], width, masks.shape[2])
        )
    for k, mask in enumerate(masks.astype(np.float32)):
        # Only the rows and columns inside the box.
        top, bottom = _span(rows[k])
        left, right = _span(cols[k])
        if bottom > top and right > left:
            pasted[k, top:bottom, left:right] = (
                rows[k, top:bottom] @ mask @ cols[k, left:right].T
            )
    if threshold is None:
        return pasted
    return pasted >= threshold


def _span(weights):
    """`(first, stop)` of the pixels with a weight (inside the box)."""
    inside = np.flatnonzero(weights.any(axis=1))
    if inside.size == 0:
        return 0, 0
    return int(inside[0]), int(inside[-1]) + 1
