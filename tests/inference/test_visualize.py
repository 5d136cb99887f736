import numpy as np
import pytest

from kseg.data import (
    ADE20K_PALETTE,
    CITYSCAPES_PALETTE,
    IGNORE_COLOR,
    VOC_PALETTE,
)
from kseg.inference import PALETTES, colorize, get_palette, overlay


def _labels(num_classes, shape=(7, 9), seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, shape)
    labels[0, 0] = 255
    return labels


def _colorize_loops(labels, palette):
    out = np.zeros((*labels.shape, 3), np.uint8)
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            value = labels[i, j]
            out[i, j] = IGNORE_COLOR if value == 255 else palette[value]
    return out


@pytest.mark.parametrize(
    "name, palette, num_classes",
    [
        ("voc", VOC_PALETTE, 21),
        ("cityscapes", CITYSCAPES_PALETTE, 19),
        ("ade20k", ADE20K_PALETTE, 150),
    ],
)
def test_colorize_with_named_palettes(name, palette, num_classes):
    assert len(palette) == num_classes
    labels = _labels(num_classes)
    colors = colorize(labels, name)
    assert colors.dtype == np.uint8
    np.testing.assert_array_equal(colors, _colorize_loops(labels, palette))
    np.testing.assert_array_equal(colorize(labels, palette), colors)


def test_voc_palette_values():
    colors = colorize(np.array([[0, 1, 2, 15, 255]]), "voc")[0]
    np.testing.assert_array_equal(
        colors,
        [[0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128], [224, 224, 192]],
    )


def test_colorize_with_an_array_palette():
    palette = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    labels = np.array([[0, 2], [1, 255]], np.uint8)
    np.testing.assert_array_equal(
        colorize(labels, palette),
        [[[10, 20, 30], [70, 80, 90]], [[40, 50, 60], list(IGNORE_COLOR)]],
    )


def test_colorize_rejects_labels_outside_the_palette():
    with pytest.raises(ValueError, match=r"\[19\]"):
        colorize(np.array([[0, 19]]), "cityscapes")
    with pytest.raises(ValueError, match="no colour"):
        colorize(np.array([[-1, 0]]), "voc")


@pytest.mark.parametrize(
    "palette, match",
    [
        ("pascal", "Unknown palette 'pascal'"),
        (np.zeros((4, 4), np.uint8), "shape"),
        (np.zeros((0, 3), np.uint8), "shape"),
        (np.zeros((256, 3), np.uint8), "shape"),
        (np.full((2, 3), 300), "0..255"),
        (np.full((2, 3), 0.5), "integer"),
    ],
)
def test_bad_palettes_raise(palette, match):
    with pytest.raises(ValueError, match=match):
        get_palette(palette)


def test_colorize_rejects_float_label_maps():
    with pytest.raises(ValueError, match="integers"):
        colorize(np.zeros((2, 2), np.float32), "voc")
    with pytest.raises(ValueError, match="label_map must have shape"):
        colorize(np.zeros(4, np.int32), "voc")


def test_get_palette_returns_a_copy():
    palette = get_palette("voc")
    palette[:] = 0
    assert PALETTES["voc"].any()
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_matches_numpy(alpha):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
    labels = _labels(19)
    result = overlay(image, labels, palette="cityscapes", alpha=alpha)
    assert result.dtype == np.uint8
    expected = np.empty((7, 9, 3), np.uint8)
    for i in range(7):
        for j in range(9):
            if labels[i, j] == 255:
                expected[i, j] = image[i, j]
            else:
                color = CITYSCAPES_PALETTE[labels[i, j]].astype(float)
                mixed = (1 - alpha) * image[i, j].astype(float) + alpha * color
                expected[i, j] = np.rint(mixed)
    np.testing.assert_array_equal(result, expected)


def test_overlay_of_a_float_image():
    image = np.full((2, 2, 3), 100.4)
    labels = np.array([[1, 0], [0, 0]])
    result = overlay(image, labels, palette="voc", alpha=0.25)
    np.testing.assert_array_equal(result[0, 0], [np.rint(75.3 + 32), 75, 75])
    np.testing.assert_array_equal(result[1, 1], [75, 75, 75])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image=np.zeros((7, 9))), "image must have shape"),
        (dict(image=np.zeros((7, 9, 4))), "image must have shape"),
        (dict(image=np.zeros((7, 8, 3))), "does not match"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha="half"), "alpha"),
        (dict(palette="nope"), "Unknown palette"),
    ],
)
def test_overlay_rejects_bad_input(kwargs, match):
    kwargs = {"image": np.zeros((7, 9, 3), np.uint8), **kwargs}
    with pytest.raises(ValueError, match=match):
        overlay(label_map=_labels(19), **kwargs)
