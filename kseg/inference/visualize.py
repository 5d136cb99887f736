"""Colour label maps, blend them over images, and draw what a person reads.

The palettes are `kseg.data`'s (PASCAL VOC 21, Cityscapes 19, ADE20K 150
classes); `IGNORE_LABEL` (255) pixels get `kseg.data.IGNORE_COLOR`, the VOC
boundary colour (224, 224, 192), as in VOC ground truth.

Text is drawn for people: on a filled background in black or white, whichever
contrasts more (WCAG 2 contrast ratio, at least sqrt(21) ≈ 4.58 for any
background), at a height that grows with the image (`text_height`), and never
over other text (`draw_labels`). `overlay_with_legend` adds the names and
colours of the classes an overlay shows.
"""

import dataclasses

import cv2
import numpy as np

from kseg.data import palette as data_palette
from kseg.data.labels import IGNORE_LABEL
from kseg.inference.defaults import DEFAULT_ALPHA

# The contrast left to the image under the label colours (see `overlay`).
IMAGE_CONTRAST = 0.4
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

# Label text (the height of its capitals): 2% of the image's longer side,
# 10 to 40 pixels.
TEXT_HEIGHT_FRACTION = 0.02
MIN_TEXT_HEIGHT = 10
MAX_TEXT_HEIGHT = 40
# White, unlike the dimmed image of an overlay; the grey frame shows both
# white and black swatches.
LEGEND_BACKGROUND = (255, 255, 255)
SWATCH_FRAME = (96, 96, 96)

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


