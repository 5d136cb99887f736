"""paste_masks against hand-computed pastes."""

import numpy as np
import pytest

from kseg.data.instance_transform import paste_masks


def test_two_by_two_mask_upsampled_by_two():
    # Mask pixel centres sit at image coordinates 1 and 3 (box 0..4, 2 bins
    # of 2 px). Image pixel centres 0.5, 1.5, 2.5, 3.5 fall at mask
    # coordinates -0.25 (held at 0), 0.25, 0.75, 1.25 (held at 1), so the
    # weights of mask pixel 0 along an axis are 1, 0.75, 0.25, 0.
    mask = np.array([[[1.0, 0.0], [0.0, 0.0]]])
    weights = np.array([1.0, 0.75, 0.25, 0.0])
    probabilities = paste_masks(mask, [[0, 0, 4, 4]], 5, 6, threshold=None)
    expected = np.zeros((5, 6))
    expected[:4, :4] = np.outer(weights, weights)
    np.testing.assert_allclose(probabilities[0], expected, atol=1e-7)
    binary = paste_masks(mask, [[0, 0, 4, 4]], 5, 6)
    assert binary.dtype == bool
    np.testing.assert_array_equal(
        np.argwhere(binary[0]), [[0, 0], [0, 1], [1, 0], [1, 1]]
    )


def test_only_pixel_centres_inside_the_box_are_pasted():
    ones = np.ones((2, 28, 28))
    boxes = [[1, 2, 3, 4], [0.6, 0.6, 2.4, 2.4]]
    pasted = paste_masks(ones, boxes, 5, 6)
    expected = np.zeros((2, 5, 6), bool)
    expected[0, 1:3, 2:4] = True
    expected[1, 1, 1] = True  # centres 0.5 and 2.5 are outside 0.6..2.4
    np.testing.assert_array_equal(pasted, expected)


def test_boxes_beyond_the_image_and_empty_boxes():
    ones = np.ones((3, 4, 4))
    boxes = [[-2, -2, 2, 3], [3, 5, 10, 10], [2, 2, 2, 5]]
    pasted = paste_masks(ones, boxes, 4, 6)
    np.testing.assert_array_equal(np.argwhere(pasted[0]).max(axis=0), [1, 2])
    np.testing.assert_array_equal(pasted[0].sum(), 6)
    np.testing.assert_array_equal(pasted[1].sum(), 1)  # only pixel (3, 5)
    assert not pasted[2].any()


def test_half_mask_splits_its_box():
    mask = np.zeros((1, 28, 28))
    mask[0, :, :14] = 1.0
    pasted = paste_masks(mask, [[10, 20, 30, 60]], 40, 80)
    expected = np.zeros((40, 80), bool)
    expected[10:30, 20:40] = True
    np.testing.assert_array_equal(pasted[0], expected)


def test_shape_errors():
    with pytest.raises(ValueError, match="masks"):
        paste_masks(np.ones((28, 28)), [[0, 0, 1, 1]], 4, 4)
    with pytest.raises(ValueError, match="boxes"):
        paste_masks(np.ones((2, 28, 28)), [[0, 0, 1, 1]], 4, 4)
