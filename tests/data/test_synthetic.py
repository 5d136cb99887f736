"""The embedded synthetic shapes dataset."""

import hashlib

import numpy as np
import pytest

from kseg.data import SYNTHETIC_CLASSES, make_synthetic, synthetic_dataset
from kseg.data.synthetic import OBJECT_COLORS


@pytest.fixture(scope="module")
def train():
    return make_synthetic("train", num_images=48, image_size=64, seed=3)


def _digests(images):
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def test_deterministic_by_seed_and_independent_of_count(train):
    again = make_synthetic("train", num_images=10, image_size=64, seed=3)
    np.testing.assert_array_equal(again.images, train.images[:10])
    np.testing.assert_array_equal(again.labels, train.labels[:10])
    other = make_synthetic("train", num_images=10, image_size=64, seed=4)
    assert not _digests(other.images) & _digests(train.images)


def test_train_and_val_are_disjoint(train):
    val = make_synthetic("val", num_images=48, image_size=64, seed=3)
    assert len(_digests(train.images)) == 48
    assert not _digests(val.images) & _digests(train.images)


def test_shapes_dtypes_and_classes(train):
    assert train.images.shape == (48, 64, 64, 3) and train.images.dtype == np.uint8
    assert train.labels.shape == (48, 64, 64) and train.labels.dtype == np.uint8
    assert train.num_classes == len(SYNTHETIC_CLASSES) == 6
    assert train.palette.shape == (6, 3)
    counts = np.bincount(train.labels.ravel(), minlength=6)
    assert counts.size == 6  # nothing outside the classes, no ignore pixels
    # Every object class is present and none is tiny (learnable for a small model).
    shares = counts / counts.sum()
    assert np.all(shares[1:] > 0.02), shares
    assert 0.6 < shares[0] < 0.9, shares


def test_labels_follow_the_drawing_order(train):
    # Each object pixel's colour must be the colour of an instance of the class
    # its label names: if occlusion were resolved differently in image and label,
    # pixels would carry another class's colour.
    hits = total = 0
    for image, label, instances in zip(
        train.images, train.labels, train.instances, strict=True
    ):
        assert 2 <= len(instances) <= 4
        distance = np.linalg.norm(
            image[..., None, :].astype(float) - OBJECT_COLORS.astype(float), axis=-1
        )
        nearest = np.argmin(distance, axis=-1)
        for class_id in range(1, 6):
            pixels = label == class_id
            allowed = [
                OBJECT_COLORS.tolist().index(list(color))
                for c, color in instances
                if c == class_id
            ]
            hits += np.isin(nearest[pixels], allowed).sum()
            total += pixels.sum()
    assert hits / total > 0.999, hits / total


def test_objects_overlap(train):
    # Where one object is drawn over another of a different class, the label
    # steps directly between two object classes (no background in between).
    touching = 0
    for label in train.labels:
        right = (
            (label[:, 1:] != label[:, :-1]) & (label[:, 1:] > 0) & (label[:, :-1] > 0)
        )
        down = (label[1:] != label[:-1]) & (label[1:] > 0) & (label[:-1] > 0)
        touching += bool(right.any() or down.any())
    assert touching >= 5


def test_colour_does_not_determine_class(train):
    classes_of_colour = {}
    for instances in train.instances:
        for class_id, color in instances:
            classes_of_colour.setdefault(color, set()).add(class_id)
    assert len(classes_of_colour) == len(OBJECT_COLORS)
    assert all(len(classes) >= 2 for classes in classes_of_colour.values())


def test_tf_dataset_and_errors():
    pairs = list(
        synthetic_dataset("val", num_images=2, image_size=32).as_numpy_iterator()
    )
    val = make_synthetic("val", num_images=2, image_size=32)
    for (image, label), i in zip(pairs, range(2), strict=True):
        np.testing.assert_array_equal(image, val.images[i])
        np.testing.assert_array_equal(label, val.labels[i])
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        make_synthetic("test")
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        make_synthetic(image_size=16)
    with pytest.raises(ValueError, match="num_images must be positive"):
        make_synthetic(num_images=0)
