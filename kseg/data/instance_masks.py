"""Instance masks back in the image: pasting box-relative mask probabilities.

An instance model predicts each detection's mask as S × S probabilities
(28 × 28 for PANet) inside its box. `paste_masks` puts them back into an image
of any size: bilinear resize into the box, threshold. NumPy only, so it serves
evaluation, prediction and export checks alike.
"""

import numpy as np


def _interpolation_matrix(low, high, length, size):
    """Weights `(length, size)` taking `size` box samples to the `length`
    image pixels along one axis, and the pixels' range inside the box.

    Image pixel i (centre i + 0.5) lies in the box when `low <= i + 0.5 <
    high`; it samples the mask at `(i + 0.5 − low) · size / (high − low) − 0.5`
    (mask pixel centres at integers), clamped to the mask, bilinearly.
    """
    first = max(int(np.ceil(low - 0.5)), 0)
    stop = min(int(np.ceil(high - 0.5)), length)
    if stop <= first:
        return np.zeros((0, size), np.float32), first, first
    centres = np.arange(first, stop, dtype=np.float64) + 0.5
    coordinate = (centres - low) * size / (high - low) - 0.5
    coordinate = np.clip(coordinate, 0.0, size - 1)
    lower = np.floor(coordinate).astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)
    fraction = coordinate - lower
    weights = np.zeros((stop - first, size), np.float64)
    rows = np.arange(stop - first)
    np.add.at(weights, (rows, lower), 1.0 - fraction)
    np.add.at(weights, (rows, upper), fraction)
    return weights, first, stop


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
    for k, (mask, (y1, x1, y2, x2)) in enumerate(zip(masks, boxes, strict=True)):
        if not (y2 > y1 and x2 > x1):
            continue
        rows, top, bottom = _interpolation_matrix(y1, y2, height, mask.shape[0])
        cols, left, right = _interpolation_matrix(x1, x2, width, mask.shape[1])
        pasted[k, top:bottom, left:right] = rows @ mask @ cols.T
    if threshold is None:
        return pasted
    return pasted >= threshold
