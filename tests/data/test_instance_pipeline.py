"""The instance `tf.data` pipeline: targets against NumPy references built from
hand-made masks, augmentation followed through coordinate-coded images, the
(x, y) contract and the evaluation pipeline's meta."""

import numpy as np
import pytest
import tensorflow as tf

from kseg.data import (
    augment_instances,
    boxes_from_masks,
    crop_masks_to_boxes,
    instance_eval_pipeline,
    instance_targets,
    instance_train_pipeline,
    make_synthetic_instances,
)
from kseg.data.instance_pipeline import boxes_from_mask_tensor


def _sample(mask, y, x):
    """Bilinear sample of `mask` at continuous point (y, x), edge values
    extended (pixel centres at i + 0.5)."""
    h, w = mask.shape
    fy, fx = y - 0.5, x - 0.5
    y0, x0 = int(np.floor(fy)), int(np.floor(fx))
    ty, tx = fy - y0, fx - x0

    def at(i, j):
        return float(mask[min(max(i, 0), h - 1), min(max(j, 0), w - 1)])

    return (
        (1 - ty) * (1 - tx) * at(y0, x0)
        + (1 - ty) * tx * at(y0, x0 + 1)
        + ty * (1 - tx) * at(y0 + 1, x0)
        + ty * tx * at(y0 + 1, x0 + 1)
    )


def _reference_samples(mask, box, size):
    y1, x1, y2, x2 = box
    out = np.zeros((size, size))
    for u in range(size):
        for v in range(size):
            y = y1 + (u + 0.5) * (y2 - y1) / size
            x = x1 + (v + 0.5) * (x2 - x1) / size
            out[u, v] = _sample(mask, y, x)
    return out


def _reference_crop(mask, box, size):
    return (_reference_samples(mask, box, size) >= 0.5).astype(np.uint8)


def test_boxes_of_hand_made_masks():
    masks = np.zeros((3, 6, 8), np.uint8)
    masks[0, 2, 5] = 1  # one pixel
    masks[1, 1:4, 0:3] = 1
    masks[1, 5, 7] = 1  # a stray pixel widens the box
    expected = [[2, 5, 3, 6], [1, 0, 6, 8], [0, 0, 0, 0]]
    np.testing.assert_array_equal(boxes_from_masks(masks), expected)
    boxes, valid = boxes_from_mask_tensor(tf.constant(masks))
    np.testing.assert_array_equal(boxes.numpy(), expected)
    np.testing.assert_array_equal(valid.numpy(), [True, True, False])


def test_mask_crops_of_hand_made_masks():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 1  # fills its box [2, 3, 6, 9]
    left = np.zeros((10, 12), np.uint8)
    left[2:6, 3:6] = 1  # left half of the same box
    crops = crop_masks_to_boxes(
        tf.constant(np.stack([mask, left])),
        tf.constant([[2, 3, 6, 9], [2, 3, 6, 9]], tf.float32),
        4,
    ).numpy()
    np.testing.assert_array_equal(crops[0], np.ones((4, 4)))
    np.testing.assert_array_equal(crops[1], [[1, 1, 0, 0]] * 4)


def test_mask_crops_match_the_bilinear_reference():
    rng = np.random.default_rng(0)
    masks = (rng.uniform(size=(6, 20, 17)) < 0.5).astype(np.uint8)
    boxes = np.array(
        [
            [0, 0, 20, 17],  # whole image: samples reach the edges
            [3, 2, 9, 6],  # upsampled 2x
            [0.5, 1.25, 4.75, 3.5],  # fractional, touching the top edge
            [10, 10, 20, 17],
            [5, 5, 6, 6],  # one pixel
            [2, 0, 18, 3],
        ],
        np.float32,
    )
    crops = crop_masks_to_boxes(tf.constant(masks), tf.constant(boxes), 8).numpy()
    compared = 0
    for mask, box, crop in zip(masks, boxes, crops, strict=True):
        samples = _reference_samples(mask, box, 8)
        # Samples at exactly 0.5 may round either way in float32.
        clear = np.abs(samples - 0.5) > 1e-4
        np.testing.assert_array_equal(crop[clear], samples[clear] >= 0.5)
        compared += clear.sum()
    assert compared > 250


