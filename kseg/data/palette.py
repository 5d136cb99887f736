"""Colour palettes of the supported datasets, for colorizing label maps.

Each palette is a `uint8` array of shape `(num_classes, 3)` in RGB order, row k
being the colour of class k.
"""

import numpy as np

from kseg.data.labels import IGNORE_LABEL


def voc_colormap(num_colors=256):
    """The PASCAL VOC colormap: colour k spreads the bits of k over R, G and B.

    Bit 3j of k sets bit 7 − j of red, bit 3j + 1 of green and bit 3j + 2 of
    blue. All 256 colours are distinct, so a VOC-coloured label image can be
    inverted exactly; entry 255 (the boundary/ignore label) is (224, 224, 192).

    Args:
        num_colors: int. Number of entries, at most 256. Defaults to 256.

    Returns:
        `uint8` array of shape `(num_colors, 3)`.
    """
    if not 0 < num_colors <= 256:
        raise ValueError(f"num_colors must be in [1, 256], got {num_colors}")
    index = np.arange(num_colors)
    colormap = np.zeros((num_colors, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            bit = (index >> (3 * j + channel)) & 1
            colormap[:, channel] |= bit << (7 - j)
    return colormap.astype(np.uint8)


VOC_PALETTE = voc_colormap(21)

# Colours of the 19 train ids, from cityscapesScripts helpers/labels.py.
CITYSCAPES_PALETTE = np.array(
    [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
    ],
    dtype=np.uint8,
)

# The 150-class ADE20K SceneParsing palette used by the reference toolkits.
ADE20K_PALETTE = np.array(
    [
        [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50],
        [4, 200, 3], [120, 120, 80], [140, 140, 140], [204, 5, 255],
        [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
        [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82],
        [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
        [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
        [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220],
        [255, 9, 92], [112, 9, 255], [8, 255, 214], [7, 255, 224],
        [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
        [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
        [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153],
        [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
        [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0],
        [255, 31, 0], [255, 224, 0], [153, 255, 0], [0, 0, 255],
        [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
        [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255],
        [0, 255, 112], [0, 255, 133], [255, 0, 0], [255, 163, 0],
        [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
        [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255],
        [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
        [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
        [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255],
        [255, 0, 204], [0, 255, 194], [0, 255, 82], [0, 10, 255],
        [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
        [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
        [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0],
        [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
        [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112],
        [92, 255, 0], [0, 224, 255], [112, 224, 255], [70, 184, 160],
        [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
        [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0],
        [255, 0, 235], [245, 0, 255], [255, 0, 122], [255, 245, 0],
        [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
        [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204],
        [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
        [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
        [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194],
        [102, 255, 0], [92, 0, 255],
    ],
    dtype=np.uint8,
)  # fmt: skip

# Colour of IGNORE_LABEL pixels: the VOC boundary colour, as in VOC ground truth.
IGNORE_COLOR = tuple(int(c) for c in voc_colormap()[IGNORE_LABEL])


def colorize(label, palette, ignore_color=IGNORE_COLOR):
    """Maps a label image to RGB colours.

    Args:
        label: integer array `(..., H, W)` of class indices or `IGNORE_LABEL`.
        palette: `uint8` array `(num_classes, 3)`.
        ignore_color: RGB triple for `IGNORE_LABEL`. Defaults to the VOC
            boundary colour (224, 224, 192).

    Returns:
        `uint8` array `(..., H, W, 3)`.
    """
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) > IGNORE_LABEL:
        raise ValueError(
            f"palette must have shape (num_classes, 3) with num_classes <= "
            f"{IGNORE_LABEL}, got {palette.shape}"
        )
    label = np.asarray(label)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    table[IGNORE_LABEL] = ignore_color
    bad = (label < 0) | ((label >= len(palette)) & (label != IGNORE_LABEL))
    if np.any(bad):
        raise ValueError(
            f"label values {np.unique(label[bad])[:20].tolist()} have no colour in "
            f"a palette of {len(palette)} classes"
        )
    return table[label.astype(np.intp)]
