"""Instance masks in the PANet data contract, in NumPy.

The training targets carry each instance's mask resampled inside its own
box (`crop_instance_mask`), a fixed `S × S` array however large the image.
`kseg.data.instance_pipeline.crop_masks_to_boxes` is the same definition in
TensorFlow for the input pipeline (a test checks they agree); predictions are
pasted back by `kseg.data.instance_masks`.
"""

import numpy as np


def _bilinear(image, ys, xs):
    """Bilinear samples of a 2D `image` at pixel-index coordinates `ys` (rows)
    × `xs` (columns); coordinates are clamped to the image (edge values)."""
    h, w = image.shape
    ys = np.clip(ys, 0.0, h - 1.0)
    xs = np.clip(xs, 0.0, w - 1.0)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def crop_instance_mask(mask, box, size=112):
    """An instance's full-image binary mask resampled inside its box.

    Crop pixel `(i, j)` is the bilinear value of `mask` at image point
    `(y1 + (i + 0.5)·h / size, x1 + (j + 0.5)·w / size)` (pixel centres at
    integer + 0.5), thresholded at 0.5. This is the `"masks"` entry of the
    PANet training targets; the model RoIAligns it into each RoI.

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
    mask = np.asarray(mask, "float64")
    y1, x1, y2, x2 = (float(v) for v in box)
    steps = (np.arange(size) + 0.5) / size
    ys = y1 + steps * (y2 - y1) - 0.5
    xs = x1 + steps * (x2 - x1) - 0.5
    return (_bilinear(mask, ys, xs) >= 0.5).astype("uint8")