def overlay(image, label_map, palette="voc", alpha=DEFAULT_ALPHA):
    """Blends the colourized label map over the image, shown in grey.

    Each labelled pixel becomes `round(alpha · colour + (1 − alpha) · shade)`,
    where `shade` is the image's luma (BT.601, as OpenCV's `RGB2GRAY`) with
    its contrast around 128 cut to `IMAGE_CONTRAST`. The image keeps its
    shapes but adds no hue: a class's colour minus its grey level is exactly
    `alpha` times its palette colour's, whatever lies under it (a yellow
    object under a navy class stays bluish, where a colour blend would give
    grey), and the image's brightness can move a class's colour by at most
    `(1 − alpha) · IMAGE_CONTRAST · 255` grey levels. Pixels labelled 255
    (ignored) keep the image's colours.

    Args:
        image: array `(H, W, 3)`, uint8 or float RGB values in 0–255.
        label_map: integer array `(H, W)` of class indices (or 255).
        palette: palette name or array, see `get_palette`. Defaults to
            `"voc"`.
        alpha: float in [0, 1]. Weight of the label colours.
            Defaults to `DEFAULT_ALPHA` (0.7).

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
    luma = image.astype(np.float64) @ _LUMA_WEIGHTS
    shade = 128.0 + IMAGE_CONTRAST * (luma - 128.0)
    blended = (1.0 - alpha) * shade[..., None] + alpha * colors
    blended = np.where((label_map == IGNORE_LABEL)[..., None], image, blended)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def overlay_with_legend(
    image, label_map, palette="voc", alpha=DEFAULT_ALPHA, class_names=None
):
    """`overlay`, with the legend of the classes it shows to its right.

    Args:
        image, label_map, palette, alpha: as for `overlay`.
        class_names: the name of class k at k, or `None` for `class <k>`.

    Returns:
        `uint8` RGB array `(max(H, legend height), W + legend width, 3)`;
        rows below a short image are `LEGEND_BACKGROUND`.
    """
    blended = overlay(image, label_map, palette, alpha)
    panel, _ = legend(label_map, palette, class_names, text_height(blended.shape))
    height = max(len(blended), len(panel))
    result = np.empty((height, blended.shape[1] + panel.shape[1], 3), np.uint8)
    result[...] = LEGEND_BACKGROUND
    result[: len(blended), : blended.shape[1]] = blended
    result[: len(panel), blended.shape[1] :] = panel
    return result


@dataclasses.dataclass(frozen=True)
class LegendEntry:
    """One class of a legend: its swatch and its name's label, each a
    rectangle `(x, y, width, height)` in the legend panel."""

    class_id: int
    name: str
    color: tuple
    swatch: tuple
    label: tuple


def legend(label_map, palette="voc", class_names=None, height=12, rows=None):
    """A legend panel of the classes present in a label map.

    Each class (by id; ignored pixels have none) gets a row: a swatch of its
    palette colour framed in `SWATCH_FRAME`, then its name in black on
    `LEGEND_BACKGROUND` (white). Rows
    fill columns `rows` tall (default: as many as the label map's height
    holds, at least one).

    Args:
        label_map: integer array `(H, W)` of class indices (or 255).
        palette: palette name or array, see `get_palette`.
        class_names: the name of class k at k, or `None` for `class <k>`.
        height: int, text height in pixels (see `text_height`).
        rows: int, rows per column, or `None` (see above).

    Returns:
        `(panel, entries)`: the uint8 RGB panel and its `LegendEntry`s in
        class order.
    """
    label_map = _check_label_map(label_map)
    colors = get_palette(palette)
    present = [int(k) for k in np.unique(label_map) if k != IGNORE_LABEL]
    for k in present:
        if k >= len(colors):
            raise ValueError(
                f"label {k} has no colour in a palette of {len(colors)} classes"
            )
        if class_names is not None and k >= len(class_names):
            raise ValueError(
                f"the label map holds class {k}, but class_names names only "
                f"{len(class_names)} classes (0..{len(class_names) - 1})"
            )
    names = [
        f"class {k}" if class_names is None else str(class_names[k]) for k in present
    ]
    font = _Font(height)
    row = font.box_height
    margin = font.padding
    if rows is None:
        rows = (label_map.shape[-2] - 2 * margin) // row
    rows = max(1, rows)
    swatch = row - 2 * font.padding
    panel_height = 2 * margin + row * min(rows, max(len(present), 1))
    columns, x, entries = [], margin, []
    for start in range(0, len(present), rows):
        chunk = range(start, min(start + rows, len(present)))
        widths = [font.size(names[i])[0] for i in chunk]
        for i, width in zip(chunk, widths, strict=True):
            y = margin + (i - start) * row
            entries.append(
                LegendEntry(
                    present[i],
                    names[i],
                    tuple(int(c) for c in colors[present[i]]),
                    (x, y + font.padding, swatch, swatch),
                    (x + swatch + font.padding, y, width, row),
                )
            )
        columns.append(swatch + font.padding + max(widths) + 2 * margin)
        x += columns[-1]
    panel = np.empty((panel_height, max(sum(columns), 1) + margin, 3), np.uint8)
    panel[...] = LEGEND_BACKGROUND
    for entry in entries:
        x, y, w, h = entry.swatch
        panel[y - 1 : y + h + 1, x - 1 : x + w + 1] = SWATCH_FRAME
        panel[y : y + h, x : x + w] = entry.color
        font.draw(panel, entry.name, entry.label, LEGEND_BACKGROUND)
    return panel, entries


def text_height(image_shape):
    """The label text height (of capitals and digits) in pixels for an image
    `(H, W, ...)`: 2% of its longer side, within [`MIN_TEXT_HEIGHT`,
    `MAX_TEXT_HEIGHT`]."""
    height = round(TEXT_HEIGHT_FRACTION * max(image_shape[:2]))
    return int(np.clip(height, MIN_TEXT_HEIGHT, MAX_TEXT_HEIGHT))


def relative_luminance(color):
    """WCAG 2 relative luminance of an sRGB colour (0–255 values)."""
    srgb = np.asarray(color, np.float64) / 255.0
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    return float(linear @ [0.2126, 0.7152, 0.0722])


def contrast_ratio(first, second):
    """WCAG 2 contrast ratio of two sRGB colours, from 1 to 21."""
    light, dark = sorted(map(relative_luminance, (first, second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def text_color(background):
    """Black or white, whichever contrasts more with `background`."""
    black, white = (0, 0, 0), (255, 255, 255)
    if contrast_ratio(background, black) >= contrast_ratio(background, white):
        return black
    return white


def draw_labels(canvas, texts, boxes, colors, height=None):
    """Draws text labels on filled rectangles, in place, none over another.

    Label i is placed next to `boxes[i]`: above it, inside its top, then
    up or down the image (against the labels placed before, or on a grid),
    nearest first; left- or right-aligned with the box, or beside it.
    Labels are placed in order, so put the most important first; one that
    finds no free place in the image is left out.

    Args:
        canvas: uint8 RGB array `(H, W, 3)`, C-contiguous; drawn on.
        texts: the labels' texts.
        boxes: array `(N, 4)` of `(y1, x1, y2, x2)` pixel boxes.
        colors: array `(N, 3)`: each label's background; its text is black
            or white (`text_color`).
        height: int, text height in pixels. Defaults to
            `text_height(canvas.shape)`.

    Returns:
        Per label, its rectangle `(x, y, width, height)`, or `None` where it
        was left out.
    """
    font = _Font(text_height(canvas.shape) if height is None else height)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(texts) == len(boxes) == len(colors):
        raise ValueError(
            f"draw_labels: {len(texts)} texts, {len(boxes)} boxes and "
            f"{len(colors)} colours; give one of each per label"
        )
    placed = np.zeros((0, 4), np.int64)
    rectangles = []
    for text, box, color in zip(texts, boxes, colors, strict=True):
        width, _ = font.size(text)
        width += 2 * font.padding
        rectangle = _free_place((width, font.box_height), box, placed, canvas.shape[:2])
        rectangles.append(rectangle)
        if rectangle is None:
            continue
        placed = np.concatenate([placed, [rectangle]])
        x, y, w, h = rectangle
        canvas[y : y + h, x : x + w] = color
        inner = (x + font.padding, y, w - 2 * font.padding, h)
        font.draw(canvas, text, inner, color)
    return rectangles


def _free_place(size, box, placed, shape):
    """The first candidate rectangle `(x, y, w, h)` of `size` near `box`
    inside an image of `shape` that overlaps none of `placed`, or None."""
    width, height = size
    image_height, image_width = shape
    if height > image_height:
        return None
    width = min(width, image_width)
    y1, x1, y2, x2 = (int(round(v)) for v in box)
    xs = np.clip([x1, x2 - width, x2 + 1, x1 - width], 0, image_width - width)
    xs = list(dict.fromkeys(xs.tolist()))
    preferred = [y1 - height, y1]
    # Then rows along the placed labels' edges (labels stack without gaps),
    # and a grid down the image; nearest to above the box first.
    further = np.concatenate(
        [
            placed[:, 1] - height,
            placed[:, 1] + placed[:, 3],
            np.arange(0, image_height - height + 1, max(height // 2, 1)),
        ]
    )
    further = further[np.argsort(np.abs(further - (y1 - height)), kind="stable")]
    ys = np.clip(np.concatenate([preferred, further]), 0, image_height - height)
    ys = list(dict.fromkeys(ys.tolist()))
    candidates = np.array([(x, y) for y in ys for x in xs], np.int64)
    cx, cy = candidates[:, :1], candidates[:, 1:]
    px, py, pw, ph = (column[None] for column in placed.T)
    overlaps = (cx < px + pw) & (px < cx + width) & (cy < py + ph) & (py < cy + height)
    free = ~overlaps.any(axis=1)
    if not free.any():
        return None
    x, y = candidates[np.argmax(free)]
    return (int(x), int(y), int(width), int(height))


class _Font:
    """OpenCV's Hershey simplex font with capitals and digits `height`
    pixels tall (21 font units at scale 1)."""

    face = cv2.FONT_HERSHEY_SIMPLEX

    def __init__(self, height):
        if isinstance(height, bool) or not isinstance(height, (int, np.integer)):
            raise ValueError(f"text height must be an int of pixels, got {height!r}")
        if height < 1:
            raise ValueError(f"text height must be at least 1 pixel, got {height}")
        self.thickness = max(1, round(height / 10))
        self.scale = height / 21
        (_, self.ascent), self.baseline = cv2.getTextSize(
            "Ag", self.face, self.scale, self.thickness
        )
        self.padding = max(2, round(height / 5))
        self.box_height = self.ascent + self.baseline + 2 * self.padding

    def size(self, text):
        (width, _), _ = cv2.getTextSize(text, self.face, self.scale, self.thickness)
        return width + self.thickness, self.ascent

    def draw(self, canvas, text, rectangle, background):
        """Writes `text` in `text_color(background)` at the left of
        `rectangle` `(x, y, w, h)`, clipped to it."""
        x, y, w, h = rectangle
        region = np.ascontiguousarray(canvas[y : y + h, x : x + w])
        origin = (0, self.padding + self.ascent)
        cv2.putText(
            region,
            text,
            origin,
            self.face,
            self.scale,
            text_color(background),
            self.thickness,
            cv2.LINE_AA,
        )
        canvas[y : y + h, x : x + w] = region


def _check_label_map(label_map):
    label_map = np.asarray(label_map)
    if label_map.ndim < 2:
        raise ValueError(
            f"label_map must have shape (H, W) or (..., H, W), got {label_map.shape}"
        )
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must hold integers, got {label_map.dtype}")
    return label_map
