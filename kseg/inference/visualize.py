"""Colour label maps and blend them over images.

The palettes are `kseg.data`'s (PASCAL VOC 21, Cityscapes 19, ADE20K 150
classes); `IGNORE_LABEL` (255) pixels get `kseg.data.IGNORE_COLOR`, the VOC
boundary colour (224, 224, 192), as in VOC ground truth.
"""

import numpy as np

from kseg.data import palette as data_palette
from kseg.data.labels import IGNORE_LABEL

PALETTES = {
    "voc": data_palette.VOC_PALETTE,
    "cityscapes": data_palette.CITYSCAPES_PALETTE,
    "ade20k": data_palette.ADE20K_PALETTE,
}


def get_palette(palette):
    """Returns a palette as a `uint8` array `(num_classes, 3)`.

    Args:
        palette: one of `"voc"`, `"cityscapes"`, `"ade20k"`, or an array-like
            `(num_classes, 3)` of RGB values in 0..255 with
            `num_classes <= 255`.
    """
    if isinstance(palette, str):
        if palette not in PALETTES:
            raise ValueError(
                f"Unknown palette {palette!r}; expected one of {sorted(PALETTES)} "
                "or an array (num_classes, 3)"
            )
        return PALETTES[palette].copy()
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or not 0 < len(array) <= IGNORE_LABEL:
        raise ValueError(
            f"palette must have shape (num_classes, 3) with 0 < num_classes <= "
            f"{IGNORE_LABEL}, got {array.shape}"
        )
    if (
        not np.issubdtype(array.dtype, np.integer)
        or array.min() < 0
        or (array.max() > 255)
    ):
        raise ValueError("palette must hold integer RGB values in 0..255")
    return array.astype(np.uint8)


def colorize(label_map, palette="voc"):
    """Paints each pixel of a label map with its class colour.

    Example:
    >>> colorize(np.array([[0, 1], [2, 255]]), "voc")[..., 0]
    array([[  0, 128],
           [  0, 224]], dtype=uint8)

    Args:
        label_map: integer array `(H, W)` (or `(..., H, W)`) of class
            indices, or 255 for ignored pixels.
        palette: palette name or array, see `get_palette`. Defaults to
            `"voc"`.

    Returns:
        `uint8` RGB array `label_map.shape + (3,)`; ignored pixels are
        `kseg.data.IGNORE_COLOR`. A label without a palette entry raises
        `ValueError`.
    """
    label_map = _check_label_map(label_map)
    return data_palette.colorize(label_map, get_palette(palette))


def overlay(image, label_map, palette="voc", alpha=0.5):
    """Blends the colourized label map over an image.

    Each pixel becomes `round((1 − alpha) · image + alpha · colour)`; pixels
    labelled 255 (ignored) keep the image's colour.

    Args:
        image: array `(H, W, 3)`, uint8 or float RGB values in 0–255.
        label_map: integer array `(H, W)` of class indices (or 255).
        palette: palette name or array, see `get_palette`. Defaults to
            `"voc"`.
        alpha: float in [0, 1]. Weight of the label colours.
            Defaults to `0.5`.

    Returns:
        `uint8` RGB array `(H, W, 3)`.
    """
    label_map = _check_label_map(label_map)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if label_map.shape != image.shape[:2]:
        raise ValueError(
            f"label_map shape {label_map.shape} does not match the image size "
            f"{image.shape[:2]}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    colors = colorize(label_map, palette).astype(np.float64)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colors
    blended = np.where((label_map == IGNORE_LABEL)[..., None], image, blended)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _check_label_map(label_map):
    label_map = np.asarray(label_map)
    if label_map.ndim < 2:
        raise ValueError(
            f"label_map must have shape (H, W) or (..., H, W), got {label_map.shape}"
        )
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must hold integers, got {label_map.dtype}")
    return label_map