def test_targets_pad_drop_and_warn(capfd):
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[0, 0:4, 0:4] = 1
    masks[2, 8:16, 4:12] = 1
    masks[3, 5, 5] = 1
    targets = instance_targets(
        tf.constant(masks), tf.constant([1, 2, 3, 4]), max_instances=3, mask_size=4
    )
    # The empty mask (class 2) is removed; nothing beyond 3 rows to drop.
    np.testing.assert_array_equal(targets["classes"], [1, 3, 4])
    np.testing.assert_array_equal(
        targets["boxes"], [[0, 0, 4, 4], [8, 4, 16, 12], [5, 5, 6, 6]]
    )
    assert targets["masks"].numpy()[:2].all()
    # A one-pixel mask upsampled bilinearly loses its corners (0.625² < 0.5).
    np.testing.assert_array_equal(
        targets["masks"][2], [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]]
    )
    assert "max_instances" not in capfd.readouterr().err

    two = instance_targets(
        tf.constant(masks), tf.constant([1, 2, 3, 4]), max_instances=2, mask_size=4
    )
    np.testing.assert_array_equal(two["classes"], [1, 3])
    assert "3 instances, more than max_instances = 2" in capfd.readouterr().err

    none = instance_targets(
        tf.zeros((0, 16, 16), tf.uint8), tf.zeros((0,), tf.int32), 3, 4
    )
    assert none["boxes"].shape == (3, 4) and not none["boxes"].numpy().any()
    assert none["masks"].shape == (3, 4, 4) and not none["classes"].numpy().any()


