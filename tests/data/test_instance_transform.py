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


def _random_detections(seed, count, height, width):
    """Fractional boxes (some beyond the image, one empty) and smooth
    masks whose pasted values cross 0.5 often."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(-10, height + 10, (count, 2))
    x = rng.uniform(-10, width + 10, (count, 2))
    boxes = np.stack([y.min(-1), x.min(-1), y.max(-1), x.max(-1)], axis=-1)
    boxes[3, 2] = boxes[3, 0]
    coarse = rng.uniform(0, 1, (count, 4, 4))
    centres = (np.arange(28) + 0.5) / 7 - 0.5
    lower = np.clip(np.floor(centres).astype(int), 0, 3)
    upper = np.minimum(lower + 1, 3)
    fraction = np.clip(centres - lower, 0, 1)[:, None]
    rows = coarse[:, lower] * (1 - fraction) + coarse[:, upper] * fraction
    fraction = fraction[:, 0]
    masks = rows[:, :, lower] * (1 - fraction) + rows[:, :, upper] * fraction
    return masks.astype(np.float32), boxes


def _full_size_paste(masks, boxes, height, width):
    """The paste over every image pixel: full-size weights, one product."""
    from keras import ops

    from kseg.data.instance_transform import paste_weights

    rows = ops.convert_to_numpy(paste_weights(boxes[:, 0], boxes[:, 2], height, 28))
    cols = ops.convert_to_numpy(paste_weights(boxes[:, 1], boxes[:, 3], width, 28))
    return np.einsum(
        "dha,dab,dwb->dhw",
        rows.astype(np.float64),
        masks.astype(np.float64),
        cols.astype(np.float64),
    )


def test_pasting_inside_the_box_gives_the_full_size_paste_exactly():
    from kseg.data.instance_transform import paste_mask_crops

    height, width = 45, 70
    masks, boxes = _random_detections(3, 12, height, width)
    full = _full_size_paste(masks, boxes, height, width)
    assert ((full > 0.3) & (full < 0.7)).sum() > 500  # near the threshold
    expected = full >= 0.5
    pasted = paste_mask_crops(masks, boxes, height, width)
    assert pasted.shape == (12, height, width) and pasted.dtype == bool
    np.testing.assert_array_equal(np.asarray(pasted), expected)
    np.testing.assert_array_equal(paste_masks(masks, boxes, height, width), expected)
    np.testing.assert_allclose(
        paste_masks(masks, boxes, height, width, threshold=None), full, atol=1e-6
    )
    for k in range(12):
        np.testing.assert_array_equal(pasted[k], expected[k])
        top, left, crop = pasted.crop(k)
        # Nothing of the mask lies outside its crop.
        assert expected[k].sum() == crop.sum()
        np.testing.assert_array_equal(
            crop, expected[k, top : top + crop.shape[0], left : left + crop.shape[1]]
        )
        # Any band of rows: the same pixels as the whole crop.
        first, _, band = pasted.crop_rows(k, 10, 23)
        np.testing.assert_array_equal(band, crop[first - top : first - top + len(band)])
    assert pasted.crop(3)[2].size == 0  # the empty box
    np.testing.assert_array_equal(pasted[5, 10:20, 3], expected[5, 10:20, 3])


def test_a_threshold_must_be_positive():
    # Outside its box a mask is 0: a threshold of 0 would fill the image.
    with pytest.raises(ValueError, match="threshold must be positive"):
        paste_masks(np.ones((1, 28, 28)), [[0, 0, 1, 1]], 4, 4, threshold=0)


def test_crops_pasted_by_bands_of_rows_are_the_whole_crops(monkeypatch):
    from kseg.data import instance_transform

    masks, boxes = _random_detections(4, 8, 45, 70)
    whole = np.asarray(instance_transform.paste_mask_crops(masks, boxes, 45, 70))
    monkeypatch.setattr(instance_transform, "_PASTE_ROWS", 7)
    pasted = instance_transform.paste_mask_crops(masks, boxes, 45, 70)
    assert max(pasted.crop(k)[2].shape[0] for k in range(8)) > 14  # 3+ bands
    np.testing.assert_array_equal(np.asarray(pasted), whole)


def _torchvision_paste(mask, box, height, width):
    """torchvision's `paste_masks_in_image` for one mask, pixel by pixel:
    the mask padded by a zero sample, the box widened by (M + 2) / M about
    its centre and truncated to whole pixels, the padded mask resized
    bilinearly (`align_corners=False`) onto those pixels."""
    size = mask.shape[0]
    padded = np.pad(mask.astype(np.float64), 1)
    scale = np.float32((size + 2) / size)
    y1, x1, y2, x2 = np.float32(box)
    out = np.zeros((height, width))
    spans = []
    for low, high in ((y1, y2), (x1, x2)):
        half = (high - low) * np.float32(0.5) * scale
        centre = (high + low) * np.float32(0.5)
        spans.append((int(centre - half), int(centre + half)))
    (top, bottom), (left, right) = spans

    def taps(pixel, start, stop):
        count = max(stop - start + 1, 1)
        source = max((pixel - start + 0.5) * (size + 2) / count - 0.5, 0.0)
        lower = int(source)
        return lower, min(lower + 1, size + 1), source - lower

    for i in range(max(top, 0), min(bottom + 1, height)):
        r0, r1, fy = taps(i, top, bottom)
        for j in range(max(left, 0), min(right + 1, width)):
            c0, c1, fx = taps(j, left, right)
            out[i, j] = (1 - fy) * ((1 - fx) * padded[r0, c0] + fx * padded[r0, c1]) + (
                fy * ((1 - fx) * padded[r1, c0] + fx * padded[r1, c1])
            )
    return out


def test_torchvision_style_pasting_is_torchvisions():
    from kseg.data.instance_transform import paste_mask_crops

    height, width = 45, 70
    masks, boxes = _random_detections(3, 8, height, width)
    boxes[0] = [-6.3, 60.2, 20.7, 79.9]  # beyond the image's top and right
    expected = np.stack(
        [
            _torchvision_paste(m, b, height, width)
            for m, b in zip(masks, boxes, strict=True)
        ]
    )
    probabilities = paste_mask_crops(
        masks, boxes, height, width, threshold=None, style="torchvision"
    )
    # torch's sampling coordinates are float32 (three roundings of values up
    # to M + 2 = 30: ≤ 30 · 3 · 2⁻²⁴ ≈ 5.4e-6 of a sample), the reference's
    # float64; mask values here change by less than 1 a sample.
    np.testing.assert_allclose(np.asarray(probabilities), expected, atol=1e-5)
    pasted = paste_mask_crops(masks, boxes, height, width, style="torchvision")
    np.testing.assert_array_equal(np.asarray(pasted)[expected > 0.5 + 1e-5], True)
    np.testing.assert_array_equal(np.asarray(pasted)[expected < 0.5 - 1e-5], False)
    for k in range(8):
        top, left, crop = pasted.crop(k)
        assert crop.sum() == np.asarray(pasted)[k].sum()
    with pytest.raises(ValueError, match="style must be one of"):
        paste_mask_crops(masks, boxes, height, width, style="detectron")
