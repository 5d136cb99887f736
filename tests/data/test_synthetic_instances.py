"""The synthetic instance scenes: one mask per shape, touching and occluded
shapes, seeded splits, and a COCO ground truth that decodes to the masks."""

import hashlib

import cv2
import numpy as np
import pytest

from kseg.data import make_synthetic_instances
from kseg.data.synthetic import OBJECT_COLORS


@pytest.fixture(scope="module")
def train():
    return make_synthetic_instances("train", num_images=40, image_size=96, seed=5)


def _digests(images):
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def test_seeded_splits(train):
    again = make_synthetic_instances("train", num_images=6, image_size=96, seed=5)
    np.testing.assert_array_equal(again.image_array, train.image_array[:6])
    for a, b in zip(again.instance_masks, train.instance_masks[:6], strict=True):
        np.testing.assert_array_equal(a, b)
    val = make_synthetic_instances("val", num_images=40, image_size=96, seed=5)
    assert len(_digests(train.image_array)) == 40
    assert not _digests(val.image_array) & _digests(train.image_array)
    other = make_synthetic_instances("train", num_images=6, image_size=96, seed=6)
    assert not _digests(other.image_array) & _digests(train.image_array)


def test_one_disjoint_visible_mask_per_shape(train):
    counts = []
    for masks, classes, drawn in zip(
        train.instance_masks, train.instance_classes, train.drawn_areas, strict=True
    ):
        assert masks.dtype == np.uint8 and masks.shape[1:] == (96, 96)
        assert len(masks) == len(classes) == len(drawn) >= 1
        assert set(np.unique(masks)) <= {0, 1}
        assert masks.sum(axis=0).max() <= 1  # visible parts never overlap
        areas = masks.reshape(len(masks), -1).sum(axis=1)
        assert np.all(areas >= 0.4 * drawn), (areas, drawn)
        assert set(classes.tolist()) <= {1, 2, 3, 4, 5}
        counts.append(len(masks))
    assert max(counts) >= 4 and np.mean(counts) > 2.5
    every_class = np.concatenate(train.instance_classes)
    assert np.all(np.bincount(every_class, minlength=6)[1:] >= 10)


def _adjacent(a, b):
    grown = cv2.dilate(a, np.ones((3, 3), np.uint8))
    return bool(np.any(grown & b))


def test_touching_and_occluded_shapes_occur(train):
    occluded = touching = 0
    for masks, drawn in zip(train.instance_masks, train.drawn_areas, strict=True):
        areas = masks.reshape(len(masks), -1).sum(axis=1)
        occluded += int(np.sum(areas < drawn))
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                touching += _adjacent(masks[i], masks[j])
    assert occluded >= 10, occluded
    assert touching >= 20, touching


def test_image_shows_each_mask_in_one_colour(train):
    # Every instance is painted in one object colour (± jitter and noise),
    # and shapes in contact have different colours, so the masks are what
    # the image shows.
    for image, masks in zip(train.image_array, train.instance_masks, strict=True):
        colours = []
        for mask in masks:
            pixels = image[mask.astype(bool)].astype(float)
            median = np.median(pixels, axis=0)
            distance = np.linalg.norm(OBJECT_COLORS - median, axis=1)
            assert distance.min() < 40, median
            colours.append(int(np.argmin(distance)))
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                if _adjacent(masks[i], masks[j]):
                    assert colours[i] != colours[j]


def test_coco_ground_truth_decodes_to_the_masks(train):
    pycocotools = pytest.importorskip("pycocotools.coco")
    gt = train.coco_ground_truth(range(8))
    assert [a["id"] for a in gt["annotations"]] == list(
        range(1, len(gt["annotations"]) + 1)
    )
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3, 4, 5]
    coco = pycocotools.COCO()
    coco.dataset = gt
    coco.createIndex()
    for index in range(8):
        image_id = train.images[index]["id"]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        decoded = np.stack([coco.annToMask(a) for a in annotations])
        np.testing.assert_array_equal(decoded, train.instance_masks[index])
        sample = train.load(index)
        np.testing.assert_array_equal(
            [a["category_id"] for a in annotations], sample["classes"]
        )
        areas = [a["area"] for a in annotations]
        np.testing.assert_array_equal(areas, sample["masks"].sum(axis=(1, 2)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_synthetic_instances("test", 1)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_instances("train", 1, image_size=16)
    with pytest.raises(ValueError, match="num_images"):
        make_synthetic_instances("train", 0)
