"""Palettes and colorize."""

import numpy as np
import pytest

from kseg.data import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_COLOR,
    VOC_PALETTE,
    colorize,
    voc_colormap,
)


def test_voc_colormap_known_entries():
    # Published VOC colours: background, aeroplane, person, tvmonitor, boundary.
    colormap = voc_colormap()
    assert colormap[0].tolist() == [0, 0, 0]
    assert colormap[1].tolist() == [128, 0, 0]
    assert colormap[15].tolist() == [192, 128, 128]
    assert colormap[20].tolist() == [0, 64, 128]
    assert colormap[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in colormap.tolist()}) == 256
    np.testing.assert_array_equal(VOC_PALETTE, colormap[:21])
    with pytest.raises(ValueError, match="num_colors must be in"):
        voc_colormap(257)


def test_dataset_palettes_have_one_colour_per_class():
    assert CITYSCAPES_PALETTE.shape == (len(CITYSCAPES_CLASSES), 3) == (19, 3)
    assert ADE20K_PALETTE.shape == (len(ADE20K_CLASSES), 3) == (150, 3)
    assert CITYSCAPES_PALETTE[0].tolist() == [128, 64, 128]  # road
    assert CITYSCAPES_PALETTE[18].tolist() == [119, 11, 32]  # bicycle
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120]  # wall
    assert ADE20K_PALETTE[149].tolist() == [92, 0, 255]  # flag


def test_colorize():
    label = np.array([[0, 1], [255, 2]])
    rgb = colorize(label, VOC_PALETTE[:3])
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[1, 0].tolist() == list(IGNORE_COLOR) == [224, 224, 192]
    assert rgb[1, 1].tolist() == [0, 128, 0]
    with pytest.raises(ValueError, match=r"label values \[3\] have no colour"):
        colorize(np.array([[3]]), VOC_PALETTE[:3])
    with pytest.raises(ValueError, match="palette must have shape"):
        colorize(label, np.zeros((3, 4)))