def _coordinate_image(height, width):
    """An image whose red/green channels are the pixel's row/column."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def test_crop_and_flip_follow_the_image():
    # Without resizing, the augmented image's pixels name their source pixel,
    # which gives the crop and the flip; the targets must be what NumPy
    # computes from the original masks cropped and flipped the same way.
    height, width = 100, 150
    image = _coordinate_image(height, width)
    masks = np.zeros((3, height, width), np.uint8)
    masks[0, 10:30, 5:140] = 1
    masks[0, 10:90, 5:20] = 1  # an L: its box shrinks under crops
    masks[1, 70:95, 100:148] = 1
    masks[2, 0:6, 140:150] = 1  # a corner: vanishes under most crops
    classes = np.array([3, 1, 2], np.int32)
    flipped = removed = 0
    for index in range(12):
        out, targets = augment_instances(
            image, masks, classes, 64, mask_size=8, seed=tf.constant([1, index])
        )
        out = out.numpy()
        top, col = int(out[0, 0, 0]), int(out[0, 0, 1])
        mirror = out[0, 1, 1] < out[0, 0, 1]
        left = col - 63 if mirror else col
        np.testing.assert_array_equal(
            out, image[top : top + 64, left : left + 64][:, :: -1 if mirror else 1]
        )
        window = masks[:, top : top + 64, left : left + 64]
        window = window[:, :, ::-1] if mirror else window
        keep = window.reshape(3, -1).any(axis=1)
        expected_boxes = boxes_from_masks(window[keep])
        count = int(keep.sum())
        np.testing.assert_array_equal(targets["classes"][:count], classes[keep])
        assert not targets["classes"].numpy()[count:].any()
        np.testing.assert_array_equal(targets["boxes"][:count], expected_boxes)
        for k, (mask, box) in enumerate(zip(window[keep], expected_boxes, strict=True)):
            np.testing.assert_array_equal(
                targets["masks"][k], _reference_crop(mask, box, 8)
            )
        flipped += mirror
        removed += count < 3
    assert 0 < flipped < 12 and removed > 0


def test_multi_scale_resize_and_padding():
    # A 60x90 image with a rectangle; shorter edge drawn in (30, 30) = scale 1/2,
    # then padded with zeros to 64x128.
    image = np.full((60, 90, 3), 200, np.uint8)
    masks = np.zeros((1, 60, 90), np.uint8)
    masks[0, 10:30, 20:60] = 1
    out, targets = augment_instances(
        image,
        masks,
        np.array([1]),
        (64, 128),
        short_edge_range=(30, 30),
        flip=False,
        mask_size=4,
        seed=tf.constant([0, 0]),
    )
    out = out.numpy()
    assert out.shape == (64, 128, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:30, :45], 200.0)
    assert not out[30:].any() and not out[:, 45:].any()
    np.testing.assert_array_equal(targets["boxes"][0], [5, 10, 15, 30])
    assert targets["masks"].numpy()[0].all()

    # The longer edge cap wins over the shorter edge: 90 * s <= 60.
    out, targets = augment_instances(
        image,
        masks,
        np.array([1]),
        128,
        short_edge_range=(120, 120),
        max_size=60,
        flip=False,
        seed=tf.constant([0, 0]),
    )
    assert out.numpy()[:40, :60].min() == 200.0 and not out.numpy()[40:].any()
    np.testing.assert_allclose(targets["boxes"][0], [20 / 3, 40 / 3, 20, 40], atol=1)


def test_image_without_instances():
    image, targets = augment_instances(
        np.full((50, 70, 3), 9, np.uint8),
        np.zeros((0, 50, 70), np.uint8),
        np.zeros((0,), np.int32),
        64,
        short_edge_range=(40, 80),
        max_instances=5,
        mask_size=7,
        seed=tf.constant([0, 1]),
    )
    assert image.shape == (64, 64, 3) and image.numpy().max() == 9.0
    assert targets["masks"].shape == (5, 7, 7) and not targets["masks"].numpy().any()
    assert not targets["boxes"].numpy().any() and not targets["classes"].numpy().any()


def test_bad_arguments():
    image, masks, classes = np.zeros((8, 8, 3)), np.zeros((0, 8, 8)), np.zeros(0)
    with pytest.raises(ValueError, match="multiples of 64"):
        augment_instances(image, masks, classes, 100)
    with pytest.raises(ValueError, match="short_edge_range"):
        augment_instances(image, masks, classes, 64, short_edge_range=(5, 2))
    with pytest.raises(ValueError, match="mask_size"):
        augment_instances(image, masks, classes, 64, mask_size=1)


@pytest.fixture(scope="module")
def scenes():
    return make_synthetic_instances("train", num_images=10, image_size=96, seed=2)


def test_train_pipeline_contract_and_determinism(scenes):
    def batches():
        return instance_train_pipeline(
            scenes,
            4,
            128,
            short_edge_range=(80, 144),
            max_size=144,
            max_instances=6,
            mask_size=28,
            seed=3,
        ).take(3)

    first = list(batches())
    assert len(first) == 3
    for x, y in first:
        assert set(x) == {"images"} and set(y) == {"boxes", "classes", "masks"}
        assert x["images"].shape == (4, 128, 128, 3) and x["images"].dtype == tf.float32
        assert y["boxes"].shape == (4, 6, 4) and y["boxes"].dtype == tf.float32
        assert y["classes"].shape == (4, 6) and y["classes"].dtype == tf.int32
        assert y["masks"].shape == (4, 6, 28, 28) and y["masks"].dtype == tf.uint8
        classes, boxes = y["classes"].numpy(), y["boxes"].numpy()
        assert classes.max() <= 5 and classes.min() >= 0
        padding = classes == 0
        assert not boxes[padding].any() and not y["masks"].numpy()[padding].any()
        real = boxes[~padding]
        assert np.all(real[:, 2] > real[:, 0]) and np.all(real[:, 3] > real[:, 1])
        assert real.min() >= 0 and real.max() <= 128
    for (x1, y1), (x2, y2) in zip(first, batches(), strict=True):
        np.testing.assert_array_equal(x1["images"], x2["images"])
        np.testing.assert_array_equal(y1["masks"], y2["masks"])


def test_eval_pipeline_meta_and_ground_truth(scenes):
    batches, gt = instance_eval_pipeline(scenes, 4, (128, 192), short_edge=120)
    batches = list(batches)
    assert [len(x["images"]) for x, _ in batches] == [4, 4, 2]
    meta = {k: np.concatenate([m[k] for _, m in batches]) for k in batches[0][1]}
    np.testing.assert_array_equal(meta["image_id"], range(1, 11))
    np.testing.assert_array_equal(meta["height"], 96)
    np.testing.assert_array_equal(meta["width"], 96)
    np.testing.assert_allclose(meta["scale"], 1.25)
    images = np.concatenate([x["images"] for x, _ in batches])
    assert not images[:, 120:].any() and not images[:, :, 120:].any()
    assert images[:, :120, :120].mean() > 50
    assert [image["id"] for image in gt["images"]] == list(range(1, 11))
    assert len(gt["annotations"]) == sum(len(c) for c in scenes.instance_classes)
